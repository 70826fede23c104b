"""bench/gpu.py --tiny: every section of the GPU benchmark runs on the CPU with tiny shapes, so the
script a GPU session runs once cannot rot between sessions."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import torch
from conftest import ROOT

# The figures each row must carry (finite); the table's other columns are optional.
EXPECTED = {
    ("sft", "tunekit"): ("tokens_per_s", "mfu", "peak_gib", "step_s"),
    ("sft", "trl-defaults"): ("tokens_per_s", "mfu", "peak_gib", "step_s"),
    ("sft", "plain-loop"): ("tokens_per_s", "mfu", "peak_gib", "step_s"),
    ("loss", "liger"): ("tokens_per_s", "peak_gib"),
    ("peft", "full"): ("tokens_per_s", "mfu", "peak_gib"),
    ("peft", "lora"): ("tokens_per_s", "peak_gib"),
    ("peft", "qlora"): ("tokens_per_s", "peak_gib"),
    ("ppo", "full"): ("step_s", "rollout_tokens_per_s", "peak_gib"),
    ("ppo", "lora"): ("step_s", "rollout_tokens_per_s", "peak_gib"),
    ("attn", "causal"): ("attn_ms",),
    ("attn", "packed-mask"): ("attn_ms",),
    ("attn", "transformers-mask"): (),
}


def test_tiny_gpu_bench_fills_every_row(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["section"], r["row"]): r for r in result["rows"]}
    assert set(EXPECTED) <= set(rows), f"missing rows: {set(EXPECTED) - set(rows)}"
    for key, figures in EXPECTED.items():
        row = rows[key]
        if row["status"] == "skipped" and row.get("needs_cuda") and not torch.cuda.is_available():
            assert row["note"], key  # says why (Liger's kernels need CUDA)
            continue
        assert row["status"] == "ok", (key, row["note"])
        for name in figures:
            assert isinstance(row.get(name), float) and math.isfinite(row[name]) and row[name] > 0, (key, name, row)
    assert not [r for r in result["rows"] if r["status"] in ("failed", "timeout")]
    assert result["env"]["tiny"] is True and result["env"]["versions"]["torch"]
    assert "sft tunekit / trl-defaults tok/s" in result["ratios"]
    assert "| sft/tunekit |" in done.stdout  # the printed table


def test_tiny_gpu_profile_lists_both_rows():
    """bench/gpu_profile.py --tiny: both SFT rows run under the profiler and each prints its op table."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_profile.py"), "--tiny", "--steps", "1",
                           "--rows", "5"], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ("sft/tunekit", "sft/plain-loop"):
        assert f"## {row}: {{'tokens_per_s'" in done.stdout, done.stdout[-2000:]
    assert done.stdout.count("Self CPU time total") >= 2
