"""What is here: shipped recipes, finished runs, and the machine (`tunekit recipes`, `runs`, `doctor`)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

from tunekit.errors import UserError
from tunekit.jsontypes import JsonObject

# The metric a run is best summarised by, per method (the first one eval.json has).
KEY_METRICS = ("accuracy", "f1", "reward_after", "perplexity", "loss")
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "tokenizers")


def recipe_rows() -> list[dict[str, str]]:
    from tunekit.config import read_yaml_mapping, shipped_recipes

    return [{"name": name, "description": read_yaml_mapping(path).get("description", ""), "path": str(path)}
            for name, path in shipped_recipes().items()]


def run_rows(folder: Path) -> list[JsonObject]:
    """One row per run folder (a folder with run.json) under `folder`, newest first."""
    rows = []
    for info_path in sorted(folder.glob("*/run.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        info = json.loads(info_path.read_text())
        metrics_path = info_path.parent / "eval.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        key = next((k for k in KEY_METRICS if k in metrics), None)
        rows.append({
            "run": str(info_path.parent), "method": info.get("method"), "base_model": info.get("base_model"),
            "status": info.get("status"), "metric": key, "value": metrics.get(key) if key else None,
            "wall_time_s": info.get("wall_time_s"),
            "exports": ", ".join(f"{e.get('format')}:{e.get('type')}" for e in info.get("exports") or []) or None,
        })
    return rows


def doctor_report() -> JsonObject:
    """Versions, devices and what they support, and whether the Hub can be reached."""
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "cpu_threads": torch.get_num_threads(),
        "cuda": cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "hub": hub_status(),
    }


def hub_status() -> str:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return "offline (HF_HUB_OFFLINE is set): models and data must be local"
    import urllib.request

    try:
        urllib.request.urlopen("https://huggingface.co/api/models?limit=1", timeout=3)
        return "reachable"
    except OSError as err:
        return f"unreachable ({type(err).__name__}); set HF_HUB_OFFLINE=1 to skip the wait"


def table(rows: list[JsonObject], columns: list[str]) -> str:
    """A plain aligned text table (the --json flag prints the rows instead)."""
    cells = [[format_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def format_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def copy_recipe(name: str, dest: Path) -> Path:
    """`tunekit recipes cp`: a shipped recipe copied to start your own from (never overwrites)."""
    from tunekit.config import find_recipe

    source = find_recipe(name)
    target = dest / source.name if dest.is_dir() else dest
    if target.exists():
        raise UserError(f"{target}: exists; choose another destination")
    target.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    return target


def doctor_lines(report: JsonObject) -> str:
    """The doctor report as aligned `key  value` lines."""
    lines = []
    for key, value in report.items():
        shown = ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else value
        lines.append(f"{key:<12} {shown}")
    return "\n".join(lines)
