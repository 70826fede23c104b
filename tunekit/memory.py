"""Handing freed memory back to the system while a run trains on a CPU: TUNEKIT_TRIM_MEMORY_S.

glibc keeps the memory a process frees for its own later use, and a training step frees and
allocates hundreds of megabytes of activations and gradients in pieces of many sizes: the heap
grows past what is alive at any moment. At SmolLM2-135M's shape (LoRA, Alpaca rows, batch 4, length
256, checkpointing on) a step held about 1.4 GB alive and the process peaked at 2.3-2.4 GB. glibc's
own switches trade much speed for it (every large tensor its own mapping: 1.66 GB at 0.66x the
tokens/s). Calling `malloc_trim(0)` every few tenths of a second to seconds, from a thread beside
the training, returns the free pages in between: 1.75 GB at 0.87x with 1 s, 1.42 GB at 0.78x with
0.2 s (bench/README.md, "Handing freed memory back"). Off unless asked: speed comes first.

    TUNEKIT_TRIM_MEMORY_S=1 tunekit lora RECIPE      # seconds between trims, for the whole run
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import os
import threading
from collections.abc import Callable, Iterator

from tunekit.errors import UserError

ENV = "TUNEKIT_TRIM_MEMORY_S"


def trim_interval() -> float | None:
    """The seconds between trims that TUNEKIT_TRIM_MEMORY_S asks for; None when it is unset or empty."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise UserError(f"{ENV}={raw!r}: expected the seconds between trims, a number greater than 0 "
                        f"(e.g. {ENV}=1), or unset it")
    return seconds


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
    return function


@contextlib.contextmanager
def trimming(seconds: float | None) -> Iterator[None]:
    """While inside, a daemon thread calls malloc_trim(0) every `seconds` (nothing when None). The
    call runs without the GIL (ctypes releases it), so training goes on beside it."""
    if seconds is None:
        yield
        return
    trim = malloc_trim()
    if trim is None:
        raise UserError(f"{ENV}: this system's C library has no malloc_trim (glibc only); unset it")
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(seconds):
            trim(0)

    thread = threading.Thread(target=loop, name="tunekit-trim-memory", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
