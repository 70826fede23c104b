"""The live training display on stderr, and a clean stop on Ctrl-C.

On a terminal: one rich progress bar with ETA, throughput (tokens/s where a method knows its tokens
per sample, samples/s otherwise) and the latest loss. Anywhere else (a Makefile's log, CI) bars
are noise, so the same figures are printed as one plain line per logging step.

Ctrl-C (or SIGTERM, what schedulers send before a kill) does not stop training mid-step: the
current step finishes, a checkpoint is written and marked, and the command exits with code 130.
A second Ctrl-C stops at once.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import threading
import time
from typing import Any

from transformers import TrainerCallback

WINDOW_S = 30.0  # throughput is averaged over the last WINDOW_S seconds


def clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Steps done out of `total`, at `per_step` samples a step (each `tokens_per_sample` tokens on
    average, when known). `update` after every step, `note` with each logged loss, `report` where a
    log without a terminal should get a line."""

    def __init__(self, total: int, per_step: int, tokens_per_sample: float | None = None, label: str = "training",
                 console: Any = None) -> None:
        from rich.console import Console

        self.total, self.per_step, self.tokens_per_sample = total, per_step, tokens_per_sample
        self.label = label
        self.console = console or Console(stderr=True)
        self.loss: float | None = None
        self.loss_name = "loss"
        self.step = self.first = 0
        self.reported = -1
        self.started = time.monotonic()
        self.recent: collections.deque[tuple[float, int]] = collections.deque()
        self.bar: Any = None
        if self.console.is_terminal:
            self.bar = self._rich_bar()
            self.task = self.bar.add_task(label, total=total, speed="", loss="")
            self.bar.start()

    def _rich_bar(self) -> Any:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        return RichProgress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[speed]}"),
            TextColumn("{task.fields[loss]}"), console=self.console, transient=False,
        )

    def start_at(self, step: int) -> None:
        """A resumed run starts part-way; its speed and ETA count only the steps of this session."""
        self.step = self.first = step
        self.started = time.monotonic()
        self.recent.clear()
        self.recent.append((self.started, step))
        if self.bar:
            self.bar.update(self.task, completed=step)

    def rate(self) -> float:
        """Samples per second over the recent window."""
        if len(self.recent) < 2:
            return 0.0
        (t0, s0), (t1, s1) = self.recent[0], self.recent[-1]
        return (s1 - s0) * self.per_step / (t1 - t0) if t1 > t0 else 0.0

    def speed(self) -> str:
        rate = self.rate()
        if not rate:
            return ""
        if self.tokens_per_sample:
            return f"{rate * self.tokens_per_sample:,.0f} tok/s"
        return f"{rate:,.1f} samples/s"

    def eta(self) -> float:
        done = self.step - self.first
        return (time.monotonic() - self.started) / done * (self.total - self.step) if done else 0.0

    def update(self, step: int) -> None:
        """Step `step` is done."""
        now = time.monotonic()
        self.step = step
        self.recent.append((now, step))
        while len(self.recent) > 2 and now - self.recent[0][0] > WINDOW_S:
            self.recent.popleft()
        if self.bar:
            self.bar.update(self.task, completed=step, speed=self.speed(), loss=self._loss_text())

    def report(self) -> None:
        """Without a terminal: print the current figures as one line (once per step)."""
        if not self.bar and self.step != self.reported:
            self.reported = self.step
            self.console.print(self.line(), highlight=False, soft_wrap=True)

    def note(self, value: float | None, name: str = "loss") -> None:
        """The latest logged loss (or, for RL, mean reward) shown beside the bar."""
        if value is not None:
            self.loss, self.loss_name = value, name
            if self.bar:
                self.bar.update(self.task, loss=self._loss_text())

    def _loss_text(self) -> str:
        return f"{self.loss_name} {self.loss:.4g}" if self.loss is not None else ""

    def line(self) -> str:
        share = 100 * self.step / self.total if self.total else 100.0
        parts = [f"{self.label} step {self.step}/{self.total} ({share:.0f}%)", self._loss_text(), self.speed(),
                 f"elapsed {clock(time.monotonic() - self.started)}", f"ETA {clock(self.eta())}"]
        return "  ".join(p for p in parts if p)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
            self.bar = None


def hide_library_bars() -> None:
    """The libraries' own tqdm bars (dataset maps, weight loading, model shards) would break up
    tunekit's display."""
    import datasets
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging

    disable_progress_bars()
    datasets.disable_progress_bars()
    logging.disable_progress_bar()


class TrainerProgress(TrainerCallback):
    """Feeds a Progress from the Trainer's events (main process only); replaces the tqdm bar."""

    def __init__(self, tokens_per_sample: float | None = None, label: str = "training") -> None:
        self.tokens_per_sample, self.label = tokens_per_sample, label
        self.progress: Progress | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            self.progress = Progress(state.max_steps, per_step, self.tokens_per_sample, self.label)
            self.progress.start_at(state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress:
            self.progress.update(state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.progress and logs and "loss" in logs:
            self.progress.note(logs["loss"])
            self.progress.report()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress:
            self.progress.report()
            self.progress.close()
            self.progress = None


def show_progress(trainer: Any, tokens_per_sample: float | None = None, label: str = "training") -> None:
    """Swap the Trainer's tqdm bars (training and evaluation) for tunekit's display (once)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if any(isinstance(c, TrainerProgress) for c in trainer.callback_handler.callbacks):
        return
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(TrainerProgress(tokens_per_sample, label))


class GracefulStop:
    """While active, SIGINT and SIGTERM ask training to stop at the next step boundary (after a
    checkpoint) instead of killing it mid-step. A second signal stops at once, except in a process
    started by `--nproc`: there the launcher forwards the terminal's Ctrl-C a second time, and
    kills the workers itself if they take too long."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        from tunekit.launch import is_worker

        self.requested = False
        self.patient = is_worker()
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame: Any) -> None:
        if self.requested and not self.patient:
            raise KeyboardInterrupt
        if not self.requested and os.environ.get("RANK", "0") == "0":
            print("\ntunekit: stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
        self.requested = True

    def agreed(self, device: Any = None, world_size: int = 1) -> bool:
        """Whether to stop now; with several processes, stop when any of them was asked, so that
        all stop at the same step (one collective per step, only when world_size > 1)."""
        if world_size <= 1:
            return self.requested
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.requested = bool(flag.item())
        return self.requested


class StopOnSignal(TrainerCallback):
    """Turns a GracefulStop request into the Trainer's own save-then-stop at the end of a step."""

    def __init__(self, stop: GracefulStop) -> None:
        self.stop = stop
        self.step: int | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from tunekit.faults import inject_fault

        inject_fault(f"interrupt-rank-{args.process_index}", state.global_step)
        if self.stop.agreed(args.device, args.world_size):
            control.should_save = True
            control.should_training_stop = True
            self.step = state.global_step
