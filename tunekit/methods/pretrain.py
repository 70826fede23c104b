"""`tunekit pretrain`: language-model pre-training, causal (GPT: predict every next token) or masked
(BERT: predict 15% hidden tokens), from a config (random init) or a checkpoint (continued).

Text is tokenised, joined with EOS between documents, and packed into fixed blocks, so no compute
is spent on padding. With no tokenizer named, a byte-level BPE tokenizer is trained on the corpus,
with the special tokens and chat template that `tunekit sft` needs later.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from tunekit.config import Recipe, Section
from tunekit.data.corpus import Source, packed, sources, stream_position, streamed, texts
from tunekit.data.prepare import Prepared
from tunekit.errors import UserError
from tunekit.jsontypes import Metrics
from tunekit.method import Method, Setup
from tunekit.train_section import CHECKPOINTS, TrainSection


class PretrainData(Section):
    train: str | list[str] = Field(description="text files (.txt, or .jsonl/.json/.csv with a text column)")
    eval: str | list[str] | None = Field(None, description="held-out text; default: eval_fraction of the blocks")
    text_column: str = Field("text", description="column with the text; records without it join their string fields")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="share of blocks held out when no eval file is given")
    block_size: int = Field(256, gt=1, description="tokens per training block")
    num_proc: int | None = Field(None, gt=0, description="processes that tokenise (default: the cores available)")
    streaming: bool = Field(False, description="tokenise while training, for a corpus too large to prepare "
                            "(needs train.max_steps; held-out text only from data.eval)")


class TokenizerSection(Section):
    vocab_size: int = Field(8192, ge=300, description="vocabulary of the BPE tokenizer trained when none is named")


class PretrainTask(Section):
    objective: Literal["causal", "mlm"] = Field("causal", description="causal = next token (GPT); mlm = masked (BERT)")
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="share of tokens masked for mlm")


# `train:` defaults of `tunekit pretrain` (the user's values win)
TRAIN_DEFAULTS = {
    "learning_rate": 1e-3, "num_train_epochs": 1, "weight_decay": 0.1, "warmup_steps": 0.05,
    "lr_scheduler_type": "cosine", "per_device_train_batch_size": 16, "per_device_eval_batch_size": 32,
    "logging_steps": 20, **CHECKPOINTS,
}


class Config(Recipe):
    """A pre-training recipe: a model (or a config to build one), a corpus and the objective."""

    train_section = TrainSection(defaults=TRAIN_DEFAULTS)
    data: PretrainData
    tokenizer: TokenizerSection = TokenizerSection()
    pretrain: PretrainTask = PretrainTask()

    @model_validator(mode="after")
    def _steps_when_streaming(self) -> Config:
        if self.data.streaming and int(self.train.get("max_steps", -1) or -1) <= 0:
            raise ValueError("data.streaming: a streamed corpus has no known length; set train.max_steps")
        return self

    @model_validator(mode="after")
    def _tokenizer_for_mlm(self) -> Config:
        if self.pretrain.objective == "mlm" and not (self.model.name or self.model.tokenizer):
            raise ValueError("pretrain.objective mlm needs a tokenizer with a mask token: set model.tokenizer")
        return self


@dataclass
class Data:
    train: list[Source]
    eval: list[Source]


def as_list(spec: str | list[str] | None) -> list[str]:
    return [] if spec is None else [spec] if isinstance(spec, str) else list(spec)


def check(config: Config) -> Data:
    column, streaming = config.data.text_column, config.data.streaming
    return Data(sources(as_list(config.data.train), "data.train", column, streaming),
                sources(as_list(config.data.eval), "data.eval", column, streaming))


def split_blocks(count: int, fraction: float, seed: int) -> tuple[Any, Any]:
    """Row numbers of the training and held-out blocks: a random (seeded) share of the blocks is
    held out, so held-out text comes from every source."""
    import numpy as np

    held = np.zeros(count, dtype=bool)
    if fraction:
        held[random.Random(seed).sample(range(count), max(1, int(count * fraction)))] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def prepare(config: Config, data: Data, tokenizer: Any = None, seed: int | None = None) -> list[tuple[str, Prepared]]:
    """The corpus tokenised and packed into blocks (cached), split into training and held-out blocks
    (drawn with `seed`, default train.seed)."""
    if tokenizer is None:
        tokenizer = build_tokenizer(config, data)
    size, procs = config.data.block_size, config.data.num_proc
    blocks = packed(data.train, tokenizer, size, procs)
    if data.eval:
        return [("train", blocks), ("eval", packed(data.eval, tokenizer, size, procs))]
    train, held = split_blocks(blocks.rows, config.data.eval_fraction, config.args.seed if seed is None else seed)
    return [("train", subset(blocks, train, size)), ("eval", subset(blocks, held, size))]


def subset(blocks: Prepared, rows: Any, block_size: int) -> Prepared:
    tokens = len(rows) * block_size
    return Prepared(blocks.dataset.select(rows), len(rows), tokens, tokens, blocks.path)


def build_tokenizer(config: Config, data: Data) -> Any:
    """The recipe's tokenizer, or a BPE tokenizer trained on the training corpus (cached under it)."""
    from transformers import AutoTokenizer

    from tunekit.data import cache
    from tunekit.data.chat import train_tokenizer
    from tunekit.files import write_folder
    from tunekit.models import load_tokenizer

    if config.model.tokenizer or config.model.name:
        return load_tokenizer(config.model)
    folder = cache.folder("tokenizers") / cache.digest([s.key for s in data.train], config.tokenizer.vocab_size)
    if (folder / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    tokenizer = train_tokenizer(texts(data.train), config.tokenizer.vocab_size)
    if not config.data.streaming:  # atomic: a crash or a second process never leaves half a tokenizer
        write_folder(folder, tokenizer.save_pretrained, keep_existing=True)
    return tokenizer


def build_model(config: Config, tokenizer: Any) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from tunekit.models import load_for_training

    auto = AutoModelForMaskedLM if config.pretrain.objective == "mlm" else AutoModelForCausalLM
    ids = {}
    if config.model.config is not None:  # a new model: its embeddings and special ids follow the tokenizer
        ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
               "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}
    return load_for_training(auto, config.model, config.peft, "CAUSAL_LM", **ids)


def training_blocks(config: Config, data: Data, tokenizer: Any, seed: int) -> tuple[Any, Any]:
    """The training and held-out blocks: prepared (cached Arrow), or streamed (data.streaming)."""
    size = config.data.block_size
    if config.data.streaming:
        return streamed(data.train, tokenizer, size), streamed(data.eval, tokenizer, size) if data.eval else None
    prepared = dict(prepare(config, data, tokenizer, seed))
    train, held_out = prepared["train"].dataset, prepared["eval"].dataset
    if not len(train):
        raise UserError(f"data.train: fewer than {size} tokens; lower data.block_size or add text")
    return train, held_out if len(held_out) else None


def rows_of(dataset: Any) -> int | str:
    return "streamed" if dataset is not None and not hasattr(dataset, "__len__") else len(dataset or [])


def setup(config: Config, data: Data, run: Any) -> Any:
    from transformers import DataCollatorForLanguageModeling, Trainer

    from tunekit.training import batch_info, first_on_each_machine, trainer_fit, training_arguments

    args = training_arguments(config, run)
    with first_on_each_machine(args, "preparing the corpus"):  # the other ranks then load the cache
        tokenizer = build_tokenizer(config, data)
        if config.pretrain.objective == "mlm" and tokenizer.mask_token is None:
            raise UserError("model.tokenizer: the tokenizer has no mask token; masked-LM pre-training needs one")
        train, held_out = training_blocks(config, data, tokenizer, args.seed)
    model = build_model(config, tokenizer)
    collator = DataCollatorForLanguageModeling(
        tokenizer, mlm=config.pretrain.objective == "mlm", mlm_probability=config.pretrain.mlm_probability)

    def make_trainer(callbacks: list[Any]) -> Any:
        return Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                       processing_class=tokenizer, data_collator=collator, callbacks=callbacks)

    def evaluate(trainer: Any) -> Metrics:
        metrics: Metrics = {}
        if held_out is not None:
            loss = trainer.evaluate()["eval_loss"]
            metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
            if not config.data.streaming:
                metrics["eval_tokens"] = len(held_out) * config.data.block_size
        if getattr(model, "generation_config", None) is not None:  # causal LMs: generation stops at EOS
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        return metrics

    info = {"base_model": config.model.name or "random init (model.config)", "train_data": config.data.train,
            "eval_data": config.data.eval or f"{config.data.eval_fraction:.0%} of blocks",
            "train_rows": rows_of(train), "eval_rows": rows_of(held_out), **batch_info(args),
            "tokens_per_block": config.data.block_size}
    fit = trainer_fit(make_trainer, config.data.block_size)

    def train_model(run: Any, resume: Path | None) -> Any:
        nonlocal train
        if config.data.streaming and resume:  # the stream itself starts where the run stopped, not the Trainer
            position = stream_position(Path(resume), args)
            print(f"tunekit: resuming a streamed corpus after {position.steps} steps: the blocks trained on in the "
                  "current pass are read and tokenised again, not trained on, to start where the run stopped",
                  file=sys.stderr, flush=True)
            train, args.ignore_data_skip = streamed(data.train, tokenizer, config.data.block_size, position), True
        return fit(run, resume)

    return Setup(model, tokenizer, info, train_model, evaluate, trained_model=lambda trainer: model)


def task(config: Config) -> str:
    """The head this recipe trains: masked LM (BERT) or causal LM (GPT)."""
    return "masked-lm" if config.pretrain.objective == "mlm" else "causal-lm"


METHOD = Method("pretrain", "Pre-train a language model (causal or masked) on text, from a config or a checkpoint.",
                Config, check, setup, task, loss_units="cross-entropy per token, nats", prepare=prepare)
