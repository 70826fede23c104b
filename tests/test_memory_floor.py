"""bench/memory_floor.py: what autograd keeps, counted once per storage, and
the widest batch of a run."""

from __future__ import annotations

import torch

from bench.memory_floor import saved_bytes, widest_batch
from bench.real import Plan


def test_saved_bytes_count_each_kept_storage_once():
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 4)
    # Linear keeps its input (48 bytes) for its weight's gradient; ReLU keeps its output [3, 8] (96
    # bytes), which the second Linear keeps as its input too: the same storage, counted once
    assert saved_bytes(body.parameters(), lambda: body(x)) == 3 * 4 * 4 + 3 * 8 * 4
    # frozen weights: nothing needs the first input any more, the ReLU's output is still kept once
    body[0].requires_grad_(False)
    assert saved_bytes(body.parameters(), lambda: body(x)) == 3 * 8 * 4


def test_the_widest_batch_of_the_run_is_padded_on_the_right():
    rows = [{"input_ids": list(range(1, n + 1))} for n in (2, 3, 5, 1, 4, 4)]
    plan = Plan("arith", "lora", "base", "work", batch=2, max_length=8, warmup=1, steps=2, lr=1e-4, threads=1)
    batch = widest_batch(rows, plan)  # batches (2, 3), (5, 1), (4, 4): 2 x 5 positions is the most
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [1, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
