"""`tunekit serve` under steady traffic, with bad requests mixed in (issue 26).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve_soak.py [--minutes 10] [--load 0.7] [--bad 0.2] [--model DIR]
    make bench-soak

The server runs in this process on a free loopback port (tunekit.serving.server.background) with an
API key. First its capacity is measured: --concurrency clients in a closed loop for --calibrate
seconds (good requests only). Then two soaks of --minutes each, with open-loop (Poisson) arrivals at
--load x that capacity: one of good requests only (the baseline), one where a --bad share of the
arrivals are bad requests, each kind in turn: an oversized body (2 MiB), a seed past 64 bits, 2,000
stop strings, no API key, malformed JSON, and a streamed request whose client disconnects after its
first chunks. A good request is a chat completion of an Alpaca instruction, sampled (temperature
0.7, its own seed), --max-tokens long.

Printed per minute of each soak (minute 1 starts at the soak's first request): good requests done,
errors among them, bad requests and how many did not get a 4xx, the process's RSS, the mean time of a
forward pass (step_ms), the mean rows in a decoding step, the time of a decoding step at the soak's
mix of batch sizes (step_ms_mix: each batch size's mean this minute, weighted by its share of the
whole soak; a step of 12 rows costs more than one of 3, and Poisson arrivals change the mix from
minute to minute), the widest KV cache, and the p50 / p99 latency of the good requests; then the
checks of the issue: no error on a good request, RSS and step time (step_ms_mix) of the last minute
within 10% of the first's, every bad request a 4xx (the disconnects: their rows cancelled), and the
good requests' p99 within 1.5x of the baseline's.
With no --model, the 13.8M-parameter Llama-style model of bench/sft.py (random weights) is built.
Nothing leaves the loopback interface.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import multiprocessing
import os
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not bench/: bench/peft.py would shadow the peft package

import torch  # noqa: E402

from bench.gpu_tools import status_mb  # noqa: E402
from tunekit.serving.server import background  # noqa: E402

DATA = ROOT / "data" / "alpaca" / "alpaca_data_1k.json"
KEY = "soak"
BAD_KINDS = ("oversized", "huge_seed", "many_stops", "no_key", "malformed", "disconnect")


def build_model(workdir: Path) -> Path:
    """bench/sft.py's 13.8M-parameter Llama with its 8k BPE tokenizer, randomly initialised."""
    spec = importlib.util.spec_from_file_location("bench_sft", ROOT / "bench" / "sft.py")
    bench_sft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_sft)
    return bench_sft.build_model(workdir, None)


class Client:
    """Raw HTTP/1.1 requests to the server (one connection each), with their outcome."""

    def __init__(self, url: str, max_tokens: int, prompts: list[str]) -> None:
        address = urlparse(url)
        self.host, self.port, self.path = address.hostname, address.port, address.path
        self.max_tokens, self.prompts = max_tokens, prompts

    def request(self, body: bytes, key: str | None = KEY, timeout: float = 300) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        try:
            connection.request("POST", f"{self.path}/chat/completions", body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        except (ConnectionError, http.client.HTTPException):  # the server answered early and closed
            return 0, b""
        finally:
            connection.close()

    def body(self, **extra: object) -> dict:
        prompt = random.choice(self.prompts)
        return {"model": "soak", "messages": [{"role": "user", "content": prompt}], "max_tokens": self.max_tokens,
                "temperature": 0.7, "seed": random.randrange(2**31), **extra}

    def good(self) -> tuple[bool, float]:
        start = time.perf_counter()
        status, raw = self.request(json.dumps(self.body()).encode())
        ok = status == 200 and json.loads(raw)["choices"][0]["finish_reason"] in ("stop", "length")
        return ok, time.perf_counter() - start

    def bad(self, kind: str) -> int:
        """The status a bad request got (0 for a disconnect, which gets none)."""
        if kind == "oversized":
            return self.request(json.dumps(self.body(messages=[{"role": "user", "content": "x" * (2 << 20)}])).encode())[0]
        if kind == "huge_seed":
            return self.request(json.dumps(self.body(seed=2**70)).encode())[0]
        if kind == "many_stops":
            return self.request(json.dumps(self.body(stop=["y" * 200] * 2000)).encode())[0]
        if kind == "no_key":
            return self.request(json.dumps(self.body()).encode(), key=None)[0]
        if kind == "malformed":
            return self.request(b'{"model": "soak", "messages": [', key=KEY)[0]
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            connection.request("POST", f"{self.path}/chat/completions", json.dumps(self.body(stream=True)).encode(),
                               {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
            response = connection.getresponse()
            for _ in range(3):  # the first chunks, then the client is gone
                response.fp.readline()
        finally:
            connection.close()
        return 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def rss_mb() -> float:
    now = status_mb("VmRSS")
    return float("nan") if now is None else now


def prompts() -> list[str]:
    return [(r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")) for r in json.loads(DATA.read_text())]


def closed_loop(url: str, max_tokens: int, concurrency: int, seconds: float, out: str) -> None:
    """Client process: `concurrency` clients, each sending good requests one after another."""
    client, done = Client(url, max_tokens, prompts()), []
    stop = time.monotonic() + seconds

    def loop() -> None:
        while time.monotonic() < stop:
            done.append(client.good()[0])

    start = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(loop)
    Path(out).write_text(json.dumps({"done": len(done), "failed": done.count(False), "seconds": time.monotonic() - start}))


def open_loop(url: str, max_tokens: int, rate: float, bad_share: float, seconds: float, seed: int, out: str) -> None:
    """Client process: Poisson arrivals for `seconds`, good requests at `rate` per second and bad ones
    on top (a `bad_share` of all arrivals, each kind in turn); writes what each got, and when."""
    random.seed(seed)
    client, events, lock = Client(url, max_tokens, prompts()), [], threading.Lock()

    def good() -> None:
        ok, latency = client.good()
        with lock:
            events.append((time.time(), "good", ok, latency))

    def bad(kind: str) -> None:
        status = client.bad(kind)
        with lock:
            events.append((time.time(), kind, status, 0.0))

    end, sent = time.monotonic() + seconds, 0
    next_at = time.monotonic()
    with ThreadPoolExecutor(512) as pool:
        while next_at < end:
            time.sleep(max(0.0, next_at - time.monotonic()))
            if random.random() < bad_share:
                pool.submit(bad, BAD_KINDS[sent % len(BAD_KINDS)])
                sent += 1
            else:
                pool.submit(good)
            next_at += random.expovariate(rate / (1 - bad_share))
    Path(out).write_text(json.dumps(events))


def in_process(target: object, *args: object) -> None:
    """Run a client in a process of its own, so that its threads' memory and its share of the GIL are
    not counted as the server's."""
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    process.join()
    assert process.exitcode == 0, f"the client process failed ({process.exitcode})"


class Sampler(threading.Thread):
    """The server process's RSS and decoding steps, once a minute while a soak runs."""

    KEYS = ("steps", "step_seconds", "rows_cancelled")

    def __init__(self, engine: object) -> None:
        super().__init__(daemon=True)
        self.engine, self.marks, self.done = engine, [], threading.Event()

    def mark(self) -> None:
        self.marks.append({"at": time.time(), "rss": rss_mb(), "widest": self.engine.stats["widest"],
                           "decode_steps": dict(self.engine.decode_steps),
                           "decode_seconds": dict(self.engine.decode_seconds),
                           **{k: self.engine.stats[k] for k in self.KEYS}})
        self.engine.stats["widest"] = 0

    def run(self) -> None:
        batches = self.engine.stats["batches"]  # minute 1 starts with the first request, not the client's start-up
        while self.engine.stats["batches"] == batches and not self.done.wait(0.05):
            pass
        self.mark()
        while not self.done.wait(60):
            self.mark()
        self.mark()


def soak(url: str, engine: object, args: argparse.Namespace, rate: float, bad_share: float,
         out: Path) -> tuple[list[dict], list[float]]:
    """One soak: its rows minute by minute, and the latencies of all its good requests."""
    sampler = Sampler(engine)
    sampler.start()
    in_process(open_loop, url, args.max_tokens, rate, bad_share, 60 * args.minutes, args.seed, str(out))
    sampler.done.set()
    sampler.join()
    events, marks = json.loads(out.read_text()), sampler.marks
    mix = decode_mix(decode_delta(marks[0], marks[-1]))
    rows = []
    for number, (first, last) in enumerate(zip(marks, marks[1:]), start=1):
        here = [e for e in events if first["at"] <= e[0] < last["at"]]
        good = [(ok, t) for _, kind, ok, t in here if kind == "good"]
        bad = [(kind, status) for _, kind, status, _ in here if kind != "good"]
        latencies = [t for ok, t in good if ok]
        steps = last["steps"] - first["steps"]
        decoding = decode_delta(first, last)
        rows.append({
            "minute": number if number <= args.minutes else "drain", "good": len(good), "good_errors": sum(not ok for ok, _ in good), "bad": len(bad),
            "bad_not_4xx": sum(kind != "disconnect" and not 400 <= status < 500 for kind, status in bad),
            "disconnects": sum(kind == "disconnect" for kind, _ in bad),
            "rows_cancelled": last["rows_cancelled"] - first["rows_cancelled"], "rss_mb": round(last["rss"], 1),
            "step_ms": round(1000 * (last["step_seconds"] - first["step_seconds"]) / max(steps, 1), 2),
            "rows_per_step": round(rows_per_step(decoding), 2), "step_ms_mix": round(1000 * mixed_step(decoding, mix), 2),
            "widest": last["widest"], "p50_s": round(percentile(latencies, 0.5), 3),
            "p99_s": round(percentile(latencies, 0.99), 3),
        })
    return rows, [t for _, kind, ok, t in events if kind == "good" and ok]


def decode_delta(first: dict, last: dict) -> dict[int, tuple[int, float]]:
    """Decoding steps between two marks, by rows in the step: (steps, seconds)."""
    delta = {}
    for rows, count in last["decode_steps"].items():
        steps = count - first["decode_steps"].get(rows, 0)
        if steps:
            delta[rows] = (steps, last["decode_seconds"][rows] - first["decode_seconds"].get(rows, 0.0))
    return delta


def decode_mix(delta: dict[int, tuple[int, float]]) -> dict[int, float]:
    """The share of decoding steps with each number of rows (of the whole soak's decode_delta)."""
    total = sum(steps for steps, _ in delta.values())
    return {rows: steps / total for rows, (steps, _) in delta.items()}


def rows_per_step(delta: dict[int, tuple[int, float]]) -> float:
    return sum(rows * steps for rows, (steps, _) in delta.items()) / max(sum(s for s, _ in delta.values()), 1)


def mixed_step(delta: dict[int, tuple[int, float]], mix: dict[int, float]) -> float:
    """Seconds of a decoding step at the whole soak's mix of batch sizes: each batch size's mean step
    time in this minute (its decode_delta), weighted by its share of the soak (sizes this minute did
    not run are left out and the weights of the others renormalised). Unlike the plain mean it does
    not move with how many rows the arrivals happened to put in each step, only with how fast a step
    of a given size is."""
    weights = {rows: mix.get(rows, 0.0) for rows in delta}
    total = sum(weights.values())
    if not total:
        return float("nan")
    return sum(weights[rows] * seconds / steps for rows, (steps, seconds) in delta.items()) / total


def show(name: str, result: tuple[list[dict], list[float]]) -> dict:
    rows, latencies = result
    print(f"\n{name}")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    total = {key: sum(row[key] for row in rows) for key in ("good", "good_errors", "bad", "bad_not_4xx",
                                                            "disconnects", "rows_cancelled")}
    full = [row for row in rows if row["minute"] != "drain"]  # not the answers to the last arrivals
    summary = {**total, "p50_s": round(percentile(latencies, 0.5), 3), "p99_s": round(percentile(latencies, 0.99), 3),
               "rss_last_over_first": round(full[-1]["rss_mb"] / full[0]["rss_mb"], 3),
               "step_last_over_first": round(full[-1]["step_ms"] / full[0]["step_ms"], 3),
               "step_mix_last_over_first": round(full[-1]["step_ms_mix"] / full[0]["step_ms_mix"], 3)}
    print(json.dumps(summary), flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=int, default=10, help="length of each of the two soaks")
    parser.add_argument("--load", type=float, default=0.7, help="arrival rate as a share of the measured capacity")
    parser.add_argument("--bad", type=float, default=0.2, help="share of the arrivals that are bad requests")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients while measuring capacity")
    parser.add_argument("--calibrate", type=float, default=60, help="seconds of the capacity measurement")
    parser.add_argument("--model", help="run folder or model folder (default: build the 13.8M bench model)")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        target = args.model or str(build_model(Path(tmp)))
        with background(target, api_key=KEY, model_id="soak", max_batch=64) as (url, engine):
            Client(url, args.max_tokens, prompts()).good()  # warm-up
            in_process(closed_loop, url, args.max_tokens, args.concurrency, args.calibrate, f"{tmp}/capacity.json")
            measured = json.loads(Path(f"{tmp}/capacity.json").read_text())
            assert measured["failed"] == 0, "a good request failed while measuring capacity"
            capacity = measured["done"] / measured["seconds"]
            rate = args.load * capacity
            print(f"capacity {capacity:.2f} good requests/s ({args.concurrency} closed-loop clients, max_tokens "
                  f"{args.max_tokens}); good arrivals at {rate:.2f}/s for {args.minutes} min per soak; "
                  f"load {os.getloadavg()[0]:.2f} (1-min), torch threads {torch.get_num_threads()}", flush=True)
            plain = show("soak without bad requests (baseline)", soak(url, engine, args, rate, 0.0, Path(tmp, "a.json")))
            mixed = show(f"soak with {args.bad:.0%} bad requests", soak(url, engine, args, rate, args.bad,
                                                                          Path(tmp, "b.json")))
    ratio = mixed["p99_s"] / plain["p99_s"]
    checks = {
        "no error on a good request": plain["good_errors"] == mixed["good_errors"] == 0,
        "RSS of the last minute within 10% of the first": abs(mixed["rss_last_over_first"] - 1) <= 0.10,
        "step time (at the soak's mix of batch sizes) of the last minute within 10% of the first":
            abs(mixed["step_mix_last_over_first"] - 1) <= 0.10,
        "every bad request a 4xx": mixed["bad_not_4xx"] == 0,
        "every disconnected stream's rows cancelled": mixed["rows_cancelled"] >= mixed["disconnects"],
        f"p99 within 1.5x of the baseline's ({ratio:.2f}x)": ratio <= 1.5,
    }
    print()
    for check, passed in checks.items():
        print(f"{'ok  ' if passed else 'FAIL'} {check}")


if __name__ == "__main__":
    main()
