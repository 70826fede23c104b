"""Where the GPU time of an SFT step goes: tunekit's trainer against the plain loop, under torch.profiler.

    python bench/gpu_profile.py [--steps 4] [--rows 18] [--tiny]

bench/gpu.py's first H200 run (bench/README.md, GPU) measured tunekit's SFT step at a third of the
plain loop's tokens/s on the same packed rows and model. This runs both rows of that table again, at
the same shape (Qwen2.5-0.5B, 8 x 2048, bf16 autocast), for a few steps inside torch.profiler, and
prints for each the ops that take the most device time (or CPU time without CUDA) and the profiled
seconds per step, so that the difference can be pinned on a kernel, a host sync or the CPU side.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # not bench/: bench/peft.py would shadow peft
from bench.gpu import FULL, TINY, Bench  # noqa: E402
from bench.gpu_tools import peak_tflops, synthetic  # noqa: E402


def profiled(name: str, run, rows: int) -> None:  # noqa: ANN001 (a Bench method)
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        figures = run()
    seconds = time.perf_counter() - start
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"## {name}: {figures}  (profiled wall {seconds:.1f} s, warm-up included)", flush=True)
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60), flush=True)
    if cuda:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=60),
              flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps after 2 warm-up steps (1 with --tiny)")
    parser.add_argument("--rows", type=int, default=18, help="ops listed per table")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a check that it runs)")
    options = parser.parse_args(argv)
    plan = dataclasses.replace(TINY if options.tiny else FULL, warmup=1 if options.tiny else 2, steps=options.steps)
    peak, _ = peak_tflops(None)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data, tokenizer_dir, conversations = synthetic(work, plan)
        bench = Bench(plan, work, data, tokenizer_dir, conversations, peak)
        profiled("sft/tunekit", lambda: bench.tunekit_sft(bench.sft_config(plan.qwen)), options.rows)
        profiled("sft/plain-loop", bench.plain_loop, options.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
