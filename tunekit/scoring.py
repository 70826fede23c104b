"""`tunekit eval --data` and `tunekit predict`: a finished run scores, or predicts, a data file of its
own task. The run's method module (`method_of(run.json's method)`) knows how to load its model and
read the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunekit.methods import method_of
from tunekit.outputs import write_atomic
from tunekit.runner import library_output_to_stderr
from tunekit.runs import open_run


def eval_on_data(run: Path, data: str) -> dict[str, Any]:
    """The run's own metrics on another data file."""
    method = method_of(open_run(run, "eval --data", "own_task").method)
    with library_output_to_stderr():
        return method.eval_run(run, data)


def predict_to_file(run: Path, data: str, out: Path | None) -> Path:
    """Predictions for every row of `data`, written atomically: JSON lines, or for QA one
    {id: answer} object (the official SQuAD evaluation format)."""
    method = method_of(open_run(run, "predict", "own_task").method)
    with library_output_to_stderr():
        rows = method.predict_run(run, data)
    if isinstance(rows, dict):
        out = out or run / "predictions.json"
        write_atomic(out, json.dumps(rows, ensure_ascii=False) + "\n")
    else:
        out = out or run / "predictions.jsonl"
        write_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
    return out
