"""The one run skeleton every method goes through, and what the Trainer-based methods share.

`execute` is the sequence: run folder, banner, metrics log, fit (with the watchdog and the
training-health check), evaluation, save, model card, finish. A method supplies only its parts
(`Setup`: its model, tokenizer, how it trains and what it reports), so no method writes that
sequence again. Also here: TrainingArguments from the recipe, the metrics log and tokenising once
per machine.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from tunekit.config import Recipe
from tunekit.distributed import check_started, describe_for_tests
from tunekit.errors import Interrupted, TrainingFailure
from tunekit.faults import inject_fault
from tunekit.jsontypes import JsonObject, Metrics
from tunekit.method import Method
from tunekit.runs.folder import RunFolder, checkpoint_step

if TYPE_CHECKING:
    from collections.abc import Callable


def execute(method: Method, config: Recipe, data: Any, run_dir: Path, overwrite: bool = False,
            resume: Path | None = None) -> Metrics:
    """Run a method: its parts, in the one sequence every run follows. Only the first process writes."""
    from tunekit.config import to_yaml
    from tunekit.launch import is_first_rank
    from tunekit.memory import keep_wanted, keeping, trim_interval, trimming
    from tunekit.models import count_parameters
    from tunekit.runs.library_warnings import hold_library_warnings

    trim = trim_interval()  # TUNEKIT_TRIM_MEMORY_S and _KEEP_MEMORY: a bad value stops here, before anything is written
    keep = keep_wanted(trim)
    run = RunFolder(run_dir, enabled=is_first_rank())
    hold_library_warnings()  # what the libraries say while the model loads goes to the run's log
    with keeping(keep), trimming(trim):
        setup = method.setup(config, data, run)
        trainable, total = count_parameters(setup.model)
        info = {"base_model": config.model.name, **setup.info}
        run.start(method.name, to_yaml(config), overwrite, task=method.task(config), peft=config.peft.method,
                  loss_units=method.loss_units, step_unit=method.step_unit, trainable_params=trainable,
                  total_params=total, **info)
        trained = setup.train(run, resume)
        metrics = setup.evaluate(trained)
        run.write_eval(metrics)
        run.save_model(setup.trained_model(trained), setup.tokenizer)
        run.finish(metrics)
    return metrics


def trainer_fit(make_trainer: Callable[[list[Any]], Any], tokens_per_sample: float | None = None) -> Callable[..., Any]:
    """`Setup.train` for a Trainer-based method: its Trainer (built with the metrics log as a
    callback) trained with tunekit's progress display, clean stop and failure status."""

    def train(run: RunFolder, resume: Path | None) -> Any:
        trainer = make_trainer([MetricsLog(run)])
        fit(trainer, run, resume, tokens_per_sample)
        return trainer

    return train


def batch_info(args: Any) -> JsonObject:
    """The run.json facts of how a Trainer-based run batches: processes and effective batch size."""
    return {"num_processes": args.world_size, "effective_batch_size": effective_batch_size(args)}


def training_arguments(config: Recipe, run: RunFolder) -> Any:
    """The recipe's typed training arguments, writing into the run folder, with the world size checked
    and the seed set (before the model is built: a randomly initialised model is reproducible too)."""
    from transformers import set_seed

    from tunekit.launch import check_world_size

    args = config.args
    args.output_dir = str(run.path)
    problem = check_world_size(args.world_size)
    if problem:
        raise TrainingFailure(problem)
    set_seed(args.seed)
    return args


class CheckpointMarks(TrainerCallback):
    """Marks each Trainer checkpoint complete (with the config it belongs to) once all of it is written."""

    def __init__(self, run: RunFolder) -> None:
        self.run = run

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        inject_fault("kill-before-mark", state.global_step)
        inject_fault(f"kill-before-mark-rank-{args.process_index}", state.global_step)
        if args.world_size > 1:  # every rank writes its part (its shard, its RNG state): mark after all have
            import torch.distributed as dist

            dist.barrier()
        if state.is_world_process_zero:
            self.run.mark_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        inject_fault("kill-after-save", state.global_step)


class MetricsLog(CheckpointMarks):
    """Appends each logging step to metrics.jsonl, stops on a non-finite loss, and marks each
    checkpoint complete (with the config it belongs to) once the Trainer has written all of it."""

    def __init__(self, run: RunFolder) -> None:
        super().__init__(run)
        self.watchdog: Watchdog | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        describe_for_tests(kwargs["model"], args.process_index)
        if args.world_size > 1:  # one process alone cannot hang waiting for another
            self.watchdog = Watchdog(args.ddp_timeout, args.process_index)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watchdog:
            self.watchdog.stop()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watchdog:
            self.watchdog.beat()
        inject_fault(f"stall-rank-{args.process_index}", state.global_step)
        inject_fault(f"crash-rank-{args.process_index}", state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: JsonObject | None = None, **kwargs: Any) -> None:
        if not logs:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        if state.is_world_process_zero:
            self.run.log(record)
        for key in ("loss", "grad_norm"):
            value = logs.get(key)
            if value is not None and not math.isfinite(value):
                raise TrainingFailure(
                    f"{key.replace('_', ' ')} became {value} at step {state.global_step}; lower train.learning_rate "
                    f"or check the data (the last good checkpoint, if any, is kept in {self.run.path})"
                )


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


class Watchdog:
    """Ends a multi-process run when a rank makes no progress for `limit` seconds (train.ddp_timeout).

    A rank that hangs leaves the others waiting inside a collective; gloo's own timeout is not set
    by transformers on CPU, so without this the run would hang silently. Exiting lets the launcher
    (torch elastic) stop every other rank and report the failure."""

    def __init__(self, limit: float, rank: int) -> None:
        import threading

        self.limit, self.rank, self.last = limit, rank, time.monotonic()
        self.stopped = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self.stopped.set()

    def _watch(self) -> None:
        while not self.stopped.wait(1.0):
            if time.monotonic() - self.last > self.limit:
                print(f"tunekit: training failed: rank {self.rank} made no progress for {self.limit:.0f} s "
                      "(another process hung or died; train.ddp_timeout sets the limit); stopping the run",
                      file=sys.stderr, flush=True)
                os._exit(1)


@contextlib.contextmanager
def first_on_each_machine(args: Any, desc: str) -> Any:
    """Local rank 0 runs the block first (building a cached result), the other ranks of the machine
    after it (finding the result in the cache); one process just runs it."""
    if args.world_size == 1:
        yield
        return
    from tunekit.distributed import local_main_first

    with local_main_first(args, desc):  # a wait not bounded by ddp_timeout
        yield


def once(args: Any, name: str, build: Any) -> Any:
    """Tokenise once per machine, not once per process: local rank 0 builds the examples and caches
    them (Arrow, safe to load), the other ranks wait for it and load the cache."""
    if args.world_size == 1:
        return build()
    import hashlib
    import tempfile

    from datasets import Dataset, load_from_disk

    machine = args.process_index - args.local_process_index  # machines on one host share its temp folder
    key = hashlib.sha256(f"{args.output_dir}/{name}/{machine}".encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"tunekit-{key}-{name}"
    from tunekit.distributed import local_main_first

    with local_main_first(args, f"tokenising {name}"):
        if args.local_process_index == 0:
            Dataset.from_list(build()).save_to_disk(str(cache))
    return load_from_disk(str(cache))  # Arrow, memory-mapped: not turned back into Python rows


def effective_batch_size(args: Any) -> int:
    return args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps


def fit(trainer: Any, run: RunFolder, resume: Path | None = None, tokens_per_sample: float | None = None) -> None:
    """Train (from a checkpoint, if given) with tunekit's progress display. A crash becomes a
    `failed` status with the reason; Ctrl-C saves a checkpoint first, then raises Interrupted."""
    if resume:
        run.forget_after(checkpoint_step(Path(resume)))
    train_interruptibly(trainer, run, resume, tokens_per_sample)


def train_interruptibly(trainer: Any, run: RunFolder, resume: Path | None = None,
                        tokens_per_sample: float | None = None) -> None:
    """trainer.train with the progress display, a clean stop on Ctrl-C and the failure status."""
    from tunekit.progress import GracefulStop, StopOnSignal, show_progress
    from tunekit.upstream import keep_embeddings_out_of_fsdp_blocks, keep_mean_losses_unscaled

    show_progress(trainer, tokens_per_sample)
    with status_on_error(run), GracefulStop() as stop:
        check_started(trainer)
        keep_embeddings_out_of_fsdp_blocks(trainer)
        keep_mean_losses_unscaled(trainer)
        stopper = StopOnSignal(stop)
        trainer.add_callback(stopper)
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stop.requested:
        raise interrupted(run, stopper.step)


@contextlib.contextmanager
def status_on_error(run: RunFolder) -> Any:
    """run.json says why a run ended early: `interrupted` for a second Ctrl-C (mid-step), `failed`
    with the reason for anything else. A clean stop (Interrupted) has already said so."""
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt:
        run.interrupt("stopped at once, mid-step (the last marked checkpoint, if any, is kept)")
        raise
    except BaseException as err:
        run.fail(f"{type(err).__name__}: {err}")
        raise


def interrupted(run: RunFolder, step: int | None) -> BaseException:
    """Mark the run interrupted; the exception says where its last checkpoint is."""
    where = f"checkpoint-{step} saved in {run.path}; " if step is not None else ""
    run.interrupt(f"stopped at step {step}" if step is not None else "stopped before the first step")
    return Interrupted(f"{where}continue with --resume")
