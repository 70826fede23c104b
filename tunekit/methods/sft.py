"""`tunekit sft`: instruction fine-tuning of a causal LM on TRL's SFTTrainer, loss on the response only.

Alpaca rows, prompt/completion pairs and conversations all become conversations; tunekit's one
masking function (tunekit.data.masking) turns each into input ids and labels (-100 on the prompt), and
SFTTrainer trains on those labels as given. The end-of-turn token is trained, so the model learns
to stop. eval.json reports the held-out response-only loss before and after training.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tunekit.config import Section
from tunekit.data.masking import detect_format, to_messages
from tunekit.data.prepare import Prepared
from tunekit.data.tables import Splits, Table, join, read_table
from tunekit.errors import UserError
from tunekit.generation import ChatRecipe
from tunekit.jsontypes import Metrics, Row
from tunekit.method import Method, Setup
from tunekit.train_section import CHECKPOINTS, TrainSection

# SFTTrainer options that tunekit decides itself (the labels come from tunekit.data.masking).
RESERVED = {
    "completion_only_loss": "use sft.completion_only_loss",
    "assistant_only_loss": "use sft.completion_only_loss (it covers assistant turns too)",
    "dataset_text_field": "use data.columns",
}


def arguments() -> type:
    from trl import SFTConfig

    return SFTConfig


class SftData(Section):
    train: str | list[str] = Field(description="training file(s): Alpaca, prompt/completion, messages or text")
    eval: str | list[str] | None = Field(None, description="held-out file(s); default: the last data.eval_size rows")
    eval_size: int = Field(0, ge=0, description="rows held out from the end of the training data when no eval file")
    format: Literal["alpaca", "prompt_completion", "messages", "hh", "text"] | None = Field(
        None, description="data format; default: detected from the columns")
    columns: dict[str, str] = Field(default_factory=dict, description="standard name -> your column, e.g. {output: answer}")
    train_limit: int | None = Field(None, gt=0, description="use the first N training rows")
    num_proc: int | None = Field(None, gt=0, description="processes that tokenise (default: the cores available)")
    max_length: int = Field(1024, gt=0, description="tokens per example (and per packed row); longer ones are cut")


class SftTask(Section):
    completion_only_loss: bool = Field(True, description="loss on responses (assistant turns) only; false = every token")


# `train:` defaults of `tunekit sft` (the user's values win)
TRAIN_DEFAULTS = {
    "learning_rate": 2e-5, "num_train_epochs": 3, "warmup_steps": 0.03, "lr_scheduler_type": "cosine",
    "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16,
    "train_sampling_strategy": "group_by_length",  # batches of similar length: little padding
    "logging_steps": 10, **CHECKPOINTS,
}


class Config(ChatRecipe):
    """An SFT recipe: a causal LM, conversations (or prompt/response rows) and which tokens carry loss."""

    train_section = TrainSection(arguments=arguments, defaults=TRAIN_DEFAULTS, reserved=RESERVED,
                                 from_data=("max_length",))
    data: SftData
    sft: SftTask = SftTask()


@dataclass
class Split:
    """The rows of one split (Arrow, columns under their standard names) and their format."""

    kind: str
    table: Table

    def __len__(self) -> int:
        return len(self.table)

    def examples(self, limit: int | None = None) -> Iterator[tuple[Any, str]]:
        """(conversation, or text for the text format; where it came from) of each row, checked."""
        for i, row in enumerate(self.table.head(limit).rows):
            where = self.table.where(i)
            yield example(row, self.kind, where), where


def example(row: Row, kind: str, where: str) -> Any:
    """One row as what is trained on: a conversation, or a text for the text format."""
    if kind != "text":
        return to_messages(row, kind, where)
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}: 'text' is missing or empty")
    return text


def read_split(specs: str | list[str], config: Config, key: str) -> Split:
    specs = [specs] if isinstance(specs, str) else specs
    tables = [read_table(spec, key).renamed(config.data.columns) for spec in specs]
    kinds = {detect_format(t, config.data.format) for t in tables}
    if len(kinds) > 1:
        raise UserError(f"{key}: the files mix formats ({', '.join(sorted(kinds))}); use one format")
    return Split(kinds.pop(), join(tables))


def check(config: Config) -> Splits[Split]:
    train = read_split(config.data.train, config, "data.train")
    if train.kind == "text" and config.sft.completion_only_loss:
        raise UserError(f"{config.source}: sft.completion_only_loss: text data has no prompt/response split; "
                        "set sft.completion_only_loss: false (train on every token) or use a prompt/response format")
    if config.data.train_limit:
        train = Split(train.kind, train.table.head(config.data.train_limit))
    evaluation = read_split(config.data.eval, config, "data.eval") if config.data.eval else None
    if evaluation is None and config.data.eval_size:
        if config.data.eval_size >= len(train):
            for _ in train.examples():  # a bad row is the first thing to say
                pass
            raise UserError(f"{config.source}: data.eval_size: {config.data.eval_size} leaves no training rows")
        cut = len(train) - config.data.eval_size
        evaluation = Split(train.kind, train.table.select(range(cut, len(train))))
        train = Split(train.kind, train.table.select(range(cut)))
    return Splits(checked(train, evaluation), evaluation)


def checked(train: Split, held_out: Split | None) -> Split:
    """Every row checked (a streaming pass; the result is cached under the rows' key), and training
    rows identical to a held-out one dropped (the Alpaca subsets share 48 rows), so the held-out
    loss measures examples the model has not been trained on."""
    import numpy as np

    from tunekit.data import cache

    marker = cache.folder("checks") / f"{cache.digest(train.table.key, held_out and held_out.table.key, train.kind)}.json"
    found = cache.read_marker(marker)
    if found is None:
        held = {cache.digest(item) for item, _ in held_out.examples()} if held_out is not None else set()
        keep = [i for i, (item, _) in enumerate(train.examples()) if cache.digest(item) not in held]
        found = {"rows": len(train), "keep": None if len(keep) == len(train) else keep}
        cache.write_marker(marker, found)
    if found["keep"] is None:
        return train
    if not found["keep"]:
        raise UserError("data.train: every training row is also a held-out row; hold out different data")
    print(f"tunekit: {len(train) - len(found['keep'])} training rows are identical to held-out rows; "
          "they are left out of training", file=sys.stderr)
    return Split(train.kind, train.table.select(np.asarray(found["keep"], dtype=np.int64)))


@dataclass
class Encoder:
    """Tokenises and masks a batch of rows with tunekit.data.masking, one example at a time (the one
    function that decides labels); used by `Dataset.map(batched=True, with_indices=True)`."""

    tokenizer: Any
    split: Split
    max_length: int | None
    train_all: bool

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[list[int]]]:
        from tunekit.data.masking import tokenize_conversation, tokenize_text

        ids, labels = [], []
        for index, values in zip(indices, zip(*batch.values())):
            where = self.split.table.where(index)
            item = example(dict(zip(batch, values)), self.split.kind, where)
            if self.split.kind == "text":
                encoded = tokenize_text(self.tokenizer, item, self.max_length)
            else:
                encoded = tokenize_conversation(self.tokenizer, item, self.max_length, train_all=self.train_all)
            if encoded.trained == 0:
                raise UserError(f"{where}: no token left to train on after truncation to data.max_length={self.max_length}")
            ids.append(encoded.input_ids)
            labels.append(encoded.labels)
        return {"input_ids": ids, "labels": labels}


def tokenize_split(tokenizer: Any, split: Split, config: Config) -> Prepared:
    """The split's input ids and labels (Arrow), built in parallel once and cached under the rows,
    the tokenizer with its chat template, and the masking and length options."""
    from tunekit.data import cache, prepare

    max_length = config.data.max_length
    train_all = not config.sft.completion_only_loss
    key = cache.digest("sft", split.table.key, split.kind, cache.tokenizer_key(tokenizer), max_length, train_all)
    encoder = Encoder(tokenizer, split, max_length, train_all)
    return prepare.mapped(split.table, key, encoder, config.data.num_proc)


def prepare(config: Config, data: Splits[Split], tokenizer: Any = None) -> list[tuple[str, Prepared]]:
    """Tokenise and mask both splits (from the cache when an earlier run did)."""
    if tokenizer is None:
        from tunekit.models import load_chat_tokenizer

        tokenizer = load_chat_tokenizer(config.model)
    prepared = [("train", tokenize_split(tokenizer, data.train, config))]
    if data.eval is not None:
        prepared.append(("eval", tokenize_split(tokenizer, data.eval, config)))
    return prepared


def packed(dataset: Any, max_length: int, strategy: str = "bfd") -> Any:
    """Conversations packed into rows of at most max_length tokens by TRL's pack_dataset
    (train.packing_strategy; bfd = best-fit-decreasing, whole conversations); with bfd each row
    keeps the lengths of its sequences in `seq_lengths`."""
    from trl.data_utils import pack_dataset

    return pack_dataset(dataset, max_length, strategy)


@dataclass
class PackedRows:
    """Collates packed rows as a [rows, longest row] batch, without an attention mask.

    Position ids restart at 0 with every sequence of a row, and transformers then builds a
    block-diagonal causal mask from them: no token attends across a sequence boundary. The padding
    at the end of a row is one more sequence, with label -100. The first token of each sequence gets
    label -100 too, so no token is predicted from the sequence before it.

    TRL's padding-free collator instead joins the whole batch into one row; without flash-attention
    varlen kernels (CPUs, most GPUs' sdpa) that costs attention over batch x length tokens at once,
    8x the work of separate rows at batch 8, which made packing slower than padding (bench/sft.py).
    """

    pad_token_id: int

    def __call__(self, rows: list[Row]) -> dict[str, Any]:
        import torch

        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            length = len(row["input_ids"])
            input_ids[i, :length] = torch.tensor(row["input_ids"])
            labels[i, :length] = torch.tensor(row["labels"])
            start = 0
            for size in [*row.get("seq_lengths", [length]), width - length]:
                if size:
                    position_ids[i, start : start + size] = torch.arange(size)
                    labels[i, start] = -100
                    start += size
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def tokens_per_sample(dataset: Any) -> float:
    """Mean tokens of a training row (a packed row when packing is on), for the progress display."""
    import pyarrow.compute as pc

    column = dataset.with_format("arrow")["input_ids"]
    return (pc.sum(pc.list_value_length(column)).as_py() or 0) / max(len(dataset), 1)


def tokenised(config: Config, data: Splits[Split], args: Any) -> tuple[Any, Any, Any, Any]:
    """The model, its tokenizer and both splits tokenised (once per machine: the other ranks load
    the first one's cached result)."""
    from tunekit.models import load_causal_lm
    from tunekit.training import first_on_each_machine

    model, tokenizer = load_causal_lm(config.model, config.peft)
    with first_on_each_machine(args, "tokenising"):
        prepared = dict(prepare(config, data, tokenizer))
    held_out = prepared["eval"].dataset if "eval" in prepared else None
    return model, tokenizer, prepared["train"].dataset, held_out


def sft_trainer(args: Any, model: Any, tokenizer: Any, train: Any, held_out: Any, callbacks: list[Any]) -> Any:
    """The trainer `tunekit sft` trains with: packed rows when train.packing, collated as separate
    rows (PackedRows), not by TRL."""
    from tunekit.progress import show_progress
    from tunekit.upstream import LeanSFTTrainer

    collator = None
    if args.packing:
        train = packed(train, args.max_length, args.packing_strategy)
        collator = PackedRows(tokenizer.pad_token_id)
        args.packing = args.padding_free = False
    trainer = LeanSFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                             processing_class=tokenizer, data_collator=collator, callbacks=callbacks)
    show_progress(trainer, tokens_per_sample(trainer.train_dataset))
    return trainer


def build_trainer(config: Config, data: Splits[Split], args: Any, callbacks: list[Any]) -> Any:
    """What `tunekit sft` trains, in one call (bench/gpu.py times this same trainer)."""
    return sft_trainer(args, *tokenised(config, data, args), callbacks)


def setup(config: Config, data: Splits[Split], run: Any) -> Any:
    from tunekit.training import LossAtStart, batch_info, fit, training_arguments

    args = training_arguments(config, run)
    model, tokenizer, train, held_out = tokenised(config, data, args)
    info = {"train_data": config.data.train, "eval_data": config.data.eval or f"last {config.data.eval_size} rows",
            "train_rows": len(train), "eval_rows": len(held_out) if held_out is not None else 0, **batch_info(args),
            "data_format": data.train.kind}
    at_start: LossAtStart | None = None

    def train_model(run: Any, resume: Path | None) -> Any:
        nonlocal at_start
        from tunekit.training import MetricsLog

        trainer = sft_trainer(args, model, tokenizer, train, held_out, [MetricsLog(run)])
        at_start = LossAtStart(trainer) if not resume and held_out is not None else None
        if at_start:
            trainer.add_callback(at_start)
        fit(trainer, run, resume)
        return trainer

    def evaluate(trainer: Any) -> Metrics:
        if held_out is None:
            return {}
        before = at_start.loss if at_start else run.logged("eval_loss", step=0)  # resumed: as measured before
        after = trainer.evaluate()["eval_loss"]
        metrics = {"loss": after, "perplexity": math.exp(min(after, 50))}
        if before is not None:  # None only for a resumed run whose metrics.jsonl lost step 0
            metrics.update(loss_before=before, perplexity_before=math.exp(min(before, 50)))
        return metrics

    return Setup(model, tokenizer, info, train_model, evaluate)


def heldout_prompts(run_dir: Path, count: int) -> list[list[dict[str, str]]]:
    """The prompts of the first `count` held-out conversations of a finished SFT run."""
    from tunekit.config import load_run_config
    from tunekit.data.masking import prompt_part

    config = load_run_config(Config, run_dir)
    data = check(config)
    if data.eval is None or data.eval.kind == "text":
        raise UserError(f"{run_dir}: the run has no held-out conversations (data.eval / data.eval_size)")
    return [prompt_part(messages) for messages, _ in data.eval.examples(count)]


METHOD = Method("sft", "Instruction fine-tuning of a causal LM, with the loss on the responses only.", Config, check,
                setup, task=lambda config: "causal-lm", loss_units="cross-entropy per token, nats", prepare=prepare)
