"""The run folder: resolved config, metrics log, final metrics, saved model, model card, plots.

Everything is written atomically (temporary name, then rename), so a crash never leaves a
half-written file or model folder behind, and `run.json` always says whether the run is
`running`, `done` or `failed` (with the reason).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal

from tunekit.distributed import running
from tunekit.errors import UserError
from tunekit.files import read_json, write_atomic, write_folder, write_json
from tunekit.jsontypes import JsonObject, Metrics
from tunekit.runs.library_warnings import route_library_warnings

SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD")


def default_run_dir(command: str, recipe_path: str) -> Path:
    return Path("runs") / f"{command}-{Path(recipe_path).stem}"


def check_run_dir(path: Path, overwrite: bool) -> None:
    """Refuse to touch an existing run folder unless asked (checked before anything is loaded)."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: exists and is not a folder; choose another --output-dir")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"{path}: run folder exists; pass --overwrite to replace it or --output-dir to choose another")


_invocation: list[str] = []


def record_invocation(args: list[str]) -> None:
    """Remember the tunekit arguments of this process (the CLI calls this), for the model card."""
    _invocation[:] = args


def command_line() -> str:
    """The command that started this run, as a user would type it."""
    return shlex.join(["tunekit", *(_invocation or sys.argv[1:])])


def scrub_secrets(text: str) -> str:
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value:
            text = text.replace(value, "***")
    return text


def source_version() -> str:
    """tunekit's version and, when it runs from a git checkout, the commit (`+dirty` with
    uncommitted changes to tracked files): what a figure measured from this run was measured on."""
    import subprocess

    from tunekit import __version__

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return __version__
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__} ({commit}{'+dirty' if changed else ''})"


def recorded_version(run_dir: Path) -> str:
    """The tunekit version (and commit) a run recorded in its run.json (source_version); "?" for a
    folder without one."""
    path = Path(run_dir) / "run.json"
    return read_json(path).get("tunekit", "?") if path.is_file() else "?"


class RunFolder:
    """One training run's folder. Only the main process writes (`enabled=False` elsewhere)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.started = time.time()
        self.info: JsonObject = {}

    def start(self, method: str, config_yaml: str, overwrite: bool, **info: Any) -> None:
        if not self.enabled:
            route_library_warnings(None)  # the main process logs them
            return
        if overwrite and self.path.is_dir():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        route_library_warnings(self.path / "warnings.log")
        write_atomic(self.path / "config.yaml", scrub_secrets(config_yaml))
        engine = running()
        self.info = {"method": method, "status": "running", "command": scrub_secrets(command_line()),
                     "tunekit": source_version(), "device": device_name(), "engine": engine.name,
                     "sharding": engine.sharding, **info}
        self._write_info()
        print(banner(self.info, self.path), file=sys.stderr, flush=True)

    def mark_checkpoint(self, folder: Path) -> None:
        """Written last into a checkpoint: it is complete, and this is the config it belongs to."""
        config = read_run_config(self.path)
        write_json(folder / CHECKPOINT_MARK, {"config": fingerprint(config), "config_sha256": config_hash(config)})

    def logged(self, key: str, step: int) -> Any:
        """A value this run logged at a step (None if it did not)."""
        path = self.path / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return next((r[key] for r in records if r.get("step") == step and key in r), None)

    def forget_after(self, step: int) -> None:
        """On resume: drop metrics logged after the checkpoint (they will be logged again)."""
        path = self.path / "metrics.jsonl"
        if self.enabled and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
            write_atomic(path, "".join(line + "\n" for line in kept))

    def update(self, **info: Any) -> None:
        self.info.update(info)
        self._write_info()

    def log(self, record: JsonObject) -> None:
        if not self.enabled:
            return
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def write_eval(self, metrics: Metrics) -> None:
        if self.enabled:
            write_json(self.path / "eval.json", metrics)

    def save_pretrained(self, *objects: Any, subdir: str = "model", weights: JsonObject | None = None) -> Path:
        """save_pretrained each object into a temporary folder, then rename it into place. `weights`,
        if given, is the first object's state dict (a sharded model's, gathered from every rank)."""
        final = self.path / subdir
        if not self.enabled:
            return final

        def write(folder: Path) -> None:
            for i, obj in enumerate(objects):
                obj.save_pretrained(folder, **({"state_dict": weights} if i == 0 and weights is not None else {}))

        return write_folder(final, write)

    def save_model(self, model: Any, tokenizer: Any) -> Path:
        """`model/` for full fine-tuning; `adapter/` (PEFT format) for an adapter, with the base
        model's config beside it (labels, quantisation) so the run reloads as it was trained. A model
        sharded over processes (FSDP) is gathered first, by every rank, and saved whole by rank 0."""
        from tunekit.distributed import full_state_dict

        weights = full_state_dict(model)
        if hasattr(model, "peft_config"):
            return self.save_pretrained(model, tokenizer, model.get_base_model().config, subdir="adapter", weights=weights)
        return self.save_pretrained(model, tokenizer, subdir="model", weights=weights)

    def finish(self, metrics: Metrics) -> None:
        if not self.enabled:
            return
        from tunekit.runs.modelcard import model_card
        from tunekit.runs.plots import plot_losses

        self.update(status="done", wall_time_s=round(time.time() - self.started, 1))
        plot_losses(self.path / "metrics.jsonl", self.path / "loss.png", self.info.get("method"),
                    self.info.get("loss_units"), self.info.get("step_unit"))
        peft = self.info.get("peft", "none")
        card = model_card(self.info, metrics, self.info["task"], None if peft == "none" else peft,
                          adapter=(self.path / "adapter").is_dir())
        write_atomic(self.path / "README.md", card)

    def fail(self, reason: str) -> None:
        self._stopped("failed", reason)

    def interrupt(self, reason: str) -> None:
        self._stopped("interrupted", reason)

    def _stopped(self, status: str, reason: str) -> None:
        if self.enabled and self.path.is_dir():
            self.update(status=status, reason=reason, wall_time_s=round(time.time() - self.started, 1))

    def _write_info(self) -> None:
        if self.enabled:
            write_json(self.path / "run.json", self.info)


def device_name() -> str:
    """What this process trains on, for the banner and run.json."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return f"CPU ({torch.get_num_threads()} threads)"


def banner(info: JsonObject, path: Path) -> str:
    """The compact start-of-run summary printed to stderr."""
    trainable, total = info.get("trainable_params", 0), info.get("total_params", 0)
    share = f" ({100 * trainable / total:.2f}%)" if total else ""
    return (
        f"tunekit {info['method']}: {info.get('base_model')} -> {path}\n"
        f"  parameters {trainable:,} trainable / {total:,}{share}; "
        f"data {info.get('train_rows')} train / {info.get('eval_rows')} eval; "
        f"effective batch {info.get('effective_batch_size')} on {info.get('num_processes', 1)} process(es), "
        f"{info.get('device')}\n"
        f"  engine {info.get('engine', 'single')}; sharded: {info.get('sharding', 'none')}"
    )


def read_run_config(run_dir: Path) -> JsonObject:
    """The resolved recipe a run saved, for `tunekit eval` / `predict` / `generate`."""
    from tunekit.config import parse_yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a tunekit run folder (no config.yaml)")
    return parse_yaml(path.read_text(encoding="utf-8"))


def run_method(run_dir: Path) -> str:
    """Which command produced a run folder (from run.json)."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a tunekit run folder (no run.json)")
    return read_json(path)["method"]


Task = Literal["causal-lm", "masked-lm", "sequence-classification", "question-answering"]


# The head a saved model's class names, for run folders whose run.json does not record its task
ARCHITECTURE_TASKS: tuple[tuple[str, Task], ...] = (
    ("ForSequenceClassification", "sequence-classification"), ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "masked-lm"),
)


def task_of(run_dir: Path) -> Task:
    """The model head a run trained: run.json's `task` (the method decided it when the run
    started), else what its saved model's class says."""
    info_path = Path(run_dir) / "run.json"
    task = read_json(info_path).get("task") if info_path.is_file() else None
    if task:
        return task
    for saved in ("model", "adapter"):
        config = Path(run_dir) / saved / "config.json"
        if config.is_file():
            architectures = read_json(config).get("architectures") or []
            return next((t for a in architectures for suffix, t in ARCHITECTURE_TASKS if a.endswith(suffix)), "causal-lm")
    return "causal-lm"


def run_status(run_dir: Path) -> str | None:
    """running / done / failed / interrupted, or None where there is no run.json."""
    path = Path(run_dir) / "run.json"
    return read_json(path).get("status") if path.is_file() else None


# ---------------------------------------------------------------------------------------------
# Checkpoints and resuming

CHECKPOINT_MARK = "tunekit-checkpoint.json"
# Keys that may differ between a checkpoint's config and the resumed one: they change how a run is
# watched, not what it computes.
RESUME_MAY_CHANGE = (
    "description", "output_dir", "generation.", "train.logging_steps", "train.logging_first_step",
    "train.save_steps", "train.save_total_limit", "train.save_strategy", "train.report_to", "train.eval_steps",
    "train.eval_strategy", "train.disable_tqdm", "train.dataloader_num_workers", "train.run_name",
)


def flatten(data: Any, prefix: str = "") -> JsonObject:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def fingerprint(config: JsonObject) -> JsonObject:
    """The resolved config, flattened, without the keys a resume may change. An rlhf run samples its
    own training data with `generation.*`, so there those keys change the computation."""
    may_change = RESUME_MAY_CHANGE
    if "rlhf" in config:
        may_change = tuple(k for k in RESUME_MAY_CHANGE if k != "generation.")
    return {k: v for k, v in flatten(config).items() if not k.startswith(may_change)}


def config_hash(config: JsonObject) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(fingerprint(config), sort_keys=True, default=str).encode()).hexdigest()


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.rsplit("-", 1)[-1])


def is_complete(folder: Path) -> bool:
    """A checkpoint the Trainer finished writing: tunekit marks it after the Trainer's last file."""
    try:
        read_json(folder / CHECKPOINT_MARK)
        read_json(folder / "trainer_state.json")
    except (OSError, ValueError):
        return False
    return True


def find_checkpoint(run_dir: Path, resume: str, config: Any) -> Path:
    """The checkpoint `--resume` continues from, refused if its config differs from this one in a
    key that changes the computation. Incomplete checkpoints (a crash while saving) are skipped and
    moved out of the way, so the Trainer never picks one up."""
    if resume == "latest":
        folders = sorted(run_dir.glob("checkpoint-*"), key=checkpoint_step, reverse=True) if run_dir.is_dir() else []
        complete = [f for f in folders if is_complete(f)]
        if not complete:
            raise UserError(f"{run_dir}: no complete checkpoint to resume from; start the run without --resume")
        chosen = complete[0]
        for broken in folders[: folders.index(chosen)]:
            os.replace(broken, broken.with_name(f".incomplete-{broken.name}"))
    else:
        chosen = Path(resume)
        if not is_complete(chosen):
            raise UserError(f"--resume {resume}: not a complete tunekit checkpoint (no {CHECKPOINT_MARK} or trainer_state.json)")
    saved = read_json(chosen / CHECKPOINT_MARK)["config"]
    current = fingerprint(config.model_dump(mode="json"))
    differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differing:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differing[:3])
        raise UserError(f"--resume: the config differs from the checkpoint's ({shown}); only logging and "
                        "saving options may change; start a new run with --output-dir")
    return chosen
