"""SFT at a real model's shape: tunekit, TRL's SFTTrainer and a plain PyTorch loop, side by side.

    make bench-real
    HF_HUB_OFFLINE=1 .venv/bin/python bench/real.py [--data arith alpaca] [--methods full lora]
        [--batch 8] [--max-length 256] [--warmup 2] [--steps 6] [--lr 1e-4] [--threads N] [--json out.json]
        [--checkpointing off on] [--bf16] [--lora-dropout 0.0] [--model DIR]

SmolLM2-135M-Instruct (models/smollm2-135m-instruct when `make models` has fetched it; else the same
config with random weights and a BPE tokenizer trained on the rows): Llama, hidden 576, intermediate
1,536, 30 layers, vocabulary 49,152, tied embeddings. Full fine-tuning and LoRA (r 16, alpha 32,
dropout 0 unless --lora-dropout, every linear layer of the body) on the first batch x (warmup + steps) rows of
data/arith/train.jsonl (short responses) or data/alpaca/alpaca_small_2k.json (long ones), tokenised
and masked by tunekit (loss on the response only), in file order, padded per batch. Matched for all
three: the rows and their order, batch, max_length, AdamW (no weight decay), constant learning rate,
gradient clipping at 1.0, float32 (--bf16: bf16 autocast over float32 weights, for all three),
gradient checkpointing (off unless --checkpointing on; `off on` measures each both ways), LoRA
dropout (--lora-dropout: tunekit's default `peft.dropout` is 0.05; each variant draws its own masks),
the adapter's initial weights:
  tunekit  what `tunekit sft` / `tunekit lora` train with (sft.build_trainer: LeanSFTTrainer);
  trl      TRL's SFTTrainer with its own compute_loss, on the same tokenised rows (+ PEFT: the model
           is wrapped with get_peft_model before it is handed over);
  plain    forward (the model's own loss), backward, clip, AdamW step.
Each variant runs in a process of its own (`--one VARIANT`), so its peak RSS (VmHWM) is its own.
Time per step is taken from the end of the warm-up steps to the end of the last; tokens/s counts
the rows' real (non-padding) tokens; loss is the last step's mean loss (equal across variants up to
float32 summation order: the same work is done).

CPU MFU = FLOPs a step must do / step time / peak. The peak is the best float32 matmul rate of
this CPU (torch.mm, the default thread count) at the model's own shapes: [tokens, 576] x [576, 1536],
[tokens, 1536] x [1536, 576], [tokens, 576] x [576, 576] with `tokens` the real tokens of a batch,
and [trained tokens, 576] x [576, 49152] (the LM head), timed before and after the variants.
FLOPs per step, with N the weights of the body's linear layers, T the real tokens, T_lab the trained
positions (label != -100 after the shift), h the hidden size, V the vocabulary, and attention the
causal half of QK^T and AV (2 x T_row^2 x 576 per layer and row, forward):
  full:  6 N T + 6 h V T_lab + 3 attention      (forward 2, activation gradients 2, weight gradients 2)
  lora:  4 N T + 4 h V T_lab + 3 attention + 6 N_lora T   (no gradients of frozen weights)
The head counts only the trained positions: that is all a step must do (tunekit's path does only
that; a path that runs the head everywhere does more work for the same result, hence a lower MFU).
Embedding lookups, norms, activations and the optimizer are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
if Path(sys.path[0]).resolve() == ROOT / "bench":  # run as a script: bench/peft.py would shadow peft
    sys.path[0] = str(ROOT)

import torch  # noqa: E402

MODEL = ROOT / "models" / "smollm2-135m-instruct"
DATA = {"arith": ROOT / "data" / "arith" / "train.jsonl", "arith-hard": ROOT / "data" / "arith-hard" / "train.jsonl",
        "alpaca": ROOT / "data" / "alpaca" / "alpaca_small_2k.json"}
VARIANTS = ("tunekit", "trl", "plain")
# SmolLM2-135M-Instruct's config (models/smollm2-135m-instruct/config.json), for random weights
SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
           "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
           "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
LORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}  # lora_dropout: Plan.lora_dropout
SEED = 42


@dataclass
class Plan:
    """One measurement: which rows, model, method and settings; written to JSON for the child."""

    data: str  # a name in DATA, or a file of rows
    method: str
    base: str
    work: str
    batch: int
    max_length: int
    warmup: int
    steps: int
    lr: float
    threads: int
    checkpointing: bool = False
    bf16: bool = False  # bf16 autocast (mixed precision) over float32 weights
    lora_dropout: float = 0.0

    @property
    def rows(self) -> int:
        return self.batch * (self.warmup + self.steps)


def base_model(work: Path, model: Path | None = None) -> Path:
    """`model` (--model: a folder with a chat tokenizer), else the real SmolLM2 folder, else the same
    config with random weights and a tokenizer trained here."""
    if model is not None:
        return model
    if (MODEL / "model.safetensors").is_file():
        return MODEL
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunekit.data.chat import train_tokenizer

    texts = [line for path in DATA.values() if path.is_file() for line in path.read_text().splitlines()[:4000]]
    tokenizer = train_tokenizer(texts, vocab_size=8000)
    fields = dict(SMOLLM2)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    return work / "base"


def tunekit_config(plan: Plan) -> Any:
    from tunekit.config import validate_config
    from tunekit.methods import sft

    raw = {"model": {"name": plan.base},
           "data": {"train": str(DATA.get(plan.data, plan.data)), "train_limit": plan.rows, "max_length": plan.max_length},
           "peft": {"method": "lora" if plan.method == "lora" else "none", "r": LORA["r"],
                    "alpha": LORA["lora_alpha"], "dropout": plan.lora_dropout},
           "train": {"seed": SEED, **trainer_settings(plan)}}
    return validate_config(sft.Config, raw, "bench/real.py")


def trainer_settings(plan: Plan) -> dict[str, Any]:
    """The Trainer settings all three share (the plain loop does the same by hand)."""
    return {"max_steps": plan.warmup + plan.steps, "per_device_train_batch_size": plan.batch,
            "learning_rate": plan.lr, "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0,
            "optim": "adamw_torch", "max_grad_norm": 1.0, "bf16": plan.bf16, "gradient_checkpointing": plan.checkpointing,
            "packing": False, "train_sampling_strategy": "sequential", "save_strategy": "no", "eval_strategy": "no",
            "logging_steps": 1, "report_to": "none", "disable_tqdm": True}


def rows_file(plan: Plan) -> Path:
    """Where the parent leaves the tokenised rows for the child."""
    return Path(plan.work) / f"rows-{Path(plan.data).name}.json"


def tokenized_rows(plan: Plan) -> list[dict[str, list[int]]]:
    """The rows as tunekit tokenises and masks them (a few hundred: a list is fine here)."""
    from transformers import AutoTokenizer

    from tunekit.methods import sft

    config = tunekit_config(plan)
    tokenizer = AutoTokenizer.from_pretrained(plan.base)
    return sft.tokenize_split(tokenizer, sft.check(config).train, config).dataset.to_list()


def timed_train(trainer: Any, plan: Plan) -> dict[str, float]:
    from bench.gpu_tools import step_timer

    timer = step_timer(plan.warmup)
    trainer.add_callback(timer)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"seconds": timer.end - timer.start, "loss": losses[-1]}


def run_tunekit(plan: Plan, rows: list[dict[str, Any]]) -> dict[str, float]:
    from tunekit.methods import sft
    from tunekit.runs.folder import RunFolder
    from tunekit.training import training_arguments

    config = tunekit_config(plan)
    args = training_arguments(config, RunFolder(Path(tempfile.mkdtemp(dir=plan.work))))
    return timed_train(sft.build_trainer(config, sft.check(config), args, []), plan)


def seeded_model(plan: Plan) -> Any:
    """The base model (wrapped with the LoRA adapter for `lora`), from the same RNG state as tunekit's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(plan.base, dtype=torch.float32)
    lora = LoraConfig(task_type="CAUSAL_LM", lora_dropout=plan.lora_dropout, **LORA)
    return get_peft_model(model, lora) if plan.method == "lora" else model


def run_trl(plan: Plan, rows: list[dict[str, Any]]) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    settings = trainer_settings(plan)
    args = SFTConfig(output_dir=tempfile.mkdtemp(dir=plan.work), max_length=plan.max_length, seed=SEED,
                     use_cpu=not torch.cuda.is_available(), **settings)
    trainer = SFTTrainer(model=seeded_model(plan), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(plan.base))
    return timed_train(trainer, plan)


def run_plain(plan: Plan, rows: list[dict[str, Any]]) -> dict[str, float]:
    from transformers import AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = seeded_model(plan).train()
    if plan.checkpointing:  # as the Trainer does it: non-reentrant, inputs made to require grads for PEFT
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    collate = DataCollatorForLanguageModeling(pad_token_id=AutoTokenizer.from_pretrained(plan.base).pad_token_id)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=plan.lr, weight_decay=0.0)
    start = loss = None
    for step in range(plan.warmup + plan.steps):
        if step == plan.warmup:
            start = time.perf_counter()
        batch = collate(rows[step * plan.batch : (step + 1) * plan.batch])
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=plan.bf16):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"seconds": time.perf_counter() - start, "loss": loss.item()}


def peak_rss_mb() -> float:
    from bench.gpu_tools import status_mb

    peak = status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(variant: str, plan_file: Path) -> None:
    """`--one VARIANT`: train one variant and print its figures as the last line (JSON)."""
    from tunekit.memory import keep_wanted, keeping, trim_interval, trimming

    plan = Plan(**json.loads(plan_file.read_text()))
    torch.set_num_threads(plan.threads)
    rows = json.loads(rows_file(plan).read_text())
    runner = {"tunekit": run_tunekit, "trl": run_trl, "plain": run_plain}[variant]
    trim = trim_interval()
    # TUNEKIT_TRIM_MEMORY_S for every variant alike; freed memory kept for reuse (TUNEKIT_KEEP_MEMORY) is
    # tunekit's own process policy, so tunekit's variant alone has it, as `tunekit sft` runs
    with keeping(variant == "tunekit" and keep_wanted(trim)), trimming(trim):
        figures = runner(plan, rows)
    print(json.dumps({**figures, "peak_rss_mb": peak_rss_mb()}), flush=True)


def measure(plan: Plan, variant: str) -> dict[str, float]:
    plan_file = Path(plan.work) / f"plan-{Path(plan.data).name}-{plan.method}.json"
    return in_child(__file__, variant, plan, plan_file, f"{variant} {plan.data} {plan.method}")


def in_child(script: str, variant: str, plan: Any, plan_file: Path, shown: str) -> dict[str, float]:
    """Run `script --one VARIANT --plan FILE` (the plan written there) in a process of its own, so
    that its peak RSS is its own; its figures are the last line it prints (JSON)."""
    plan_file.write_text(json.dumps(asdict(plan)))
    done = subprocess.run([sys.executable, script, "--one", variant, "--plan", str(plan_file)],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{shown} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def matmul_rates(tokens: int, trained: int, hidden: int, inner: int, vocab: int) -> dict[str, float]:
    """GFLOP/s of float32 torch.mm at the model's shapes (best of 5 after one warm-up call)."""
    rates = {}
    for m, k, n in ((tokens, hidden, inner), (tokens, inner, hidden), (tokens, hidden, hidden), (trained, hidden, vocab)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        best = float("inf")
        for _ in range(6):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        rates[f"{m}x{k}x{n}"] = 2 * m * k * n / best / 1e9
    return rates


def step_flops(config: Any, rows: list[dict[str, Any]], plan: Plan) -> float:
    """FLOPs of the measured steps (the module docstring says what is counted)."""
    h, inner, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    attn = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    shapes = [(h, attn), (h, kv), (h, kv), (attn, h), (h, inner), (h, inner), (inner, h)]  # q k v o gate up down
    body = layers * sum(a * b for a, b in shapes)
    lora = layers * sum(LORA["r"] * (a + b) for a, b in shapes)
    measured = rows[plan.warmup * plan.batch : plan.rows]
    tokens = sum(len(r["input_ids"]) for r in measured)
    trained = sum(sum(label != -100 for label in r["labels"][1:]) for r in measured)
    attention = sum(layers * 2 * len(r["input_ids"]) ** 2 * attn for r in measured)
    if plan.method == "full":
        return 6 * body * tokens + 6 * h * vocab * trained + 3 * attention
    return 4 * body * tokens + 4 * h * vocab * trained + 3 * attention + 6 * lora * tokens


def run_all(options: argparse.Namespace, work: Path) -> dict[str, Any]:
    from transformers import AutoConfig

    torch.set_num_threads(options.threads)
    base = base_model(work, options.model)
    config = AutoConfig.from_pretrained(base)
    results: dict[str, Any] = {"model": str(base), "threads": torch.get_num_threads(), "rows": {}, "runs": []}
    rates: dict[str, list[float]] = {}
    for data in options.data:
        plan = Plan(data, "full", str(base), str(work), options.batch, options.max_length, options.warmup,
                    options.steps, options.lr, options.threads, bf16=options.bf16, lora_dropout=options.lora_dropout)
        rows = tokenized_rows(plan)
        rows_file(plan).write_text(json.dumps(rows))
        measured = rows[plan.warmup * plan.batch :]
        tokens = sum(len(r["input_ids"]) for r in measured) // plan.steps
        trained = sum(sum(label != -100 for label in r["labels"][1:]) for r in measured) // plan.steps
        results["rows"][data] = {"tokens_per_step": tokens, "trained_per_step": trained}
        for name, rate in matmul_rates(tokens, trained, config.hidden_size, config.intermediate_size,
                                       config.vocab_size).items():
            rates.setdefault(name, []).append(rate)
        for method, checkpointing in [(m, c == "on") for m in options.methods for c in options.checkpointing]:
            plan.method, plan.checkpointing = method, checkpointing
            flops = step_flops(config, rows, plan)
            for variant in options.variants:
                figures = measure(plan, variant)
                figures.update(data=data, method=method, variant=variant, checkpointing=checkpointing,
                               lora_dropout=plan.lora_dropout, tokens_per_s=tokens * plan.steps / figures["seconds"],
                               step_s=figures["seconds"] / plan.steps, flops_per_s=flops / figures["seconds"])
                results["runs"].append(figures)
                print(json.dumps(figures), flush=True)
    for data in options.data:  # the peak again, after: the machine may be shared
        row = results["rows"][data]
        for name, rate in matmul_rates(row["tokens_per_step"], row["trained_per_step"], config.hidden_size,
                                       config.intermediate_size, config.vocab_size).items():
            rates.setdefault(name, []).append(rate)
    results["matmul_gflops"] = {name: max(values) for name, values in rates.items()}
    results["peak_gflops"] = max(results["matmul_gflops"].values())
    return results


def table(results: dict[str, Any], options: argparse.Namespace) -> str:
    peak = results["peak_gflops"]
    lines = [f"model {results['model']}, {results['threads']} threads, batch {options.batch}, max_length "
             f"{options.max_length}, {options.steps} steps after {options.warmup} warm-up"
             + (", bf16 autocast" if options.bf16 else ", float32") + f", LoRA dropout {options.lora_dropout}",
             "float32 matmul GFLOP/s at the model's shapes: "
             + ", ".join(f"{k} {v:.0f}" for k, v in results["matmul_gflops"].items()) + f"; peak {peak:.0f}",
             "| data | method | checkpointing | variant | tokens/s | s/step | peak RSS MB | loss after N steps | CPU MFU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(f"| {r['data']} | {r['method']} | {'on' if r['checkpointing'] else 'off'} | {r['variant']} | "
                     f"{r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['loss']:.4f} | "
                     f"{100 * r['flops_per_s'] / 1e9 / peak:.1f}% |")
    by = {(r["data"], r["method"], r["checkpointing"], r["variant"]): r for r in results["runs"]}
    for (data, method, checkpointing, variant), r in by.items():
        shown = f"{data} {method}{' checkpointed' if checkpointing else ''}"
        if variant == "tunekit" and (data, method, checkpointing, "trl") in by:
            trl = by[data, method, checkpointing, "trl"]
            lines.append(f"{shown}: tunekit / TRL tokens/s {r['tokens_per_s'] / trl['tokens_per_s']:.2f}, "
                         f"peak RSS {r['peak_rss_mb'] / trl['peak_rss_mb']:.2f}")
        if checkpointing and (data, method, False, variant) in by:
            off = by[data, method, False, variant]
            lines.append(f"{data} {method} {variant}: checkpointing on / off tokens/s "
                         f"{r['tokens_per_s'] / off['tokens_per_s']:.2f}, peak RSS {r['peak_rss_mb'] / off['peak_rss_mb']:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="another causal LM folder with a chat tokenizer (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--data", nargs="+", choices=sorted(DATA), default=["arith"])
    parser.add_argument("--methods", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast over float32 weights, for every variant")
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="LoRA dropout for every variant (tunekit's default peft.dropout is 0.05)")
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off"],
                        help="gradient checkpointing for every variant (both: each run twice, off and on)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of every variant and of the matmul peak (default: torch's own)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.one:
        child(options.one, options.plan)
        return
    with tempfile.TemporaryDirectory() as tmp:
        results = run_all(options, Path(tmp))
    if options.json:
        options.json.write_text(json.dumps(results, indent=1))
    print(table(results, options))


if __name__ == "__main__":
    main()
