"""Peak memory (RSS) and step time of LoRA against full fine-tuning, same model, data and steps.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/peft.py [--steps 40]

Each variant is a separate `tunekit` process (so peak RSS is its own), run one after the other:
all-MiniLM-L6-v2 on SST-2 (batch 32), full fine-tuning vs `peft.method=lora` (r 16, all-linear),
and QLoRA (4-bit NF4 base). Peak RSS is sampled every 20 ms with psutil; the step time is the
Trainer's train_runtime / steps. Prints each figure and the ratios against full fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
TUNEKIT = [sys.executable, "-m", "tunekit"]


def measure(label: str, extra: list[str], steps: int, workdir: Path) -> dict[str, float]:
    out = workdir / label
    command = [*TUNEKIT, "classify", "classify/minilm-sst2", "-o", str(out),
               "--set", f"train.max_steps={steps}", "--set", "train.save_strategy=no", "--set", "train.eval_strategy=no",
               "--set", "data.train_limit=4000", "--set", "data.eval_limit=64", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watched = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.02)
    if process.returncode != 0:
        raise SystemExit(f"{label} failed:\n{process.stderr.read()[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    runtime = next(r["train_runtime"] for r in records if "train_runtime" in r)
    info = json.loads((out / "run.json").read_text())
    return {"peak_rss_mb": peak / 2**20, "step_s": runtime / steps,
            "trainable": info["trainable_params"], "total": info["total_params"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    steps = parser.parse_args().steps
    variants = {
        "full": [],
        "lora": ["--set", "peft.method=lora"],
        "qlora-4bit": ["--set", "peft.method=lora", "--set", "peft.quantize=4bit"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        results = {label: measure(label, extra, steps, Path(tmp)) for label, extra in variants.items()}
    full = results["full"]
    print(f"all-MiniLM-L6-v2 classify, SST-2, batch 32, {steps} steps, one process each")
    for label, r in results.items():
        print(f"{label:11} trainable {r['trainable']:>10,} / {r['total']:,} ({100 * r['trainable'] / r['total']:5.2f}%)  "
              f"peak RSS {r['peak_rss_mb']:7.0f} MB ({r['peak_rss_mb'] / full['peak_rss_mb']:.2f}x full)  "
              f"step {r['step_s']:.3f} s ({r['step_s'] / full['step_s']:.2f}x full)")


if __name__ == "__main__":
    main()
