"""`tunekit serve` under load: 64 concurrent chat requests against the same 64 sent one at a time.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve.py [--requests 64] [--max-tokens 64] [--model runs/sft-alpaca] [--threads N]

The server runs in this process on a free loopback port (tunekit.serving.server.background); requests go
through the official `openai` client. The prompts are the first N Alpaca instructions, greedy, each
asking for --max-tokens. Both passes send the same requests; the script checks that none is lost and
every response is complete (finish_reason stop or length, and a length answer has exactly max_tokens
tokens), then prints completion tokens/s of each pass, their ratio, and p50/p99 latency.
With no --model, the 13.8M-parameter Llama-style model of bench/sft.py (random weights) is built.
Bounded: N requests, each with a 300 s client timeout; nothing leaves the loopback interface.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not bench/: bench/peft.py would shadow the peft package

import openai  # noqa: E402
import torch  # noqa: E402

from tunekit.serving.server import background  # noqa: E402

DATA = ROOT / "data" / "alpaca" / "alpaca_data_1k.json"


def build_model(workdir: Path) -> Path:
    """bench/sft.py's 13.8M-parameter Llama with its 8k BPE tokenizer, randomly initialised."""
    spec = importlib.util.spec_from_file_location("bench_sft", ROOT / "bench" / "sft.py")
    bench_sft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_sft)
    return bench_sft.build_model(workdir, None)


def send(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> tuple[float, object]:
    start = time.perf_counter()
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=max_tokens, temperature=0)
    return time.perf_counter() - start, reply


def check(replies: list, max_tokens: int) -> int:
    """Every reply complete; returns the completion tokens of all."""
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason in ("stop", "length"), choice.finish_reason
        assert choice.finish_reason == "stop" or reply.usage.completion_tokens == max_tokens
    return sum(r.usage.completion_tokens for r in replies)


def run_pass(url: str, model: str, prompts: list[str], max_tokens: int, workers: int) -> dict:
    client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=300)
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda p: send(client, model, p, max_tokens), prompts))
    wall = time.perf_counter() - start
    assert len(results) == len(prompts), "a request was lost"
    latencies = sorted(t for t, _ in results)
    tokens = check([r for _, r in results], max_tokens)
    return {
        "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(latencies), "p99_s": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        "texts": [r.choices[0].message.content for _, r in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", help="run folder or model folder (default: build the 13.8M bench model)")
    parser.add_argument("--threads", type=int, help="torch threads (on a loaded machine 1 avoids OpenMP spin-waits)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = json.loads(DATA.read_text())[: args.requests]
    prompts = [(r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")) for r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        target = args.model or str(build_model(Path(tmp)))
        with background(target, model_id="bench", max_batch=args.requests) as (url, engine):
            run_pass(url, "bench", prompts[:2], args.max_tokens, 1)  # warm-up
            one = run_pass(url, "bench", prompts, args.max_tokens, 1)
            print(f"one at a time: {one['wall_s']:.1f} s", file=sys.stderr, flush=True)
            engine.stats["largest_batch"] = 0
            many = run_pass(url, "bench", prompts, args.max_tokens, len(prompts))
            largest = engine.stats["largest_batch"]
    same = sum(a == b for a, b in zip(one["texts"], many["texts"]))
    print(f"{len(prompts)} requests x max_tokens {args.max_tokens}, greedy; load: {os.getloadavg()[0]:.2f} "
          f"(1-min), torch threads {torch.get_num_threads()}")
    print("| | completion tokens | wall s | tokens/s | p50 latency s | p99 latency s |")
    print("|---|---|---|---|---|---|")
    for name, r in (("one at a time", one), (f"{len(prompts)} concurrent", many)):
        print(f"| {name} | {r['tokens']} | {r['wall_s']:.1f} | {r['tokens_per_s']:.0f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} |")
    print(f"throughput ratio concurrent / one at a time: {many['tokens_per_s'] / one['tokens_per_s']:.2f}x "
          f"(up to {largest} sequences decoded together); none lost, all complete; "
          f"{same}/{len(prompts)} greedy answers identical in both passes")


if __name__ == "__main__":
    main()
