"""Measuring helpers of bench/gpu.py: time budgets, token counting, step timing, peak memory,
the GPU's peak rate, synthetic data and models, one attention call, and the table."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak (TFLOP/s) by GPU name, from the vendors' datasheets (SXM parts; H200 = H100 rates).
PEAKS = (("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4))


# ---------------------------------------------------------------------------------------------
# Measuring


class SectionTimeout(Exception):
    pass


class Refused(Exception):
    """A kernel forced on an input it does not take: a finding for the table, not a failure."""


@contextlib.contextmanager
def time_budget(seconds: float) -> Any:
    """Raise SectionTimeout in this (main) thread once `seconds` have passed."""
    def expire(signum: int, frame: Any) -> None:
        raise SectionTimeout(f"time budget of {seconds:.0f} s spent")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def failure(err: BaseException) -> str:
    """One line for the table: the exception's type and the first line of its message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:  # "5" resets the peak resident set size (VmHWM) of this process (Linux)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def status_mb(field: str) -> float | None:
    """One memory figure of this process from /proc/self/status (VmRSS: resident now, VmHWM: its
    peak), in MiB; None where there is no such file or field (not Linux)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith(f"{field}:")), None)


def peak_gib() -> float:
    """Peak GPU memory allocated since reset_peak (CPU: peak resident set size of the process)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    peak = status_mb("VmHWM")
    if peak is not None:
        return peak / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Counter:
    """Wraps a collator: real (non-pad) tokens of each batch, in the order the batches are made.
    Synthetic text never produces the pad token, so `input_ids != pad` is exactly the real tokens."""

    def __init__(self, collate: Any, pad_id: int) -> None:
        self.collate, self.pad_id, self.tokens = collate, pad_id, []

    def __call__(self, rows: list[Any]) -> Any:
        batch = self.collate(rows)
        self.tokens.append(int((batch["input_ids"] != self.pad_id).sum()))
        return batch


def step_timer(warmup: int) -> Any:
    """A TrainerCallback that records the time between the end of step `warmup` and the last step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        start = end = None

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == warmup:
                sync()
                self.start = time.perf_counter()
            elif state.global_step == state.max_steps:
                sync()
                self.end = time.perf_counter()

    return StepTimer()


def throughput(counter: Counter, seconds: float, plan: Any, params: int, peak: float) -> dict[str, float]:
    tokens = sum(counter.tokens[plan.warmup : plan.warmup + plan.steps])
    per_s = tokens / seconds
    return {"tokens_per_s": per_s, "step_s": seconds / plan.steps, "mfu": 6 * params * per_s / (peak * 1e12),
            "real_fraction": tokens / (plan.steps * plan.batch * plan.seq)}


def peak_tflops(override: float | None) -> tuple[float, str]:
    """(dense bf16 peak in TFLOP/s, where it came from): --peak-tflops, the GPU's datasheet, or
    on a CPU the measured fp32 rate of a 1024 x 1024 matmul (tiny mode's MFU is only a sanity check)."""
    if override:
        return override, "--peak-tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAKS:
            if key in name:
                return value, f"{key} datasheet, dense bf16"
        return math.nan, f"unknown GPU {name!r}: pass --peak-tflops"
    a = torch.randn(1024, 1024)
    a @ a
    start = time.perf_counter()
    for _ in range(5):
        a @ a
    return 5 * 2 * 1024**3 / (time.perf_counter() - start) / 1e12, "measured CPU fp32 matmul"


# ---------------------------------------------------------------------------------------------
# Synthetic data and models


def synthetic(folder: Path, plan: Any) -> tuple[Path, Path, list[list[dict[str, str]]]]:
    """(prompt/completion jsonl, tokenizer folder, the conversations): random words, lengths
    spread over plan.words so that packing has work to do."""
    from tunekit.data.chat import train_tokenizer

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    lexicon = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(4000)]
    low, high = plan.words
    conversations = []
    for _ in range(plan.rows):
        prompt = " ".join(rng.choices(lexicon, k=rng.randint(max(low // 4, 2), max(high // 4, 3))))
        answer = " ".join(rng.choices(lexicon, k=rng.randint(low, high)))
        conversations.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": c[0]["content"], "completion": c[1]["content"]}) + "\n"
                            for c in conversations))
    tokenizer = train_tokenizer([m["content"] for c in conversations[:400] for m in c], plan.vocab)
    tokenizer.save_pretrained(folder / "tokenizer")
    return data, folder / "tokenizer", conversations


def model_fields(shape: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    return {**shape, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id}


def build_model(fields: dict[str, Any]) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(fields)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(values.pop("model_type"), **values))


def count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def free(*objects: Any) -> None:
    for obj in objects:
        del obj
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def attention_call(q: Any, mask: Any, backends: Any) -> float:
    """Median seconds of one attention forward + backward, with the given SDPA backends (None: torch's choice)."""
    import statistics

    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    def once() -> float:
        sync()
        start = time.perf_counter()
        kwargs = {"is_causal": True} if mask is None else {"attn_mask": mask}
        sdpa(q, q, q, **kwargs).sum().backward()
        sync()
        return time.perf_counter() - start

    with sdpa_kernel(backends) if backends else contextlib.nullcontext():
        once()
        return statistics.median(once() for _ in range(5))


def sdpa_inputs(model: Any, batch: dict[str, Any]) -> dict[str, float]:
    """What torch's scaled_dot_product_attention receives from `model` on `batch`: whether a mask
    (and of how many dimensions) and is_causal, from a wrapper around it during one forward pass."""
    import torch.nn.functional as F

    seen: dict[str, float] = {}
    original = F.scaled_dot_product_attention

    def spy(*args: Any, attn_mask: Any = None, is_causal: bool = False, **kwargs: Any) -> Any:
        seen.update(mask_dims=float(attn_mask.dim()) if attn_mask is not None else 0.0, is_causal=float(is_causal))
        return original(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        F.scaled_dot_product_attention = original
    return seen


def packed_mask(batch: int, seq: int, device: Any) -> Any:
    """The mask transformers builds for tunekit's packed rows (position ids that restart, no
    attention mask): causal within each sequence, [batch, 1, seq, seq] bool (seen on the CPU by
    wrapping torch's sdpa). Sequence lengths as packing makes them, 64 to seq / 2 tokens."""
    rng = random.Random(0)
    segments = torch.zeros(batch, seq, dtype=torch.long)
    for row in segments:
        start, index = 0, 0
        while start < seq:
            size = rng.randint(min(64, seq // 4), seq // 2)
            row[start : start + size] = index
            start, index = start + size, index + 1
    same = segments[:, :, None] == segments[:, None, :]
    return (same & torch.ones(seq, seq, dtype=torch.bool).tril())[:, None].to(device)


class WordReward:
    """Stands in for a reward model (RewardModel's interface): the share of distinct words."""

    def to(self, device: Any) -> WordReward:
        return self

    def score(self, prompts: list[Any], responses: list[str]) -> torch.Tensor:
        return torch.tensor([len(set(r.split())) / (len(r.split()) + 1) for r in responses], dtype=torch.float32)



# ---------------------------------------------------------------------------------------------
# The table


COLUMNS = (("tokens_per_s", "tok/s", "{:,.0f}"), ("mfu", "MFU", "{:.1%}"), ("peak_gib", "peak GiB", "{:.2f}"),
           ("step_s", "s/step", "{:.3f}"), ("rollout_tokens_per_s", "rollout tok/s", "{:,.0f}"),
           ("attn_ms", "attn ms", "{:.2f}"))


def environment(peak: float, source: str, tiny: bool) -> dict[str, Any]:
    import importlib.metadata as meta

    versions = {}
    for package in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "liger-kernel"):
        try:
            versions[package] = meta.version(package)
        except meta.PackageNotFoundError:
            versions[package] = None
    env = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "cuda": torch.version.cuda,
           "driver": None, "peak_tflops": peak, "peak_source": source, "tiny": tiny, "versions": versions,
           "command": " ".join(["python", *sys.argv]), "load": os.getloadavg()[0]}
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return env


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The comparisons the issue asks for, where both rows ran."""
    get = {(r["section"], r["row"]): r for r in rows if r["status"] == "ok"}
    wanted = {"sft tunekit / trl-defaults tok/s": (("sft", "tunekit"), ("sft", "trl-defaults"), "tokens_per_s"),
              "sft tunekit / plain-loop tok/s": (("sft", "tunekit"), ("sft", "plain-loop"), "tokens_per_s"),
              "loss liger / tunekit peak memory": (("loss", "liger"), ("sft", "tunekit"), "peak_gib"),
              "loss liger / tunekit tok/s": (("loss", "liger"), ("sft", "tunekit"), "tokens_per_s"),
              "peft lora / full peak memory": (("peft", "lora"), ("peft", "full"), "peak_gib"),
              "peft qlora / full peak memory": (("peft", "qlora"), ("peft", "full"), "peak_gib"),
              "peft lora / full tok/s": (("peft", "lora"), ("peft", "full"), "tokens_per_s"),
              "ppo lora / full s/step": (("ppo", "lora"), ("ppo", "full"), "step_s"),
              "attn packed-mask / causal time": (("attn", "packed-mask"), ("attn", "causal"), "attn_ms")}
    return {name: get[a][key] / get[b][key] for name, (a, b, key) in wanted.items() if a in get and b in get}


def table(result: dict[str, Any]) -> str:
    env = result["env"]
    lines = [f"device {env['device']}, driver {env['driver']}, CUDA {env['cuda']}, torch {env['versions']['torch']}, "
             f"transformers {env['versions']['transformers']}, trl {env['versions']['trl']}; peak "
             f"{env['peak_tflops']:.3g} TFLOP/s ({env['peak_source']}); load {env['load']:.2f}",
             "| row | " + " | ".join(c[1] for c in COLUMNS) + " | note |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    for row in result["rows"]:
        cells = [fmt.format(row[key]) if isinstance(row.get(key), (int, float)) else "-" for key, _, fmt in COLUMNS]
        note = row["note"] if row["status"] == "ok" else f"{row['status'].upper()}: {row['note']}"
        lines.append(f"| {row['section']}/{row['row']} | " + " | ".join(cells) + f" | {note} |")
    lines += [f"{name}: **{value:.2f}**" for name, value in result["ratios"].items()]
    return "\n".join(lines)


