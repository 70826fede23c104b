"""Commands that read a finished run folder: `tunekit eval --data`, `predict`.

The run is that of a method module (`method_of(run.json's method)`), which knows how to load its
model and score or predict a data file of the run's own task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunekit.methods import method_of
from tunekit.outputs import run_method, write_atomic
from tunekit.runner import library_output_to_stderr


def eval_on_data(run: Path, data: str) -> dict[str, Any]:
    """The run's own metrics on another data file."""
    method = method_of(run_method(run))
    with library_output_to_stderr():
        return method.eval_run(run, data)


def predict_to_file(run: Path, data: str, out: Path | None) -> Path:
    """Predictions for every row of `data`, written atomically: JSON lines, or for QA one
    {id: answer} object (the official SQuAD evaluation format)."""
    method = method_of(run_method(run))
    with library_output_to_stderr():
        rows = method.predict_run(run, data)
    if isinstance(rows, dict):
        out = out or run / "predictions.json"
        write_atomic(out, json.dumps(rows, ensure_ascii=False) + "\n")
    else:
        out = out or run / "predictions.jsonl"
        write_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
    return out
