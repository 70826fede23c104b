"""Where prepared data lives, and the keys it is filed under.

Everything tunekit derives from data (a file read into Arrow, the tokenised and masked examples,
the packed blocks of a corpus) is written once under the cache folder and memory-mapped from then
on. A result is filed under a key made of what decides it: the data files' content (sha256, see
`file_key`), the tokenizer and its chat template, and the options that change the result.
A second run, a `--resume` and the other ranks of a multi-process run find it there.

The folder: $TUNEKIT_CACHE, else $HF_DATASETS_CACHE/tunekit, else ~/.cache/tunekit.
A result is complete only when its marker (`<key>.json`, written last, atomically) exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

from tunekit.jsontypes import JsonObject

# Bump when a change to tunekit alters what a cached result holds, so old results are not reused.
FORMAT_VERSION = "1"


def cache_root() -> Path:
    if os.environ.get("TUNEKIT_CACHE"):
        return Path(os.environ["TUNEKIT_CACHE"]).expanduser()
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser() / "tunekit"
    return Path("~/.cache/tunekit").expanduser()


def folder(kind: str) -> Path:
    path = cache_root() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def digest(*parts: Any) -> str:
    """A short stable key of the parts (strings, numbers, bytes, or anything JSON can write)."""
    h = hashlib.sha256(FORMAT_VERSION.encode())
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


HASH_BLOCK = 1 << 20


def file_key(path: Path) -> str:
    """A data file by its content: the sha256 of every byte, and its size.

    Path, size and mtime are not enough: a same-size rewrite with its mtime restored (tar, container
    layers, reproducible builds) would reuse the old rows. A full hash costs about 1 s per GB, far
    less than reading the rows it saves, and it is computed once per version of the file: it is
    remembered under the file's stat identity, which includes the inode change time (ctime), a time
    the kernel sets on every write or mtime change and no tool can set back."""
    resolved = path.resolve()
    before = _identity(resolved)
    memo = folder("hashes") / f"{digest(*before)}.json"
    found = read_marker(memo)
    if found is None:
        found = {"file": str(resolved), "sha256": content_hash(resolved)}
        if _identity(resolved) == before:  # not changed while it was read: the hash holds for this version
            write_marker(memo, found)
    return digest("file", found["sha256"], before[3])


def _identity(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def content_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def tokenizer_key(tokenizer: Any) -> str:
    """What decides how a tokenizer turns text into ids: its full definition (vocabulary, merges,
    normalizer, pre-tokenizer, special tokens) and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    specials = [tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token, getattr(tokenizer, "mask_token", None)]
    return digest(type(tokenizer).__name__, definition, getattr(tokenizer, "chat_template", None), specials)


def read_marker(path: Path) -> JsonObject | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def temporary(path: Path) -> Path:
    """Where a process writes `path` before renaming it into place: a name of its own, also among
    machines that share the cache on one disk (process ids repeat across machines)."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def write_marker(path: Path, content: JsonObject) -> None:
    scratch = temporary(path)
    scratch.write_text(json.dumps(content, indent=1))
    os.replace(scratch, path)
