"""A recipe's `train:` section: the arguments dataclass it is checked against and built as
(TrainingArguments, or the TRL config of the method), the defaults under the user's values (the
device's, then the method's), and the keys tunekit sets itself. Each method says its own in a
`TrainSection`; tunekit.config checks a recipe's `train:` with `resolve_train`."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tunekit.annotations import type_hints, type_name, value_fits
from tunekit.errors import UserError, shown_key

# Keys of `train:` that tunekit owns: the run folder decides where things are written.
RESERVED_TRAIN_KEYS = {"output_dir": "use --output-dir or the top-level `output_dir:` key"}
# The Trainer methods' checkpoints: every 500 optimizer steps, the latest kept (enough for --resume).
CHECKPOINTS = {"save_strategy": "steps", "save_steps": 500, "save_total_limit": 1}
# Keys of `train:` that must be strictly positive when given.
POSITIVE_TRAIN_KEYS = (
    "learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "logging_steps", "save_steps", "eval_steps",
)


def trainer_arguments() -> type:
    from transformers import TrainingArguments

    return TrainingArguments


@dataclass(frozen=True)
class TrainSection:
    """What a method's `train:` section is: the dataclass it is checked against and built as
    (TrainingArguments, or the TRL config of the method; imported when first needed), the method's
    defaults under the user's values (the user's always win), and the keys tunekit sets itself
    (-> what the user should set instead)."""

    arguments: Callable[[], type] = trainer_arguments
    defaults: Mapping[str, Any] = field(default_factory=dict)
    reserved: Mapping[str, str] = field(default_factory=dict)
    from_data: tuple[str, ...] = ()  # `data:` keys the arguments receive too (a TRL config's max_length)


def resolve_train(section: TrainSection, arguments: type, train: dict[str, Any], source: str) -> dict[str, Any]:
    """Check `train:` against the method's TrainingArguments fields and add the defaults."""
    fields = {f.name: f for f in dataclasses.fields(arguments) if f.init}
    hints = type_hints(arguments)
    reserved = {**RESERVED_TRAIN_KEYS, **section.reserved}
    for key, value in train.items():
        if key in reserved:
            raise UserError(f"{source}: train.{key}: set by tunekit; {reserved[key]}")
        if key not in fields:
            hint = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
            suggestion = f"did you mean {hint[0]}?" if hint else "see `transformers.TrainingArguments` for the options"
            raise UserError(f"{source}: train.{shown_key(key)}: unknown key; {suggestion}")
        expected = hints.get(key, Any)
        if not value_fits(value, expected):
            raise UserError(f"{source}: train.{key}: expected {type_name(expected)}, got {value!r}")
        if key in POSITIVE_TRAIN_KEYS and value is not None and value <= 0:
            raise UserError(f"{source}: train.{key}: must be greater than 0, got {value!r}")
    if train.get("num_train_epochs", 1) <= 0 and train.get("max_steps", -1) <= 0:
        raise UserError(f"{source}: train.num_train_epochs: must be greater than 0 (or set train.max_steps)")
    defaults = {**device_defaults(on_gpu=not train.get("use_cpu")), **section.defaults}
    if "gradient_checkpointing" in train:  # the old name of the same switch: the user's choice wins
        defaults.pop("activation_checkpointing")
    return {**defaults, **train}


def device_defaults(on_gpu: bool = True) -> dict[str, Any]:
    """Precision and memory settings that suit the device this process runs on (the CPU when
    there is no GPU or `on_gpu` is False, as with train.use_cpu).

    On a CPU, bf16 autocast and gradient checkpointing (the TRL defaults) together halved the tiny
    GPT's training speed, so both are off; on a GPU with bf16, mixed precision is on. (At
    SmolLM2-135M's shape on a CPU with AMX, bf16 autocast alone was 1.35-2x faster but cost the
    arithmetic recipe accuracy: bench/README.md; a recipe turns it on with train.bf16.)
    """
    import torch

    on_gpu = on_gpu and torch.cuda.is_available()
    bf16 = on_gpu and torch.cuda.is_bf16_supported()
    return {
        "bf16": bf16,
        "fp16": on_gpu and not bf16,
        "activation_checkpointing": False,  # the name transformers 5 gives gradient checkpointing
        "dataloader_pin_memory": on_gpu,
        "use_cpu": not on_gpu,  # also what makes several CPU processes join one gloo group
        "report_to": "none",
        "seed": 42,
        "logging_nan_inf_filter": False,  # a NaN loss must reach the health check, not be averaged away
    }
