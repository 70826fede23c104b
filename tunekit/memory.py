"""Handing freed memory back to the system while a run trains on a CPU: TUNEKIT_TRIM_MEMORY_S.

glibc keeps the memory a process frees for its own later use, and a training step frees and
allocates hundreds of megabytes of activations and gradients in pieces of many sizes, so the heap
holds much more than is alive at any moment. At SmolLM2-135M's shape (LoRA, Alpaca rows, batch 4,
length 256, checkpointing on) the process peaked at 2.39-2.40 GB; glibc's own switches give memory
back only at a large cost in speed, since they act on every allocation (each large tensor a mapping
of its own: 1.66 GB at 0.66x the tokens/s). Calling `malloc_trim(0)` from a thread beside the
training, every second, returns the free pages in between: 1.76-1.81 GB at 0.91x; every 0.2 s,
1.42-1.45 GB at 0.78x (bench/README.md, "Handing freed memory back"). Off unless asked: speed first.

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
