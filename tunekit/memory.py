"""What a run does with the memory it frees: keeps it for reuse (the default), or hands it back to the
system while it trains on a CPU (TUNEKIT_TRIM_MEMORY_S).

glibc keeps the memory a process frees for its own later use, and a training step frees and
allocates hundreds of megabytes of activations and gradients in pieces of many sizes, so the heap
holds much more than is alive at any moment. At SmolLM2-135M's shape (LoRA, Alpaca rows, batch 4,
length 256, checkpointing on) the process peaked at 2.39-2.40 GB; glibc's own switches give memory
back only at a large cost in speed, since they act on every allocation (each large tensor a mapping
of its own: 1.66 GB at 0.66x the tokens/s). Calling `malloc_trim(0)` from a thread beside the
training, every second, returns the free pages in between: 1.76-1.81 GB at 0.91x; every 0.2 s,
1.42-1.45 GB at 0.78x (bench/README.md, "Handing freed memory back"). Off unless asked: speed first.

    TUNEKIT_TRIM_MEMORY_S=1 tunekit lora RECIPE      # seconds between trims, for the whole run

The other way, the default: keeping freed memory for reuse (TUNEKIT_KEEP_MEMORY, on unless set to 0
or a trim is asked for). glibc serves every allocation above 32 MB (a batch's logits, an SFT step's
largest activations and gradients) from a mapping of its own, unmapped when freed, and shrinks its
heap once more than 128 kB is free at its top; the next step's tensors then come from fresh pages,
each of which the kernel must find and zero on first touch (a page fault). On a virtual machine
that hands free pages back to its host, as the one these figures come from does, a fault cost 2-33
microseconds: tunekit's GRPO on SmolLM2-135M spent 26 of an update's 29 seconds in the kernel.
`keeping()` tells glibc (mallopt) to serve large allocations from the heap and never to shrink it
while the run lasts, so a freed tensor's pages are reused: the same update took 11 s and 10 page
faults instead of 2.6-3.0 million, and full SFT ran at 53-55% CPU MFU, steadily (43-52% without).
The price is memory: the process peaks at the largest its heap ever was, 0-23% above glibc's
policy in those runs (bench/README.md, "Keeping freed memory").

    TUNEKIT_KEEP_MEMORY=0 tunekit sft RECIPE         # glibc's own policy instead
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
KEEP_ENV = "TUNEKIT_KEEP_MEMORY"
# mallopt's parameters (glibc's malloc.h) and the values glibc starts with.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
NEVER_TRIM = -1  # "disables trimming completely" (mallopt(3)); a large positive value would not: it is a C int


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


def keep_wanted(trim: float | None) -> bool:
    """Whether freed memory is kept for reuse: TUNEKIT_KEEP_MEMORY=1 or 0; unset or empty, yes unless
    `trim` (TUNEKIT_TRIM_MEMORY_S) asks for memory to be handed back. Where the C library has no
    mallopt, an unset variable means no, and =1 is refused."""
    raw = os.environ.get(KEEP_ENV, "").strip()
    if raw not in ("", "0", "1"):
        raise UserError(f"{KEEP_ENV}={raw!r}: expected 1 (keep freed memory for reuse, the default) or 0 "
                        "(glibc's own policy), or unset it")
    if raw == "1" and trim is not None:
        raise UserError(f"{KEEP_ENV}=1 and {ENV}={os.environ[ENV]!r}: one keeps freed memory, the other hands "
                        "it back; unset one of them")
    if raw == "0" or (raw == "" and trim is not None):
        return False
    if mallopt() is None:
        if raw == "1":
            raise UserError(f"{KEEP_ENV}=1: this system's C library has no mallopt (glibc only); unset it")
        return False
    return True


def libc_function(name: str, argtypes: list[type]) -> Callable[..., int] | None:
    """A function of glibc's malloc (malloc_trim, mallopt), or None where the C library has none
    (musl, macOS, Windows)."""
    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes, function.restype = argtypes, ctypes.c_int
    return function


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none."""
    return libc_function("malloc_trim", [ctypes.c_size_t])


def mallopt() -> Callable[[int, int], int] | None:
    """glibc's mallopt, or None where the C library has none."""
    return libc_function("mallopt", [ctypes.c_int, ctypes.c_int])


@contextlib.contextmanager
def keeping(wanted: bool) -> Iterator[None]:
    """While inside (and `wanted`, which `keep_wanted` says), glibc serves large allocations from its
    heap and never shrinks it, so freed memory is reused instead of handed back and faulted in again;
    glibc's values come back on the way out. Nothing changes where the C library has no mallopt."""
    option = mallopt() if wanted else None
    if option is None:
        yield
        return
    option(M_MMAP_MAX, 0)
    option(M_TRIM_THRESHOLD, NEVER_TRIM)
    try:
        yield
    finally:
        option(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        option(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)


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
