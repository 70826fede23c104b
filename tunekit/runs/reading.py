"""What a folder given to a run-reading command is, checked before any model loads.

Every command that takes a RUN (`eval`, `predict`, `generate`, `chat`, `merge`, `preview`, `serve`)
calls `open_run` first, so a wrong folder, an empty one, a run that failed or is still running, or
a run of the wrong kind is one line and exit code 2, never a traceback from deep inside a loader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tunekit.errors import UserError
from tunekit.files import read_json
from tunekit.runs.folder import Task, task_of

# What a command needs of the folder:
#   causal_lm  a causal LM to sample from (generate, chat, serve, eval --task): a run, or a model folder
#   finished   a finished run with its model (eval --data, predict: the method then says if it scores files)
#   adapter    a run that saved an adapter (merge)
#   sft        an SFT run's resolved recipe (preview), finished or not
Want = Literal["causal_lm", "finished", "adapter", "sft"]

CAUSAL_ARCHITECTURES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


@dataclass(frozen=True)
class RunInfo:
    """A checked folder: a tunekit run (`method` set) or a plain transformers model folder."""

    path: Path
    method: str | None
    task: Task
    adapter: bool


def open_run(target: str | Path, command: str, want: Want) -> RunInfo | None:
    """The folder `command` was given, checked for what it needs. None: `target` is no local path
    but may be a Hub model id (only where a model folder will do); loading it says if it is not."""
    path = Path(target)
    models_ok = want == "causal_lm"
    if not path.exists():
        looks_local = str(target).startswith((".", "/", "~")) or (len(path.parts) > 1 and path.parent.is_dir())
        if models_ok and not looks_local:
            return None
        raise UserError(f"{target}: no such run folder; give the folder a training command printed last")
    if not path.is_dir():
        raise UserError(f"{target}: is a file, not a run folder; give the folder a training command printed last")
    if not any(path.iterdir()):
        raise UserError(f"{target}: the folder is empty: not a tunekit run folder; give the folder a training command printed last")
    if not (path / "run.json").is_file():
        if models_ok and (path / "config.json").is_file():
            return model_folder(path, command)
        kinds = "a tunekit run folder (no run.json) or a model folder (no config.json)" if models_ok else \
            "a tunekit run folder (no run.json)"
        raise UserError(f"{target}: not {kinds}; give the folder a training command printed last")
    info = read_json(path / "run.json")
    method = info.get("method")
    if want != "sft":
        check_finished(path, info.get("status"), info.get("reason"))
    run = RunInfo(path, method, task_of(path), adapter=(path / "adapter").is_dir())
    check_kind(run, command, want)
    return run


def check_finished(path: Path, status: str | None, reason: str | None) -> None:
    """Only a finished run has its final model; the others say what to do instead."""
    if status == "running":
        raise UserError(f"{path}: the run has not finished (run.json status: running); wait for it, "
                        "or if its process was killed, continue it with the same command and --resume")
    if status == "interrupted":
        raise UserError(f"{path}: the run was stopped before it finished; continue it with the same command and --resume")
    if status == "failed":
        raise UserError(f"{path}: the run failed ({reason or 'see its log'}); it saved no model to use")
    if status != "done":
        raise UserError(f"{path}: run.json has status {status!r}, not done; is it a tunekit run?")
    if not (path / "model").is_dir() and not (path / "adapter").is_dir():
        raise UserError(f"{path}: the run finished but holds no model/ or adapter/ folder; train it again")


def check_kind(run: RunInfo, command: str, want: Want) -> None:
    what = f"{run.path}: a run of `tunekit {run.method}` ({run.task})"
    if want == "causal_lm" and run.task != "causal-lm":
        raise UserError(f"{what}; `tunekit {command}` needs a causal LM: an sft, dpo, rlhf or causal pretrain run")
    if want == "adapter" and not run.adapter:
        raise UserError(f"{run.path}: a full fine-tuning run (model/, no adapter/): nothing to merge; "
                        "its model/ already loads with transformers as it is")
    if want == "sft" and run.method != "sft":
        raise UserError(f"{what}; `tunekit {command}` shows the data of sft runs and recipes")


def model_folder(path: Path, command: str) -> RunInfo:
    """A plain transformers model folder, refused where its config names no causal-LM head."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}/config.json: not a readable model config ({err})") from None
    architectures = config.get("architectures") or []
    if architectures and not any(a.endswith(CAUSAL_ARCHITECTURES) for a in architectures):
        raise UserError(f"{path}: a {', '.join(architectures)} model folder; `tunekit {command}` needs a causal LM")
    return RunInfo(path, None, "causal-lm", adapter=(path / "adapter_config.json").is_file())
