"""What goes where on the terminal: stdout holds a command's result alone (a run folder, a JSON
line), so that a Makefile or a pipe can read it; everything else goes to stderr."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def library_output_to_stderr() -> Iterator[None]:
    """For commands that load models: the libraries' own progress bars off (tunekit shows one
    display of its own), and what they print goes to stderr, so stdout holds the result alone."""
    from tunekit.progress import hide_library_bars

    hide_library_bars()
    with contextlib.redirect_stdout(sys.stderr):
        yield
