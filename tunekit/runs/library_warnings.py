"""Where the libraries' deprecation warnings go once a run has started: to the run's
`warnings.log`, not to the terminal between progress lines.

During training, a FutureWarning or DeprecationWarning raised inside an installed library is about
calls the libraries make to one another (TRL's GRPO asks a model `is_gradient_checkpointing` at
every generation step, a name transformers 5.24 deprecates): nothing a user's recipe can change.
The arguments tunekit itself passes use the current names, and what a user passes is checked
before the run starts, where its warnings still show. A warning from the user's own code (a reward
module) or from tunekit shows as usual."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

_log: dict[str, Path | None] = {"path": None}  # the current run's log; None: a rank that keeps no log


def route_library_warnings(log: Path | None) -> None:
    """From now on, library deprecation warnings are appended to `log` (dropped where it is None)."""
    _log["path"] = log
    if getattr(warnings.showwarning, "tunekit_routes", False):
        return
    original = warnings.showwarning  # installed again if someone (warnings.catch_warnings) put it back

    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        if not (issubclass(category, (DeprecationWarning, FutureWarning)) and from_a_library(filename)):
            original(message, category, filename, lineno, file, line)
            return
        path = _log["path"]
        if path is not None:
            with path.open("a", encoding="utf-8") as out:
                out.write(warnings.formatwarning(message, category, filename, lineno, line))

    show.tunekit_routes = True  # type: ignore[attr-defined]
    warnings.showwarning = show


def from_a_library(filename: str) -> bool:
    parts = Path(filename).parts
    return "site-packages" in parts or "dist-packages" in parts
