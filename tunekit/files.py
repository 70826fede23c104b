"""Files written atomically: under a temporary name in the same folder, synced, then renamed into
place, so a crash never leaves a half-written file behind. Everything tunekit writes goes through here."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as handle:
        handle.write(text.encode("utf-8") if isinstance(text, str) else text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def replace_folder(build: Path, target: Path) -> None:
    """Move a finished folder into place; an older one is moved aside first and removed last, so
    at every moment `target` is either the old folder or the new one, whole."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
        os.replace(target, old / target.name)
    os.replace(build, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_folder(target: Path, write: Callable[[Path], None], keep_existing: bool = False) -> Path:
    """`write(folder)` fills a temporary folder beside `target`, which is then moved into place
    (replace_folder). With keep_existing (a cache), a `target` that another process finished first
    is kept and this one's copy dropped."""
    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        write(build)
        if keep_existing and target.exists():
            return target
        replace_folder(build, target)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return target
