"""`tunekit pretrain`: language-model pre-training, causal (GPT: predict every next token) or masked
(BERT: predict 15% hidden tokens), from a config (random init) or a checkpoint (continued).

Text is tokenised, joined with EOS between documents, and packed into fixed blocks, so no compute
is spent on padding. With no tokenizer named, a byte-level BPE tokenizer is trained on the corpus,
with the special tokens and chat template that `tunekit sft` needs later.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from tunekit.config import Recipe, Section, to_yaml
from tunekit.data import Table, read_table
from tunekit.errors import UserError


class PretrainData(Section):
    train: str | list[str] = Field(description="text files (.txt, or .jsonl/.json/.csv with a text column)")
    eval: str | list[str] | None = Field(None, description="held-out text; default: eval_fraction of the blocks")
    text_column: str = Field("text", description="column with the text; records without it join their string fields")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="share of blocks held out when no eval file is given")
    block_size: int = Field(256, gt=1, description="tokens per training block")


class TokenizerSection(Section):
    vocab_size: int = Field(8192, ge=300, description="vocabulary of the BPE tokenizer trained when none is named")


class PretrainTask(Section):
    objective: Literal["causal", "mlm"] = Field("causal", description="causal = next token (GPT); mlm = masked (BERT)")
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="share of tokens masked for mlm")


class Config(Recipe):
    command = "pretrain"
    data: PretrainData
    tokenizer: TokenizerSection = TokenizerSection()
    pretrain: PretrainTask = PretrainTask()

    @model_validator(mode="after")
    def _tokenizer_for_mlm(self) -> Config:
        if self.pretrain.objective == "mlm" and not (self.model.name or self.model.tokenizer):
            raise ValueError("pretrain.objective mlm needs a tokenizer with a mask token: set model.tokenizer")
        return self

    @classmethod
    def train_defaults(cls) -> dict[str, Any]:
        return {
            "learning_rate": 1e-3,
            "num_train_epochs": 1,
            "per_device_train_batch_size": 16,
            "per_device_eval_batch_size": 32,
            "weight_decay": 0.1,
            "warmup_steps": 0.05,
            "lr_scheduler_type": "cosine",
            "logging_steps": 20,
            "save_strategy": "steps",
            "save_steps": 500,
            "save_total_limit": 1,
        }


@dataclass
class Data:
    train: list[str]
    eval: list[str]


def as_list(spec: str | list[str] | None) -> list[str]:
    return [] if spec is None else [spec] if isinstance(spec, str) else list(spec)


def texts_of(table: Table, column: str) -> list[str]:
    """One text per row: the text column, or (e.g. Alpaca records) the row's string fields joined."""
    texts = []
    for i, row in enumerate(table.rows):
        value = row.get(column)
        if value is None:
            value = "\n".join(v for v in row.values() if isinstance(v, str) and v.strip())
        if not isinstance(value, str):
            raise UserError(f"{table.where(i)}: {column!r} must be text, got {type(value).__name__}")
        if value.strip():
            texts.append(value)
    if not texts:
        raise UserError(f"{table.source}: no text found (data.text_column is {column!r})")
    return texts


def check(config: Config) -> Data:
    read = lambda specs, key: [t for s in as_list(specs) for t in texts_of(read_table(s, key), config.data.text_column)]  # noqa: E731
    return Data(read(config.data.train, "data.train"), read(config.data.eval, "data.eval"))


def pack(tokenizer: Any, texts: list[str], block_size: int) -> list[dict[str, list[int]]]:
    """Tokenise, join documents with EOS, cut into full blocks (the ragged tail is dropped)."""
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id)
    return [{"input_ids": stream[i : i + block_size]} for i in range(0, len(stream) - block_size + 1, block_size)]


def split_blocks(blocks: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out a random (seeded) share of blocks, so held-out text comes from every source."""
    held = set(random.Random(seed).sample(range(len(blocks)), max(1, int(len(blocks) * fraction)))) if fraction else set()
    return [b for i, b in enumerate(blocks) if i not in held], [b for i, b in enumerate(blocks) if i in held]


def build_tokenizer(config: Config, data: Data) -> Any:
    from tunekit.chat import train_tokenizer
    from tunekit.models import load_tokenizer

    if config.model.tokenizer or config.model.name:
        return load_tokenizer(config.model)
    return train_tokenizer(data.train, config.tokenizer.vocab_size)


def build_model(config: Config, tokenizer: Any) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from tunekit.models import load_for_training

    auto = AutoModelForMaskedLM if config.pretrain.objective == "mlm" else AutoModelForCausalLM
    ids = {}
    if config.model.config is not None:  # a new model: its embeddings and special ids follow the tokenizer
        ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
               "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}
    return load_for_training(auto, config.model, config.peft, "CAUSAL_LM", **ids)


def run(config: Config, data: Data, run_dir: Path, overwrite: bool = False, resume: Any = None) -> dict[str, float]:
    from transformers import DataCollatorForLanguageModeling, Trainer

    from tunekit.models import count_parameters
    from tunekit.outputs import RunFolder
    from tunekit.training import MetricsLog, effective_batch_size, fit, training_arguments

    run = RunFolder(run_dir)
    args = training_arguments(config, run)
    run.enabled = args.process_index == 0
    tokenizer = build_tokenizer(config, data)
    if config.pretrain.objective == "mlm" and tokenizer.mask_token is None:
        raise UserError("model.tokenizer: the tokenizer has no mask token; masked-LM pre-training needs one")
    blocks = pack(tokenizer, data.train, config.data.block_size)
    if data.eval:
        train, held_out = blocks, pack(tokenizer, data.eval, config.data.block_size)
    else:
        train, held_out = split_blocks(blocks, config.data.eval_fraction, args.seed)
    if not train:
        raise UserError(f"data.train: fewer than {config.data.block_size} tokens; lower data.block_size or add text")
    model = build_model(config, tokenizer)
    trainable, total = count_parameters(model)
    run.start(
        "pretrain", to_yaml(config), overwrite, base_model=config.model.name or "random init (model.config)",
        train_data=config.data.train, eval_data=config.data.eval or f"{config.data.eval_fraction:.0%} of blocks",
        train_rows=len(train), eval_rows=len(held_out), trainable_params=trainable, total_params=total,
        num_processes=args.world_size, effective_batch_size=effective_batch_size(args),
        tokens_per_block=config.data.block_size,
    )
    collator = DataCollatorForLanguageModeling(
        tokenizer, mlm=config.pretrain.objective == "mlm", mlm_probability=config.pretrain.mlm_probability)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out or None,
                      processing_class=tokenizer, data_collator=collator, callbacks=[MetricsLog(run)])
    fit(trainer, run, resume, tokens_per_sample=config.data.block_size)
    metrics = {}
    if held_out:
        loss = trainer.evaluate()["eval_loss"]
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50)), "eval_tokens": len(held_out) * config.data.block_size}
    run.write_eval(metrics)
    if getattr(model, "generation_config", None) is not None:  # causal LMs: generation stops at EOS
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    run.save_model(model, tokenizer)
    run.finish(metrics)
    return metrics
