"""GPU throughput, MFU and peak memory at real model sizes, in one process, one table (issue 18).

    python bench/gpu.py [--out gpu.json] [--peak-tflops 989] [--sections sft,loss,peft,ppo,attn] [--tiny]

Models are built from configs with the published shapes (random init: speed and memory are those
of trained weights; nothing is downloaded), trained on synthetic conversations (random words, a BPE
tokenizer trained on them), sequence 2048, batch 8, packing on, bf16 mixed precision on a GPU:
  sft   Qwen2.5-0.5B-shaped, full fine-tuning: (a) tunekit sft's own trainer and collator
        (sft.build_trainer), (b) TRL SFTTrainer with its defaults, (c) a plain PyTorch loop on
        tunekit's packed rows. Real (non-pad) tokens/s, MFU = 6 x parameters x tokens/s / peak.
  loss  (a) again with train.use_liger_kernel: true (fused linear cross-entropy; needs the
        optional `liger-kernel` and CUDA). Peak memory and tokens/s.
  peft  Llama-3.2-1B-shaped through tunekit sft: full fine-tuning, LoRA, QLoRA (4-bit NF4), same batch.
  ppo   tunekit's PPO (rlhf.ppo_trainer) on the 0.5B-shaped policy, full and LoRA: rollout
        (generation) tokens/s and seconds per PPO step (tunekit's default ppo: settings, 128 new
        tokens). The reward is a text statistic, not a model, so its cost is left out.
  attn  one attention call of the 0.5B shape: causal against the block-diagonal mask of packed rows
        (torch's kernel choice, each kernel forced), and what SDPA receives for tunekit's packed rows.
Each section runs under a time budget and a try/except: a failure or an overrun becomes a row with
the reason, and the other sections still run. The first steps of each row (warm-up: kernel choice,
allocator growth) are not timed. --tiny runs every section on the CPU with tiny shapes (tests/).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not bench/: bench/peft.py would shadow the peft package

import torch  # noqa: E402

from bench.gpu_tools import (  # noqa: E402
    Counter,
    Refused,
    SectionTimeout,
    WordReward,
    attention_call,
    build_model,
    count,
    environment,
    failure,
    free,
    model_fields,
    packed_mask,
    peak_gib,
    peak_tflops,
    ratios,
    reset_peak,
    sdpa_inputs,
    step_timer,
    sync,
    synthetic,
    table,
    throughput,
    time_budget,
)

# Published architectures (config.json of Qwen/Qwen2.5-0.5B and meta-llama/Llama-3.2-1B).
QWEN_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu")
LLAMA_1B = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
                rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
TINY_QWEN = {**QWEN_05B, "vocab_size": 2048, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2}
TINY_LLAMA = {**LLAMA_1B, "vocab_size": 2048, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}


@dataclass
class Plan:
    qwen: dict[str, Any]
    llama: dict[str, Any]
    seq: int
    batch: int
    warmup: int  # untimed steps
    steps: int  # timed steps
    rows: int  # synthetic conversations
    words: tuple[int, int]  # response length range, in words
    vocab: int  # BPE tokenizer size
    ppo_batch: int
    ppo_minibatch: int
    ppo_epochs: int
    new_tokens: int
    budgets: dict[str, float] = field(default_factory=dict)  # seconds per section


FULL = Plan(QWEN_05B, LLAMA_1B, seq=2048, batch=8, warmup=4, steps=16, rows=1600, words=(40, 900), vocab=8000,
            ppo_batch=32, ppo_minibatch=8, ppo_epochs=4, new_tokens=128,
            budgets={"sft": 130, "loss": 45, "peft": 110, "ppo": 150, "attn": 30})
TINY = Plan(TINY_QWEN, TINY_LLAMA, seq=128, batch=2, warmup=1, steps=2, rows=48, words=(4, 60), vocab=600,
            ppo_batch=4, ppo_minibatch=2, ppo_epochs=1, new_tokens=6,
            budgets={"sft": 120, "loss": 60, "peft": 120, "ppo": 120, "attn": 60})


# ---------------------------------------------------------------------------------------------
# Sections


@dataclass
class Bench:
    plan: Plan
    work: Path
    data: Path
    tokenizer_dir: Path
    conversations: list[Any]
    peak: float
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_dir)

    def row(self, section: str, name: str, measure: Any, note: str = "") -> dict[str, Any]:
        """Run one measurement; its figures, or the reason it failed, become a row of the table."""
        record: dict[str, Any] = {"section": section, "row": name, "status": "ok", "note": note}
        reset_peak()
        try:
            record.update(measure())
            record["peak_gib"] = peak_gib()
        except SectionTimeout:
            raise
        except Refused as err:
            record.update(status="refused", note=f"{note}: {err}")
        except Exception as err:  # recorded, and the next row runs
            record.update(status="failed", note=failure(err))
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self.rows.append(record)
        print(json.dumps(record), flush=True)
        return record

    def sft_config(self, shape: dict[str, Any], name: str | None = None, **extra: Any) -> Any:
        from tunekit.config import validate_config
        from tunekit.methods import sft

        plan = self.plan
        train = {"max_steps": plan.warmup + plan.steps, "packing": True,
                 "per_device_train_batch_size": plan.batch, "save_strategy": "no", "logging_steps": 10**6,
                 "disable_tqdm": True, **extra.pop("train", {})}
        model = {"name": name} if name else {"config": model_fields(shape, self.tokenizer)}
        raw = {"model": {**model, "tokenizer": str(self.tokenizer_dir)}, "data": {"train": str(self.data), "max_length": plan.seq},
               "train": train, **extra}
        return validate_config(sft.Config, raw, "bench/gpu.py")

    def tunekit_sft(self, config: Any, full: bool = True) -> dict[str, float]:
        """tunekit sft's own trainer (sft.build_trainer), timed between warm-up and the last step."""
        from tunekit.methods import sft
        from tunekit.runs.folder import RunFolder
        from tunekit.training import MetricsLog, training_arguments

        run = RunFolder(Path(tempfile.mkdtemp(dir=self.work)))
        args = training_arguments(config, run)
        trainer = sft.build_trainer(config, sft.check(config), args, [MetricsLog(run)])
        counter = Counter(trainer.data_collator, trainer.processing_class.pad_token_id)
        trainer.data_collator = counter
        timer = step_timer(self.plan.warmup)
        trainer.add_callback(timer)
        trainer.train()
        params = count(trainer.model)
        figures = throughput(counter, timer.end - timer.start, self.plan, params, self.peak)
        if not full:
            figures.pop("mfu")  # 6N counts weight gradients that an adapter does not compute
        free(trainer)
        return figures

    def trl_defaults(self) -> dict[str, float]:
        """TRL's SFTTrainer as it ships (SFTConfig defaults: bf16, gradient checkpointing, its own
        packing and padding-free collator), on the same conversations and model."""
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        plan, tokenizer = self.plan, self.tokenizer
        data = Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in self.conversations])
        args = SFTConfig(output_dir=str(self.work / "trl"), max_length=plan.seq, packing=True,
                         per_device_train_batch_size=plan.batch, max_steps=plan.warmup + plan.steps,
                         save_strategy="no", report_to="none", logging_steps=10**6, disable_tqdm=True,
                         use_cpu=not torch.cuda.is_available())  # without it, bf16 (a TRL default) refuses the CPU
        model = build_model(model_fields(self.plan.qwen, tokenizer))
        params = count(model)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        counter = Counter(trainer.data_collator, tokenizer.pad_token_id)
        trainer.data_collator = counter
        timer = step_timer(plan.warmup)
        trainer.add_callback(timer)
        trainer.train()
        figures = throughput(counter, timer.end - timer.start, plan, params, self.peak)
        free(trainer, model)
        return figures

    def plain_loop(self) -> dict[str, float]:
        """forward, backward, clip, AdamW step on tunekit's packed rows (bf16 autocast on a GPU)."""

        from tunekit.methods import sft

        plan, tokenizer = self.plan, self.tokenizer
        config = self.sft_config(plan.qwen)
        items = sft.tokenize_split(tokenizer, sft.check(config).train, config).dataset
        rows = sft.packed(items, plan.seq)
        counter = Counter(sft.PackedRows(tokenizer.pad_token_id), tokenizer.pad_token_id)
        loader = torch.utils.data.DataLoader(rows, batch_size=plan.batch, shuffle=True, collate_fn=counter,
                                             generator=torch.Generator().manual_seed(0))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = build_model(model_fields(plan.qwen, tokenizer)).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        batches = iter(loader)
        for step in range(plan.warmup + plan.steps):
            if step == plan.warmup:
                sync()
                start = time.perf_counter()
            batch = next(batches)
            with autocast:
                loss = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync()
        figures = throughput(counter, time.perf_counter() - start, plan, count(model), self.peak)
        free(model, optimizer)
        return figures

    def sft(self) -> None:
        self.row("sft", "tunekit", lambda: self.tunekit_sft(self.sft_config(self.plan.qwen)), "tunekit sft defaults")
        self.row("sft", "trl-defaults", self.trl_defaults, "SFTTrainer, SFTConfig defaults + packing")
        self.row("sft", "plain-loop", self.plain_loop, "AdamW loop on tunekit's packed rows")

    def loss(self) -> None:
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None or not torch.cuda.is_available():
            why = "liger-kernel is not installed" if torch.cuda.is_available() else "Liger's kernels need CUDA"
            self.rows.append({"section": "loss", "row": "liger", "status": "skipped", "needs_cuda": True, "note": why})
            return
        config = self.sft_config(self.plan.qwen, train={"use_liger_kernel": True})
        self.row("loss", "liger", lambda: self.tunekit_sft(config), "train.use_liger_kernel: true (vs sft/tunekit)")

    def peft(self) -> None:
        tokenizer = self.tokenizer
        base = self.work / "llama"
        model = build_model(model_fields(self.plan.llama, tokenizer)).to(torch.bfloat16)
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
        free(model)
        for name, peft in (("full", {}), ("lora", {"method": "lora"}), ("qlora", {"method": "lora", "quantize": "4bit"})):
            config = self.sft_config(self.plan.llama, name=str(base), peft=peft)
            self.row("peft", name, lambda config=config, full=not peft: self.tunekit_sft(config, full),
                     "Llama-3.2-1B-shaped, tunekit sft" + (f", peft {peft}" if peft else ", full fine-tuning"))

    def attn(self) -> None:
        """One attention call of the 0.5B shape (batch 8, 14 heads, 2048, head 64, bf16 on a GPU): the
        causal path that a row holding one sequence takes (flash on a GPU), against the block-diagonal
        mask of packed rows, with torch's choice of kernel and with each kernel forced."""
        from torch.nn.attention import SDPBackend

        plan, cuda = self.plan, torch.cuda.is_available()
        heads, dim = plan.qwen["num_attention_heads"], plan.qwen["hidden_size"] // plan.qwen["num_attention_heads"]
        device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
        q = torch.randn(plan.batch, heads, plan.seq, dim, device=device, dtype=dtype, requires_grad=True)
        mask = packed_mask(plan.batch, plan.seq, device)
        variants = [("causal", None, None, "is_causal, no mask: one sequence per row"),
                    ("packed-mask", mask, None, "tunekit's packed rows, torch picks the kernel")]
        if cuda:
            variants += [("packed-efficient", mask, [SDPBackend.EFFICIENT_ATTENTION], "mask, memory-efficient kernel"),
                         ("packed-math", mask, [SDPBackend.MATH], "mask, math kernel"),
                         ("packed-flash", mask, [SDPBackend.FLASH_ATTENTION], "mask, flash kernel")]

        def measure(m: Any, backends: Any) -> dict[str, float]:
            try:
                return {"attn_ms": 1e3 * attention_call(q, m, backends)}
            except RuntimeError as err:  # no kernel of those takes this input
                raise Refused(failure(err)) from None

        for name, m, backends, note in variants:
            self.row("attn", name, lambda m=m, backends=backends: measure(m, backends), note)
        self.row("attn", "transformers-mask", self.packed_rows_mask)

    def packed_rows_mask(self) -> dict[str, float]:
        """What SDPA gets from the tiny-shaped model on a batch of tunekit's packed rows."""
        from tunekit.methods.sft import PackedRows

        fields = {**TINY_QWEN, "pad_token_id": 0, "attn_implementation": "sdpa"}
        rows = [{"input_ids": [5] * 100, "labels": [5] * 100, "seq_lengths": [40, 60]},
                {"input_ids": [6] * 128, "labels": [6] * 128, "seq_lengths": [128]}]
        # On the GPU when there is one: the loss section's Liger patches stay on the model classes,
        # and their Triton kernels refuse CPU tensors.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        batch = {k: v.to(device) for k, v in PackedRows(0)(rows).items()}
        seen = sdpa_inputs(build_model(fields).to(device), batch)
        mask = f"a {seen['mask_dims']:.0f}-d mask" if seen["mask_dims"] else "no mask"
        return {**seen, "note": f"packed rows: SDPA got {mask}, is_causal={bool(seen['is_causal'])}"}

    def ppo(self) -> None:
        for name, peft in (("full", {}), ("lora", {"method": "lora"})):
            self.row("ppo", name, lambda peft=peft: self.ppo_steps(peft), "tunekit rlhf PPO, 0.5B-shaped policy")

    def ppo_steps(self, peft: dict[str, Any]) -> dict[str, float]:
        """tunekit's PPO trainer (rlhf.ppo_trainer): seconds per step, and generation tokens/s
        from a timed wrapper around rollout.sample (what PPOTrainer.rollout calls)."""
        import tunekit.rl.rollout as rollout
        from tunekit.config import validate_config
        from tunekit.methods import rlhf
        from tunekit.rl.ppo import prompt_batches
        from tunekit.runs.folder import RunFolder

        plan = self.plan
        raw = {"model": {"config": model_fields(plan.qwen, self.tokenizer), "tokenizer": str(self.tokenizer_dir)},
               "data": {"train": str(self.data)}, "rlhf": {"reward_model": "bench: a text statistic"}, "peft": peft,
               "ppo": {"rollout_batch_size": plan.ppo_batch, "minibatch_size": plan.ppo_minibatch,
                       "epochs": plan.ppo_epochs}, "generation": {"max_new_tokens": plan.new_tokens}}
        config = validate_config(rlhf.Config, raw, "bench/gpu.py")
        policy, tokenizer = rlhf.load_policy(config)
        policy.to(rlhf.this_process_device(config))
        prompts = rollout.make_prompts([c[:1] for c in self.conversations], tokenizer, True)
        run = RunFolder(Path(tempfile.mkdtemp(dir=self.work)))
        trainer = rlhf.ppo_trainer(config, policy, tokenizer, WordReward(), prompts, run,
                                   rlhf.frozen_reference(config, policy))
        generated = {"tokens": 0, "seconds": 0.0}
        untimed = rollout.sample

        def timed(*args: Any, **kwargs: Any) -> Any:
            sync()
            start = time.perf_counter()
            samples = untimed(*args, **kwargs)
            sync()
            generated["seconds"] += time.perf_counter() - start
            generated["tokens"] += int(samples.response_mask.sum())
            return samples

        batches = prompt_batches(len(prompts), plan.ppo_batch, 0)
        steps, warmup = max(plan.steps // 8, 1), 1
        rollout.sample = timed
        try:
            for step in range(warmup + steps):
                if step == warmup:
                    sync()
                    generated.update(tokens=0, seconds=0.0)
                    start = time.perf_counter()
                trainer.ppo_step([prompts[i] for i in next(batches)])
            sync()
            seconds = time.perf_counter() - start
        finally:
            rollout.sample = untimed
        free(trainer, policy)
        return {"step_s": seconds / steps, "rollout_tokens_per_s": generated["tokens"] / generated["seconds"],
                "rollout_fraction": generated["seconds"] / seconds}


# ---------------------------------------------------------------------------------------------
# The table


SECTIONS = ("sft", "loss", "peft", "ppo", "attn")


def run_sections(bench: Bench, sections: list[str], save: Any) -> dict[str, float]:
    """Each section under its time budget, the result saved after each (`save(seconds)`), so that
    a run stopped from outside keeps what it measured; returns the seconds each section took."""
    seconds: dict[str, float] = {}
    for section in sections:
        budget, started = bench.plan.budgets[section], time.perf_counter()
        try:
            with time_budget(budget):
                getattr(bench, section)()
        except SectionTimeout as err:
            bench.rows.append({"section": section, "row": "(rest)", "status": "timeout", "note": str(err)})
        except Exception as err:  # a failure outside a row (building the section's model, say)
            bench.rows.append({"section": section, "row": "(setup)", "status": "failed", "note": failure(err)})
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        seconds[section] = round(time.perf_counter() - started, 1)
        print(f"bench/gpu.py: section {section} took {seconds[section]} s (budget {budget} s)", flush=True)
        save(seconds)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the table as JSON here")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU, TFLOP/s")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a check that the script runs)")
    options = parser.parse_args(argv)
    sections = [s for s in options.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    started = time.perf_counter()
    plan = TINY if options.tiny else FULL
    if options.tiny:
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    peak, source = peak_tflops(options.peak_tflops)
    env = environment(peak, source, options.tiny)

    def result(seconds: dict[str, float]) -> dict[str, Any]:
        timing = {"section_seconds": seconds, "total_seconds": round(time.perf_counter() - started, 1)}
        return {"env": {**env, **timing}, "rows": bench.rows, "ratios": ratios(bench.rows)}

    def save(seconds: dict[str, float]) -> None:
        if options.out:
            options.out.parent.mkdir(parents=True, exist_ok=True)
            options.out.write_text(json.dumps(result(seconds), indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data, tokenizer_dir, conversations = synthetic(work, plan)
        bench = Bench(plan, work, data, tokenizer_dir, conversations, peak)
        seconds = run_sections(bench, sections, save)
    print(table(result(seconds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
