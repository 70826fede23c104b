"""`tunekit eval --data`, `tunekit predict` and `tunekit generate`: a finished run scores, predicts or
generates for a data file. The run's method (its `eval_run` / `predict_run`, tunekit.methods) knows how
to load its model and read the file."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tunekit.console import library_output_to_stderr
from tunekit.data.masking import prompts_of_file
from tunekit.errors import UserError
from tunekit.files import write_atomic
from tunekit.generation import generate, load_chat_model, settings_with
from tunekit.jsontypes import Metrics
from tunekit.methods import Method, with_own_task
from tunekit.methods.sft import heldout_prompts
from tunekit.runs.reading import open_run


def eval_on_data(run: Path, data: str) -> Metrics:
    """The run's own metrics on another data file."""
    method = own_task_method(run, "eval --data")
    with library_output_to_stderr():
        return method.eval_run(run, data)


def own_task_method(run: Path, command: str) -> Method:
    """The method of a finished run whose data files `command` scores, or one line saying which do."""
    info = open_run(run, command, "finished")
    return with_own_task(command, info.method, f"{info.path}: a run of `tunekit {info.method}` ({info.task})",
                         causal=info.task == "causal-lm")


def predict_to_file(run: Path, data: str, out: Path | None) -> Path:
    """Predictions for every row of `data`, written atomically: JSON lines, or for QA one
    {id: answer} object (the official SQuAD evaluation format)."""
    method = own_task_method(run, "predict")
    with library_output_to_stderr():
        rows = method.predict_run(run, data)
    if isinstance(rows, dict):
        out = out or run / "predictions.json"
        write_atomic(out, json.dumps(rows, ensure_ascii=False) + "\n")
    else:
        out = out or run / "predictions.jsonl"
        write_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
    return out


def generate_for(
    run: str, prompts: list[str] | None, data: str | None, heldout: int | None, out: Path | None, **overrides: Any,
) -> Path | list[str]:
    """`tunekit generate`: the responses to --prompt messages (returned), or to every prompt of a
    file / the run's held-out split (written as JSON lines to `out`, whose path is returned)."""
    if not prompts and not data and not heldout:
        raise UserError("give --prompt TEXT, --data FILE or --heldout N")
    run_info = open_run(run, "generate", "causal_lm")
    if heldout and (run_info is None or run_info.method != "sft"):
        kind = f"a run of `tunekit {run_info.method}`" if run_info and run_info.method else "not a tunekit run"
        raise UserError(f"{run}: {kind}; --heldout reads the held-out split of an sft run; use --prompt or --data")
    with library_output_to_stderr():
        if heldout:
            conversations = heldout_prompts(Path(run), heldout)
        elif data:
            conversations = prompts_of_file(data)
        else:
            conversations = [[{"role": "user", "content": p}] for p in prompts or []]
        model, tokenizer, settings = load_chat_model(run, "generate")
        results = generate(model, tokenizer, conversations, settings_with(settings, **overrides))
    if not data and not heldout:
        return [result["response"] for result in results]
    out = out or Path(run) / "generations.jsonl"
    rows = [{"prompt": c[-1]["content"], **r} for c, r in zip(conversations, results)]
    write_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
    stopped = sum(r["stopped"] for r in results)
    print(f"{stopped} of {len(results)} responses ended by themselves (EOS)", file=sys.stderr, flush=True)
    return out
