"""Where the libraries' deprecation warnings go once a run is being set up: to the run's
`warnings.log`, not to the terminal between progress lines. The model loads before the run folder
exists (a recipe that cannot load leaves no folder behind), so what the libraries say while a
method sets up (PEFT asks the model `is_gradient_checkpointing` when it wraps it) is held and
written to the log when the run starts.

During training, a FutureWarning or DeprecationWarning raised inside an installed library is about
calls the libraries make to one another (TRL's GRPO asks a model `is_gradient_checkpointing` at
every generation step, a name transformers 5.24 deprecates): nothing a user's recipe can change.
The arguments tunekit itself passes use the current names, and what a user passes is checked
before the run starts, where its warnings still show. A warning from the user's own code (a reward
module) or from tunekit shows as usual. A command that loads a finished run (merge, generate, eval,
serve, export: models.load_run_model) sends what the libraries say while it loads to that run's
log the same way."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class _Route:
    log: Path | None = None  # the current run's log; None: a rank that keeps no log
    held: list[str] | None = None  # while a run is set up: the warnings its log will get


def hold_library_warnings() -> None:
    """From now on, library deprecation warnings are held for the run's log, which
    `route_library_warnings` names once the run starts (a run that never starts drops them)."""
    _Route.held = []
    _install()


def route_library_warnings(log: Path | None) -> None:
    """From now on, library deprecation warnings are appended to `log` (dropped where it is None),
    after the ones held while the run was set up."""
    held, _Route.held, _Route.log = _Route.held or [], None, log
    if log is not None and held:
        _append(log, "".join(held))
    _install()


@contextlib.contextmanager
def library_warnings_to(log: Path) -> Iterator[None]:
    """While the block runs (a finished run's model loading, for merge, generate, eval, ...), library
    deprecation warnings are appended to `log`, that run's warnings.log; then they go where they went
    before (the current run's log, or nowhere)."""
    saved = _Route.log, _Route.held
    _Route.log, _Route.held = log, None
    _install()
    try:
        yield
    finally:
        _Route.log, _Route.held = saved


def _append(log: Path, text: str) -> None:
    try:
        with log.open("a", encoding="utf-8") as out:
            out.write(text)
    except OSError:  # a run folder that cannot be written (read-only, gone): the note is dropped
        pass


def _install() -> None:
    if getattr(warnings.showwarning, "tunekit_routes", False):
        return
    original = warnings.showwarning  # installed again if someone (warnings.catch_warnings) put it back

    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        if not (issubclass(category, (DeprecationWarning, FutureWarning)) and from_a_library(filename)):
            original(message, category, filename, lineno, file, line)
            return
        text = warnings.formatwarning(message, category, filename, lineno, line)
        if _Route.held is not None:
            _Route.held.append(text)
        elif _Route.log is not None:
            _append(_Route.log, text)

    show.tunekit_routes = True  # type: ignore[attr-defined]
    warnings.showwarning = show


def from_a_library(filename: str) -> bool:
    parts = Path(filename).parts
    return "site-packages" in parts or "dist-packages" in parts
