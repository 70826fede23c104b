"""What every Trainer-based method shares: TrainingArguments from the recipe, the metrics log,
the training-health check, and the train -> evaluate -> save sequence."""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback

from tunekit.config import Recipe
from tunekit.errors import UserError
from tunekit.outputs import RunFolder


class TrainingFailure(RuntimeError):
    """Training went wrong in a way the user must hear about (exit code 1)."""


def training_arguments(config: Recipe, run: RunFolder) -> Any:
    """The method's TrainingArguments class filled from `train:` (already checked and defaulted)."""
    try:
        return config.train_args_class()(output_dir=str(run.path), **config.train)
    except (ValueError, TypeError) as err:
        raise UserError(f"train: {str(err).splitlines()[0]}") from None


class MetricsLog(TrainerCallback):
    """Appends each logging step to metrics.jsonl and stops on a non-finite loss."""

    def __init__(self, run: RunFolder) -> None:
        self.run = run

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not logs:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        if state.is_world_process_zero:
            self.run.log(record)
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise TrainingFailure(
                f"loss became {loss} at step {state.global_step}; lower train.learning_rate or check the data "
                f"(the last good checkpoint, if any, is kept in {self.run.path})"
            )


def effective_batch_size(args: Any) -> int:
    return args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps


def strip_prefix(metrics: dict[str, Any], prefix: str = "eval_") -> dict[str, Any]:
    """Trainer's `eval_accuracy` -> `accuracy`; runtime counters dropped (they are not results)."""
    noise = ("runtime", "samples_per_second", "steps_per_second", "epoch")
    return {k.removeprefix(prefix): v for k, v in metrics.items() if not k.removeprefix(prefix).endswith(noise)}


def fit(trainer: Any, run: RunFolder, resume: str | bool | None = None) -> None:
    """Train, turning a crash into a `failed` status with the reason."""
    try:
        trainer.train(resume_from_checkpoint=resume or None)
    except BaseException as err:
        run.fail(f"{type(err).__name__}: {err}")
        raise
