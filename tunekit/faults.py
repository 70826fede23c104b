"""Simulated failures for the reliability tests: a SIGKILL, a Ctrl-C, a hung or a crashing rank at a
named point and step, set through the TUNEKIT_FAULT environment variable. A leaf module: the
trainers and the progress display call it, and it imports nothing of tunekit."""

from __future__ import annotations

import os
import signal
import time

FAULT = "TUNEKIT_FAULT"  # tests only: "<point>:<step>", e.g. kill-after-save:4, stall-rank-1:2


def inject_fault(point: str, step: int) -> None:
    """Simulated failures for the reliability tests (a SIGKILL, a hung or a crashing rank), set
    through the TUNEKIT_FAULT environment variable; does nothing otherwise."""
    wanted = os.environ.get(FAULT)
    if wanted != f"{point}:{step}":
        return
    if point.startswith("kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    if point.startswith("interrupt"):  # as if Ctrl-C were pressed
        os.kill(os.getpid(), signal.SIGINT)
        return
    if point.startswith("stall"):
        time.sleep(10**6)
    raise RuntimeError(f"injected failure at step {step} ({wanted})")
