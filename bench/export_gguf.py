"""Figures of `tunekit export --format gguf` (README, section `tunekit export`): wall time and peak
memory of each export, and how close what transformers' own GGUF loader reads back is to the run's
model: logits (largest difference relative to the largest logit) on a few prompts, and greedy
answers on held-out prompts. Not run by the test suite.

    python bench/export_gguf.py RUN [--prompts data/arith/heldout.jsonl] [--n 100] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# `python bench/export_gguf.py` puts bench/ first on the path, where bench/peft.py hides the peft package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
TYPES = ("f32", "f16", "bf16", "q8_0")


def timed_export(run: Path, kind: str, out: Path) -> dict:
    """One `tunekit export` in a child process: its wall time and peak resident memory."""
    command = [sys.executable, "-m", "tunekit", "export", str(run), "--type", kind, "--out", str(out), "--overwrite"]
    started = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.monotonic() - started
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed: {child.stderr.read().decode()[-500:]}")
    return {"type": kind, "seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "file_mb": round(out.stat().st_size / 2**20, 1), "command": " ".join(["tunekit", *command[3:]])}


def relative_logit_error(model, other, tokenizer, conversations) -> float:
    import torch

    worst = 0.0
    for conversation in conversations:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            a, b = model(ids).logits, other(ids).logits
        worst = max(worst, ((a - b).abs().max() / a.abs().max()).item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--prompts", type=Path, default=Path("data/arith/heldout.jsonl"))
    parser.add_argument("--n", type=int, default=100, help="held-out prompts for the greedy comparison")
    parser.add_argument("--out", type=Path, default=Path("/tmp/tunekit-export-bench"))
    parser.add_argument("--greedy", nargs="*", default=["q8_0"], help="types whose greedy answers are compared")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from tunekit.generation import generate, load_chat_model, settings_with

    args.out.mkdir(parents=True, exist_ok=True)
    rows = [timed_export(args.run, kind, args.out / f"{args.run.name}-{kind}.gguf") for kind in TYPES]
    model, tokenizer, _ = load_chat_model(str(args.run), "bench")
    model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    prompts = [json.loads(line)["prompt"] for line in args.prompts.read_text().splitlines()[: args.n]]
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    greedy = settings_with({}, temperature=0.0, max_new_tokens=32)
    reference = [r["response"] for r in generate(model, tokenizer, conversations, greedy)] if args.greedy else []
    for row in rows:
        path = args.out / f"{args.run.name}-{row['type']}.gguf"
        back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        row["logits_rel_error"] = relative_logit_error(model, back, tokenizer, conversations[:8])
        if row["type"] in args.greedy:
            answers = [r["response"] for r in generate(back, tokenizer, conversations, greedy)]
            row["greedy_same"] = f"{sum(a == b for a, b in zip(answers, reference))}/{len(reference)}"
        print(json.dumps(row), flush=True)
    print("\n| type | file | export time | peak memory | logits (relative) | same greedy answers |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['type']} | {row['file_mb']} MB | {row['seconds']} s | {row['peak_rss_mb']} MB | "
              f"{row['logits_rel_error']:.1e} | {row.get('greedy_same', '-')} |")


if __name__ == "__main__":
    main()
