"""Where prepared data lives, and the keys it is filed under.

Everything tunekit derives from data (a file read into Arrow, the tokenised and masked examples,
the packed blocks of a corpus) is written once under the cache folder and memory-mapped from then
on. A result is filed under a key made of what decides it: the data files' path, size and
modification time, the tokenizer and its chat template, and the options that change the result.
A second run, a `--resume` and the other ranks of a multi-process run find it there.

The folder: $TUNEKIT_CACHE, else $HF_DATASETS_CACHE/tunekit, else ~/.cache/tunekit.
A result is complete only when its marker (`<key>.json`, written last, atomically) exists.
"""

from __future__ import annotations

import hashlib
import json
import os
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


def file_key(path: Path) -> str:
    """A data file as it is now: its resolved path, size and modification time."""
    stat = path.stat()
    return digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


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


def write_marker(path: Path, content: JsonObject) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(content, indent=1))
    os.replace(temporary, path)
