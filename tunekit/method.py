"""What a training method is made of: the `Method` record each method module ends with (listed once,
in tunekit.methods.METHODS), and the `Setup` its `setup` hands to the run skeleton
(tunekit.training.execute), which runs every method through the same sequence."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunekit.jsontypes import JsonObject, Metrics

if TYPE_CHECKING:
    from tunekit.config import Recipe
    from tunekit.data.prepare import Prepared
    from tunekit.runs.folder import RunFolder, Task


@dataclass(frozen=True)
class Method:
    name: str  # the command, and the `method:` a recipe names
    summary: str  # the command's help line
    Config: type[Recipe]
    check: Callable[[Any], Any]  # config -> checked data
    setup: Callable[..., Any]  # (config, data, run folder) -> tunekit.training.Setup
    task: Callable[[Any], Task]  # config -> the model head the run trains
    loss_units: str  # what its logged loss is, for loss.png's axis
    step_unit: str = "optimizer updates"  # what one logged step is
    prepare: Callable[..., list[tuple[str, Prepared]]] | None = None  # config, data -> tokenised splits
    eval_run: Callable[..., Metrics] | None = None  # run folder, data file -> metrics
    predict_run: Callable[..., Any] | None = None  # run folder, data file -> predictions


@dataclass
class Setup:
    """What a method supplies to the run skeleton, built after its data and model are loaded."""

    model: Any  # the model to train (its parameters are counted for run.json)
    tokenizer: Any  # saved with the model
    info: JsonObject  # run.json facts of this run: data, rows, processes, effective batch, ...
    train: Callable[[RunFolder, Path | None], Any]  # trains (from a checkpoint, if given); returns the trainer
    evaluate: Callable[[Any], Metrics]  # eval.json, from what `train` returned
    trained_model: Callable[[Any], Any] = lambda trainer: trainer.model  # what is saved, from what `train` returned
