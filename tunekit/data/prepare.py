"""Preprocessing that runs once: tokenised (and masked) examples built with `Dataset.map(batched=True,
num_proc=...)`, written to the cache (tunekit.data.cache) under a key of what decides them, and
memory-mapped from there by every later run, `--resume` and the other ranks of a multi-process run.

`tunekit data prepare RECIPE` runs this alone (what a cluster job runs on one node before training
on many) and prints what it holds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunekit.data import cache

ROWS_PER_PROCESS = 2000  # below this a worker process costs more than it saves


@dataclass
class Prepared:
    """A prepared dataset (Arrow, memory-mapped) with its counts and where it lies."""

    dataset: Any
    rows: int
    tokens: int
    trained_tokens: int
    path: Path


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def processes(wanted: int | None, rows: int) -> int:
    """data.num_proc (default: the cores this process may use), no more than the rows justify."""
    return max(1, min(wanted or available_cores(), rows // ROWS_PER_PROCESS))


def token_features(with_labels: bool) -> Any:
    from datasets import Features, Sequence, Value

    columns = {"input_ids": Sequence(Value("int32"))}
    if with_labels:
        columns["labels"] = Sequence(Value("int32"))
    return Features(columns)


def load(key: str) -> Prepared | None:
    """The prepared dataset filed under `key`, if a run has completed it."""
    from datasets import Dataset, concatenate_datasets

    info = cache.read_marker(cache.folder("prepared") / f"{key}.json")
    if info is None or not all(Path(f).exists() for f in info["files"]):
        return None
    parts = [Dataset.from_file(f) for f in info["files"]]
    dataset = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    return Prepared(dataset, info["rows"], info["tokens"], info["trained_tokens"], Path(info["files"][0]))


def mapped(table: Any, key: str, function: Callable[..., dict[str, list[Any]]], num_proc: int | None,
           with_labels: bool = True, desc: str = "tokenising") -> Prepared:
    """`function(batch, indices)` over the table's rows, batched and in parallel, cached under `key`.
    The output keeps only the token columns (int32: half the memory of int64, same ids)."""
    found = load(key)
    if found is not None:
        return found
    folder = cache.folder("prepared")
    dataset = table.dataset.map(
        function, batched=True, with_indices=True, num_proc=processes(num_proc, len(table)),
        remove_columns=table.dataset.column_names, features=token_features(with_labels),
        cache_file_name=str(folder / f"{key}.arrow"), load_from_cache_file=False, new_fingerprint=key, desc=desc,
    )
    return record(key, [f["filename"] for f in dataset.cache_files])


def record(key: str, files: list[str]) -> Prepared:
    """Count what the files hold and write the marker that makes them a complete cached result."""
    rows = tokens = trained = 0
    for batch in stream_batches(files):
        rows += batch.num_rows
        tokens, trained = tokens + count_tokens(batch, "input_ids"), trained + count_trained(batch)
    cache.write_marker(cache.folder("prepared") / f"{key}.json",
                       {"files": files, "rows": rows, "tokens": tokens, "trained_tokens": trained})
    found = load(key)
    assert found is not None
    return found


def stream_batches(files: list[str]) -> Any:
    """Record batches of Arrow files read with plain file reads (not memory-mapped), so counting a
    large dataset does not bring it all into this process's memory."""
    import pyarrow as pa

    for name in files:
        with pa.OSFile(name) as source, pa.ipc.open_stream(source) as reader:
            yield from reader


def count_tokens(batch: Any, column: str) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(batch.column(column))).as_py() or 0)


def count_trained(batch: Any) -> int:
    import pyarrow.compute as pc

    if "labels" not in batch.schema.names:
        return count_tokens(batch, "input_ids")
    return int(pc.sum(pc.not_equal(pc.list_flatten(batch.column("labels")), -100)).as_py() or 0)
