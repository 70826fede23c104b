"""SFT throughput: real (non-padding) tokens trained per second, in one process.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/sft.py [--rows 320] [--model runs/pretrain-tiny-gpt-shakespeare/model]

Same model, same Alpaca conversations (same chat template and tokens), batch 8, max_length 512,
one epoch, AdamW, fp32 weights, for packing off and on:
  (t) tunekit sft (methods/sft.py run()),
  (d) TRL SFTTrainer with its defaults (SFTConfig(): bf16 and gradient checkpointing on, as TRL ships;
      use_cpu=True on a CPU, without which the bf16 default refuses to start),
  (p) a plain PyTorch loop: forward, backward, AdamW step, on tunekit's batches (padded per batch, or
      packed best-fit-decreasing into rows that keep their own position ids: sft.PackedRows).
Tokens/s = real tokens in the epoch / training time. Prints t/d and t/p for each packing mode.
With no --model, a 13.8M-parameter Llama-style model (6 layers, 384 wide, 8k vocab) is built.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not bench/: bench/peft.py would shadow the peft package

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # noqa: E402

from tunekit.config import validate_config  # noqa: E402
from tunekit.data.chat import train_tokenizer  # noqa: E402
from tunekit.methods import method_named, sft  # noqa: E402
from tunekit.training import execute  # noqa: E402

DATA = ROOT / "data" / "alpaca" / "alpaca_data_1k.json"
BATCH, MAX_LEN, LR = 8, 512, 5e-4


def build_model(workdir: Path, model: str | None) -> Path:
    if model:
        return Path(model)
    text = (ROOT / "data" / "tiny_shakespeare" / "input.txt").read_text()
    tokenizer = train_tokenizer([text], vocab_size=8192)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                         num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(workdir / "base")
    tokenizer.save_pretrained(workdir / "base")
    return workdir / "base"


def tunekit_config(base: Path, rows: int, packing: bool) -> sft.Config:
    raw = {
        "model": {"name": str(base)},
        "data": {"train": str(DATA), "train_limit": rows, "max_length": MAX_LEN},
        "train": {"num_train_epochs": 1, "per_device_train_batch_size": BATCH,
                  "learning_rate": LR, "save_strategy": "no", "logging_steps": 100000, "packing": packing,
                  "disable_tqdm": True},
    }
    return validate_config(sft.Config, raw, "bench")


def tokenized(base: Path, rows: int) -> list[dict]:
    config = tunekit_config(base, rows, False)
    tokenizer = AutoTokenizer.from_pretrained(base)
    return sft.tokenize_split(tokenizer, sft.check(config).train, config).dataset.to_list()  # a few hundred rows


def run_tunekit(base: Path, rows: int, packing: bool, workdir: Path) -> float:
    import json

    config = tunekit_config(base, rows, packing)
    out = workdir / f"tunekit-{packing}"
    execute(method_named("sft"), config, sft.check(config), out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r["train_runtime"] for r in records if "train_runtime" in r)


def run_trl_defaults(base: Path, rows: int, packing: bool, workdir: Path) -> float:
    """SFTTrainer as TRL ships it: conversational prompt/completion rows, SFTConfig defaults."""
    config = tunekit_config(base, rows, packing)
    conversations = [c for c, _ in sft.check(config).train.examples()]
    data = Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in conversations])
    args = SFTConfig(output_dir=str(workdir / f"trl-{packing}"), per_device_train_batch_size=BATCH,
                     max_length=MAX_LEN, learning_rate=LR, num_train_epochs=1, packing=packing,
                     save_strategy="no", report_to="none", logging_steps=100000, disable_tqdm=True,
                     use_cpu=not torch.cuda.is_available())  # without it, bf16 (a TRL default) refuses the CPU
    model = AutoModelForCausalLM.from_pretrained(base)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(base))
    return trainer.train().metrics["train_runtime"]


def run_plain(base: Path, items: list[dict], packing: bool) -> float:
    """The same batches through forward / backward / AdamW, nothing else."""
    model = AutoModelForCausalLM.from_pretrained(base).train()
    pad = AutoTokenizer.from_pretrained(base).pad_token_id
    data = Dataset.from_list(items)
    if packing:  # tunekit's batches: bfd rows, each a [row, length] slice with its own position ids
        data, collate = sft.packed(data, MAX_LEN), sft.PackedRows(pad)
    else:
        collate = DataCollatorForLanguageModeling(pad_token_id=pad)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    keep = ("input_ids", "labels", "attention_mask", "position_ids")
    start = time.perf_counter()
    for batch in loader:
        loss = model(**{k: v for k, v in batch.items() if k in keep}, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=320)
    parser.add_argument("--model", default=None)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        base = build_model(workdir, options.model)
        items = tokenized(base, options.rows)
        tokens = sum(len(i["input_ids"]) for i in items)
        params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base).parameters())
        print(f"model {params / 1e6:.1f}M parameters, {options.rows} rows, {tokens} real tokens, batch {BATCH}, "
              f"threads {torch.get_num_threads()}")
        for packing in (False, True):
            t = tokens / run_tunekit(base, options.rows, packing, workdir)
            d = tokens / run_trl_defaults(base, options.rows, packing, workdir)
            p = tokens / run_plain(base, items, packing)
            print(f"packing={packing!s:5}  tunekit {t:7.0f} tok/s   TRL defaults {d:7.0f} tok/s   plain loop {p:7.0f} tok/s"
                  f"   tunekit/TRL {t / d:.2f}   tunekit/plain {t / p:.2f}", flush=True)


if __name__ == "__main__":
    main()
