"""The least memory any trainer needs for bench/real.py's steps: a floor under every variant's peak RSS.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/memory_floor.py [--data arith alpaca] [--methods full lora]
        [--batch 8] [--max-length 256] [--warmup 2] [--steps 6] [--checkpointing off on]
        [--lora-dropout 0.0] [--model DIR] [--against real.json]

The same model, rows, batches and settings as bench/real.py (its options mean the same here). For
each setting, in a process of its own, the parts that must be resident at once somewhere in a step:
  imports      RSS after importing torch, transformers' model classes and (LoRA) peft, before
               anything else: the least a Python process training a Hugging Face model holds;
  weights      every parameter and buffer (unique storages: tied embeddings once), as the forward
               pass reads them all;
  optimizer    AdamW's two moments of every trained parameter (float32);
  gradients    one per trained parameter: all exist together before the step, since clipping at
               1.0 (a matched setting) needs their global norm before any update;
  activations  what autograd keeps for the backward pass from the decoder body's forward pass on
               the widest batch (saved-tensor hooks, unique storages, parameters left out); with
               checkpointing, the kept layer inputs plus one layer's share of the full set (the
               layer being recomputed; layers are alike, so the full set / layers).
floor = imports + weights + optimizer + max(activations, gradients): at the end of the forward pass
the activations are alive and no gradient yet, at the end of the backward pass the reverse. The LM
head, its loss, the backward pass's own temporaries and the allocator's free pages come on top, so
a trainer's peak can only be higher. With `--against` (bench/real.py's --json output) each row also
shows tunekit's and TRL's measured peaks at the same setting and the floor over TRL's: above 0.5, no
trainer can peak at half of TRL's memory there.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if Path(sys.path[0]).resolve() == ROOT / "bench":  # run as a script: bench/peft.py would shadow peft
    sys.path[0] = str(ROOT)

from bench.real import DATA, LORA, Plan, base_model, in_child, rows_file, tokenized_rows  # noqa: E402

MB = 2**20


def rss_mb() -> float:
    """This process's resident memory now (VmRSS), in MiB."""
    from bench.gpu_tools import status_mb

    now = status_mb("VmRSS")
    if now is None:
        raise OSError("no VmRSS in /proc/self/status: the floor needs Linux")
    return now


def widest_batch(rows: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """The batch of the run with the most padded positions, padded on the right as the trainers do."""
    import torch

    batches = [rows[i * plan.batch : (i + 1) * plan.batch] for i in range(plan.warmup + plan.steps)]
    widest = max(batches, key=lambda batch: len(batch) * max(len(r["input_ids"]) for r in batch))
    width = max(len(r["input_ids"]) for r in widest)
    ids = torch.zeros(len(widest), width, dtype=torch.long)
    mask = torch.zeros(len(widest), width, dtype=torch.long)
    for i, row in enumerate(widest):
        ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        mask[i, : len(row["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask}


def saved_bytes(parameters: Iterable[Any], forward: Callable[[], Any]) -> int:
    """Bytes autograd keeps for the backward pass of `forward()` (unique storages, `parameters` left out)."""
    import torch

    left_out = {p.untyped_storage().data_ptr() for p in parameters}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in left_out:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(kept.values())


def child(plan_file: Path) -> None:
    """`--one floor`: the parts of the floor for one plan, as the last line printed (JSON)."""
    import torch
    from transformers import AutoModelForCausalLM

    plan = Plan(**json.loads(plan_file.read_text()))
    if plan.method == "lora":
        from peft import LoraConfig, get_peft_model
    imports = rss_mb()
    torch.set_num_threads(plan.threads)
    rows = json.loads(rows_file(plan).read_text())
    model = AutoModelForCausalLM.from_pretrained(plan.base, dtype=torch.float32)
    body = model.model
    if plan.method == "lora":
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", lora_dropout=plan.lora_dropout, **LORA))
    model.train()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    trained = sum(p.nbytes for p in model.parameters() if p.requires_grad)
    batch = widest_batch(rows, plan)

    def forward() -> Any:
        return body(**batch, use_cache=False)

    activations = saved_bytes(model.parameters(), forward)
    if plan.checkpointing:  # the kept layer inputs, and one layer recomputed in the backward pass
        share = activations / len(body.layers)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        activations = saved_bytes(model.parameters(), forward) + share
    parts = {"imports": imports, "weights": sum(storages.values()) / MB, "optimizer": 2 * trained / MB,
             "gradients": trained / MB, "activations": activations / MB}
    parts["floor"] = parts["imports"] + parts["weights"] + parts["optimizer"] + max(parts["activations"],
                                                                                     parts["gradients"])
    print(json.dumps({**parts, "positions": batch["input_ids"].numel(), "rows": batch["input_ids"].shape[0]}),
          flush=True)


def measured_peaks(path: Path | None, variant: str, lora_dropout: float) -> dict[tuple[str, str, bool], float]:
    """A variant's measured peak RSS per (data, method, checkpointing) in a bench/real.py --json file, of its
    LoRA runs only those with `lora_dropout` (a file older than that field: dropout 0, real.py's default)."""
    if path is None:
        return {}
    runs = json.loads(path.read_text())["runs"]
    return {(r["data"], r["method"], r["checkpointing"]): r["peak_rss_mb"] for r in runs
            if r["variant"] == variant and (r["method"] == "full" or r.get("lora_dropout", 0.0) == lora_dropout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--data", nargs="+", choices=sorted(DATA), default=["arith"])
    parser.add_argument("--methods", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--against", type=Path, default=None, help="bench/real.py's --json output: tunekit's and TRL's peaks")
    parser.add_argument("--one", choices=["floor"], help=argparse.SUPPRESS)
    parser.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.one:
        child(options.plan)
        return
    tunekit, trl = (measured_peaks(options.against, v, options.lora_dropout) for v in ("tunekit", "trl"))
    print("| data | method | LoRA dropout | checkpointing | widest batch | imports | weights | optimizer | gradients "
          "| activations | floor MB | tunekit's peak MB | TRL's peak MB | floor / TRL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        base = str(base_model(Path(tmp), options.model))
        for data in options.data:
            plan = Plan(data, "full", base, tmp, options.batch, options.max_length, options.warmup, options.steps,
                        1e-4, options.threads, lora_dropout=options.lora_dropout)
            rows_file(plan).write_text(json.dumps(tokenized_rows(plan)))
            for method in options.methods:
                for checkpointing in [c == "on" for c in options.checkpointing]:
                    plan.method, plan.checkpointing = method, checkpointing
                    plan_file = Path(tmp) / "plan.json"
                    f = in_child(__file__, "floor", plan, plan_file, f"floor {data} {method}")
                    ours, against = tunekit.get((data, method, checkpointing)), trl.get((data, method, checkpointing))
                    shown = (f"{ours:.0f}" if ours else "-") + " | "
                    shown += f"{against:.0f} | {f['floor'] / against:.2f}" if against else "- | -"
                    print(f"| {data} | {method} | {plan.lora_dropout if method == 'lora' else '-'} | "
                          f"{'on' if checkpointing else 'off'} | {f['rows']} x {f['positions'] // f['rows']} | "
                          + " | ".join(f"{f[k]:.0f}" for k in ("imports", "weights", "optimizer", "gradients",
                                                               "activations", "floor"))
                          + f" | {shown} |", flush=True)


if __name__ == "__main__":
    main()
