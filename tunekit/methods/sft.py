"""`tunekit sft`: instruction fine-tuning of a causal LM on TRL's SFTTrainer, loss on the response only.

Alpaca rows, prompt/completion pairs and conversations all become conversations; tunekit's one
masking function (tunekit.masking) turns each into input ids and labels (-100 on the prompt), and
SFTTrainer trains on those labels as given. The end-of-turn token is trained, so the model learns
to stop. eval.json reports the held-out response-only loss before and after training.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from transformers import TrainerCallback

from tunekit.config import Recipe, Section, to_yaml
from tunekit.data import Table, read_table
from tunekit.errors import UserError
from tunekit.generation import GenerationSection
from tunekit.masking import detect_format, to_messages

# SFTTrainer options that tunekit decides itself (the labels come from tunekit.masking).
RESERVED = {
    "completion_only_loss": "use sft.completion_only_loss",
    "assistant_only_loss": "use sft.completion_only_loss (it covers assistant turns too)",
    "dataset_text_field": "use data.columns",
}


class SftData(Section):
    train: str | list[str] = Field(description="training file(s): Alpaca, prompt/completion, messages or text")
    eval: str | list[str] | None = Field(None, description="held-out file(s); default: the last data.eval_size rows")
    eval_size: int = Field(0, ge=0, description="rows held out from the end of the training data when no eval file")
    format: Literal["alpaca", "prompt_completion", "messages", "hh", "text"] | None = Field(
        None, description="data format; default: detected from the columns")
    columns: dict[str, str] = Field(default_factory=dict, description="standard name -> your column, e.g. {output: answer}")
    train_limit: int | None = Field(None, gt=0, description="use the first N training rows")


class SftTask(Section):
    completion_only_loss: bool = Field(True, description="loss on responses (assistant turns) only; false = every token")


class Config(Recipe):
    command = "sft"
    data: SftData
    sft: SftTask = SftTask()
    generation: GenerationSection = GenerationSection()

    @classmethod
    def train_args_class(cls) -> type:
        from trl import SFTConfig

        return SFTConfig

    @classmethod
    def reserved_train_keys(cls) -> dict[str, str]:
        return RESERVED

    @classmethod
    def train_defaults(cls) -> dict[str, Any]:
        return {
            "learning_rate": 2e-5,
            "num_train_epochs": 3,
            "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 16,
            "max_length": 1024,
            "warmup_steps": 0.03,
            "lr_scheduler_type": "cosine",
            "logging_steps": 10,
            "save_strategy": "steps",
            "save_steps": 500,
            "save_total_limit": 1,
            "train_sampling_strategy": "group_by_length",  # batches of similar length: little padding
        }


@dataclass
class Split:
    """Conversations (or plain texts for the text format) of one split, with where each came from."""

    kind: str
    rows: list[Any]
    where: list[str]


@dataclass
class Data:
    train: Split
    eval: Split | None


def read_split(specs: str | list[str], config: Config, key: str) -> Split:
    specs = [specs] if isinstance(specs, str) else specs
    tables = [renamed(read_table(spec, key), config.data.columns) for spec in specs]
    kinds = {detect_format(t, config.data.format) for t in tables}
    if len(kinds) > 1:
        raise UserError(f"{key}: the files mix formats ({', '.join(sorted(kinds))}); use one format")
    kind = kinds.pop()
    rows, where = [], []
    for table in tables:
        for i, row in enumerate(table.rows):
            if kind == "text":
                text = row.get("text")
                if not isinstance(text, str) or not text.strip():
                    raise UserError(f"{table.where(i)}: 'text' is missing or empty")
                rows.append(text)
            else:
                rows.append(to_messages(row, kind, table.where(i)))
            where.append(table.where(i))
    return Split(kind, rows, where)


def renamed(table: Table, columns: dict[str, str]) -> Table:
    """Apply data.columns (standard name -> file column) so the format code sees standard names."""
    if not columns:
        return table
    missing = [c for c in columns.values() if c not in table.columns]
    if missing:
        raise UserError(f"{table.source}: data.columns names {missing[0]!r}, which is not a column ({', '.join(table.columns)})")
    rows = [{**row, **{std: row[col] for std, col in columns.items()}} for row in table.rows]
    return Table(table.source, rows, table.lines)


def check(config: Config) -> Data:
    train = read_split(config.data.train, config, "data.train")
    if train.kind == "text" and config.sft.completion_only_loss:
        raise UserError(f"{config.source}: sft.completion_only_loss: text data has no prompt/response split; "
                        "set sft.completion_only_loss: false (train on every token) or use a prompt/response format")
    if config.data.train_limit:
        train = Split(train.kind, train.rows[: config.data.train_limit], train.where[: config.data.train_limit])
    evaluation = read_split(config.data.eval, config, "data.eval") if config.data.eval else None
    if evaluation is None and config.data.eval_size:
        if config.data.eval_size >= len(train.rows):
            raise UserError(f"{config.source}: data.eval_size: {config.data.eval_size} leaves no training rows")
        cut = len(train.rows) - config.data.eval_size
        evaluation = Split(train.kind, train.rows[cut:], train.where[cut:])
        train = Split(train.kind, train.rows[:cut], train.where[:cut])
    if evaluation is not None:
        train = without_held_out(train, evaluation)
    return Data(train, evaluation)


def without_held_out(train: Split, held_out: Split) -> Split:
    """Training rows identical to a held-out one are dropped (the Alpaca subsets share 48 rows),
    so the held-out loss measures examples the model has not been trained on."""
    key = lambda row: json.dumps(row, sort_keys=True)  # noqa: E731
    held = {key(row) for row in held_out.rows}
    keep = [i for i, row in enumerate(train.rows) if key(row) not in held]
    if len(keep) == len(train.rows):
        return train
    if not keep:
        raise UserError("data.train: every training row is also a held-out row; hold out different data")
    print(f"tunekit: {len(train.rows) - len(keep)} training rows are identical to held-out rows; "
          "they are left out of training", file=sys.stderr)
    return Split(train.kind, [train.rows[i] for i in keep], [train.where[i] for i in keep])


def tokenize_split(tokenizer: Any, split: Split, config: Config) -> list[dict[str, list[int]]]:
    from tunekit.masking import tokenize_conversation, tokenize_text

    max_length = config.train.get("max_length")
    rows = []
    for row, where in zip(split.rows, split.where):
        if split.kind == "text":
            item = tokenize_text(tokenizer, row, max_length)
        else:
            item = tokenize_conversation(tokenizer, row, max_length, train_all=not config.sft.completion_only_loss)
        if item.trained == 0:
            raise UserError(f"{where}: no token left to train on after truncation to train.max_length={max_length}")
        rows.append({"input_ids": item.input_ids, "labels": item.labels})
    return rows


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

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
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


class LossAtStart(TrainerCallback):
    """The held-out loss of the model as it starts training, measured once the Trainer has prepared
    it: under FSDP2 a model is sharded together with its optimizer, inside train(), so an evaluation
    before train() cannot prepare it (accelerate 1.15 refuses a model alone)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.loss: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import torch

        with torch.random.fork_rng():  # the evaluation draws from the RNG; training must not see it
            self.loss = self.trainer.evaluate()["eval_loss"]


def tokens_per_sample(dataset: Any) -> float:
    """Mean tokens of a training row (a packed row when packing is on), for the progress display."""
    return sum(len(ids) for ids in dataset["input_ids"]) / max(len(dataset), 1)


def load_model_and_tokenizer(config: Config) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    from tunekit.chat import ensure_chat_template
    from tunekit.models import load_for_training, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    ensure_chat_template(tokenizer, config.model.chat_template)
    model = load_for_training(AutoModelForCausalLM, config.model, config.peft, "CAUSAL_LM")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def build_trainer(config: Config, data: Data, run: Any, args: Any, overwrite: bool = False) -> Any:
    """The trainer `tunekit sft` trains with (model, tokenised and packed data, collator, metrics
    log), with the run folder started; bench/gpu.py times this same trainer."""
    from datasets import Dataset

    from tunekit.models import count_parameters
    from tunekit.progress import show_progress
    from tunekit.training import MetricsLog, effective_batch_size, once
    from tunekit.upstream import LeanSFTTrainer

    model, tokenizer = load_model_and_tokenizer(config)
    train = Dataset.from_list(once(args, "train", lambda: tokenize_split(tokenizer, data.train, config)))
    held_out = Dataset.from_list(once(args, "eval", lambda: tokenize_split(tokenizer, data.eval, config))) if data.eval else None
    trainable, total = count_parameters(model)
    run.start(
        "sft", to_yaml(config), overwrite, base_model=config.model.name, train_data=config.data.train,
        eval_data=config.data.eval or f"last {config.data.eval_size} rows", train_rows=len(train),
        eval_rows=len(held_out) if held_out is not None else 0, trainable_params=trainable, total_params=total,
        num_processes=args.world_size, effective_batch_size=effective_batch_size(args), data_format=data.train.kind,
    )
    collator = None
    if args.packing:  # packed here, collated as separate rows (PackedRows), not by TRL
        train = packed(train, args.max_length, args.packing_strategy)
        collator = PackedRows(tokenizer.pad_token_id)
        args.packing = args.padding_free = False
    trainer = LeanSFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                             processing_class=tokenizer, data_collator=collator, callbacks=[MetricsLog(run)])
    show_progress(trainer, tokens_per_sample(trainer.train_dataset))
    return trainer


def run(config: Config, data: Data, run_dir: Path, overwrite: bool = False, resume: Any = None) -> dict[str, float]:
    from tunekit.outputs import RunFolder
    from tunekit.training import fit, training_arguments

    run = RunFolder(run_dir)
    args = training_arguments(config, run)
    run.enabled = args.process_index == 0
    trainer = build_trainer(config, data, run, args, overwrite)
    held_out = trainer.eval_dataset
    before = run.logged("eval_loss", step=0) if resume else None  # measured before the interruption
    at_start = LossAtStart(trainer) if not resume and held_out is not None else None
    if at_start:
        trainer.add_callback(at_start)
    fit(trainer, run, resume)
    metrics: dict[str, float] = {}
    if held_out is not None:
        before = at_start.loss if at_start else before
        after = trainer.evaluate()["eval_loss"]
        metrics = {"loss": after, "perplexity": math.exp(min(after, 50))}
        if before is not None:  # None only for a resumed run whose metrics.jsonl lost step 0
            metrics.update(loss_before=before, perplexity_before=math.exp(min(before, 50)))
    run.write_eval(metrics)
    run.save_model(trainer.model, trainer.processing_class)
    run.finish(metrics)
    return metrics


def heldout_prompts(run_dir: Path, count: int) -> list[list[dict[str, str]]]:
    """The prompts of the first `count` held-out conversations of a finished SFT run."""
    from tunekit.config import validate_config
    from tunekit.masking import prompt_part
    from tunekit.outputs import read_run_config

    config = validate_config(Config, read_run_config(run_dir), str(run_dir / "config.yaml"))
    data = check(config)
    if data.eval is None or data.eval.kind == "text":
        raise UserError(f"{run_dir}: the run has no held-out conversations (data.eval / data.eval_size)")
    return [prompt_part(messages) for messages in data.eval.rows[:count]]
