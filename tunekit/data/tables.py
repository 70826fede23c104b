"""Reading training data: local files (jsonl, json, csv, tsv, parquet, txt, optionally gzipped) or a
Hub dataset, checked record by record so that a bad line is reported with its number before training.

A file is read once, as a stream, into an Arrow file in the cache (tunekit.data.cache) and memory-mapped
from there: a million rows never sit in memory as Python objects. A second read of the same file
(same content: tunekit.data.cache.file_key) opens the cached Arrow file at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from tunekit.data import cache
from tunekit.data.catalog import missing_file_message
from tunekit.data.readers import (
    csv_rows,
    json_list_rows,
    jsonl_rows,
    starts_with_list,
    text_chunks,
    tsv_rows,
    write_rows,
)
from tunekit.errors import UserError
from tunekit.jsontypes import Row

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
ITER_BATCH = 1000  # rows turned into Python objects at a time when iterating a table


class Rows:
    """The rows of a table as a read-only sequence of dicts, converted from Arrow as they are read."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Row]:
        for batch in self.dataset.iter(batch_size=ITER_BATCH):
            names = list(batch)
            for values in zip(*batch.values()):
                yield dict(zip(names, values))

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return Rows(self.dataset.select(range(*index.indices(len(self.dataset)))))
        if index < 0:
            index += len(self.dataset)
        if not 0 <= index < len(self.dataset):
            raise IndexError(index)
        return self.dataset[index]

    def __bool__(self) -> bool:
        return len(self.dataset) > 0

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, (list, Rows)) else NotImplemented


@dataclass
class Table:
    """Rows of one data source (an Arrow dataset) with the line each row came from, for error messages.

    `key` names exactly these rows (the source files and every selection made since), so results
    derived from them can be cached under it."""

    source: str
    dataset: Any
    lines: Any = None  # line (or record) number of each row; None: row i is record i + 1
    names: list[str] | None = field(default=None)  # what to call a row where lines mean nothing (SQuAD)
    key: str = ""
    sources: list[str] | None = None  # several files joined: the file of each row is sources[origin[i]]
    origin: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.dataset, list):  # small tables built in code (tests, prompts)
            from datasets import Dataset

            self.dataset = Dataset.from_list(self.dataset)
            self.key = self.key or cache.digest(self.source, self.dataset._fingerprint)

    def where(self, index: int) -> str:
        source = self.sources[int(self.origin[index])] if self.sources is not None else self.source
        if self.names is not None:
            return f"{source}: {self.names[index]}"
        return f"{source}: line {self.line(index)}"

    def column(self, name: str) -> list[Any]:
        """One column's values as a list (for the small per-row columns: texts, labels)."""
        return self.dataset.with_format("arrow")[name].to_pylist()

    def line(self, index: int) -> int:
        return int(self.lines[index]) if self.lines is not None else index + 1

    @property
    def rows(self) -> Rows:
        return Rows(self.dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def columns(self) -> list[str]:
        return list(self.dataset.column_names)

    def head(self, limit: int | None) -> Table:
        if limit is None or limit >= len(self):
            return self
        return self.select(range(limit))

    def select(self, indices: Any) -> Table:
        """These rows (a range or an array of row numbers), in this order."""
        import numpy as np

        if isinstance(indices, range):
            positions: Any = np.arange(indices.start, indices.stop, indices.step)
            key = cache.digest(self.key, "range", indices.start, indices.stop, indices.step)
        else:
            positions = np.asarray(indices, dtype=np.int64)
            key = cache.digest(self.key, positions.tobytes())
        return replace(
            self, dataset=self.dataset.select(indices), key=key,
            lines=self._lines()[positions], names=[self.names[i] for i in positions] if self.names else None,
            origin=self.origin[positions] if self.origin is not None else None,
        )

    def _lines(self) -> Any:
        import numpy as np

        return np.asarray(self.lines) if self.lines is not None else np.arange(1, len(self) + 1)

    def renamed(self, columns: dict[str, str], key: str = "data.columns") -> Table:
        """Standard name -> the file's column (data.columns): the column is renamed."""
        if not columns:
            return self
        missing = [c for c in columns.values() if c not in self.columns]
        if missing:
            raise UserError(f"{self.source}: {key} names {missing[0]!r}, which is not a column ({', '.join(self.columns)})")
        dataset = self.dataset.remove_columns([s for s in columns if s in self.columns and s not in columns.values()])
        dataset = dataset.rename_columns({col: std for std, col in columns.items() if std != col})
        return replace(self, dataset=dataset, key=cache.digest(self.key, "renamed", columns))

    def require(self, *columns: str, key: str = "data") -> None:
        """Every row has these columns (present and not null)."""
        import pyarrow.compute as pc

        for column in columns:
            if column not in self.columns:
                raise UserError(
                    f"{self.source}: no column {column!r} (columns: {', '.join(self.columns)}); "
                    f"map yours with {key}.*_column in the recipe"
                )
            values = self.dataset.with_format("arrow")[column] if len(self) else None
            if values is not None and values.null_count:
                first = pc.index(pc.is_null(values), True).as_py()
                raise UserError(f"{self.where(first)}: column {column!r} is missing or null")


def join(tables: list[Table]) -> Table:
    """Several tables as one (their columns must agree); each row still names its own file."""
    import numpy as np
    from datasets import concatenate_datasets

    if len(tables) == 1:
        return tables[0]
    try:
        dataset = concatenate_datasets([t.dataset for t in tables])
    except ValueError as err:
        raise UserError(f"{', '.join(t.source for t in tables)}: the files' columns differ ({err}); "
                        "give them the same columns") from None
    return Table(
        ", ".join(t.source for t in tables), dataset, np.concatenate([t._lines() for t in tables]),
        [n for t in tables for n in t.names or [f"line {int(x)}" for x in t._lines()]]
        if any(t.names for t in tables) else None,
        cache.digest(*[t.key for t in tables]), [t.source for t in tables],
        np.concatenate([np.full(len(t), i, dtype=np.int32) for i, t in enumerate(tables)]),
    )


def resolve_path(spec: str) -> Path:
    """Relative paths start at the current folder; failing that, at the project root, so that the
    shipped recipes (which read data/) work from anywhere."""
    path = Path(spec)
    if not path.exists() and not path.is_absolute() and (PROJECT_ROOT / spec).exists():
        path = PROJECT_ROOT / spec
    return path


def file_suffix(path: Path) -> str:
    return path.suffix.lower() if path.suffix.lower() != ".gz" else Path(path.stem).suffix.lower()


def check_file(spec: str, key: str) -> Path | None:
    """The local data file `spec` names (None: not a path, so a Hub dataset), or one clear error."""
    path = resolve_path(spec)
    if path.is_dir():
        raise UserError(f"{spec}: is a directory ({key}); give a data file ({', '.join(SUFFIXES)})")
    if not path.exists():
        if _looks_like_a_path(spec):
            raise UserError(missing_file_message(spec, key))
        return None
    suffix = file_suffix(path)
    if suffix not in SUFFIXES:
        raise UserError(f"{spec}: unsupported file type {suffix or '(none)'!r} ({key}); use one of {', '.join(SUFFIXES)}")
    if path.stat().st_size == 0:
        raise UserError(f"{spec}: the file is empty ({key})")
    return path


def read_table(spec: str, key: str = "data.train", split: str = "train") -> Table:
    """Read a data file, or a Hub dataset when `spec` is not a path that exists."""
    path = check_file(spec, key)
    if path is None:
        return read_hub_dataset(spec, key, split)
    table = read_file(path, spec)
    if not len(table):
        raise UserError(f"{spec}: no rows ({key})")
    return table


def read_file(path: Path, source: str) -> Table:
    """The file as an Arrow table, converted once and cached under its content (cache.file_key)."""
    import numpy as np
    from datasets import Dataset

    key = cache.file_key(path)
    folder = cache.folder("files")
    target, marker = folder / f"{key}.arrow", folder / f"{key}.json"
    info = cache.read_marker(marker)
    if info is None:  # machines that share the cache may convert the same file at once: each renames its own
        rows, numbers = cache.temporary(target), cache.temporary(folder / f"{key}.lines.npy")
        try:
            lines, names = convert(path, source, rows)
            with numbers.open("wb") as out:
                np.save(out, np.asarray(lines, dtype=np.int64))
            os.replace(numbers, folder / f"{key}.lines.npy")
            os.replace(rows, target)
        finally:
            rows.unlink(missing_ok=True)
            numbers.unlink(missing_ok=True)
        info = {"file": str(path.resolve()), "rows": len(lines), "names": names}
        cache.write_marker(marker, info)
    dataset = Dataset.from_file(str(target))
    return Table(source, dataset, np.load(folder / f"{key}.lines.npy"), info["names"], key)


def convert(path: Path, source: str, target: Path) -> tuple[Any, list[str] | None]:
    """Stream the file's records into an Arrow file; the lines of the rows, and names for SQuAD."""
    suffix = file_suffix(path)
    if suffix == ".parquet":
        return convert_parquet(path, target), None
    if suffix == ".json" and not starts_with_list(path):
        rows, lines, names = parse_json_object(path, source)
        return write_rows(lambda: zip(lines, rows), target, source), names
    if suffix == ".txt":  # the whole file is one document (pre-training streams it in pieces instead)
        return write_rows(lambda: iter([(1, {"text": "".join(text_chunks(path))})]), target, source), None
    records = {".jsonl": jsonl_rows, ".json": json_list_rows, ".csv": csv_rows, ".tsv": tsv_rows}[suffix]
    return write_rows(lambda: records(path, source), target, source), None


def convert_parquet(path: Path, target: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        with pa.ipc.new_stream(str(target), parquet.schema_arrow) as writer:
            for batch in parquet.iter_batches():
                writer.write_batch(batch)
    except Exception as err:  # pyarrow raises many types for a corrupt file
        raise UserError(f"{path}: not a readable parquet file ({type(err).__name__})") from None
    return range(1, parquet.metadata.num_rows + 1)


def hub_dataset_name(spec: str) -> str | None:
    """The Hub dataset a data spec names (without its `:split`), or None for a local file: the same
    rule `read_table` follows."""
    if Path(spec).exists() or (PROJECT_ROOT / spec).exists() or _looks_like_a_path(spec):
        return None
    return spec.partition(":")[0]


def _looks_like_a_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.lower().endswith(SUFFIXES + (".gz",)) or "\\" in spec


def parse_json_object(path: Path, source: str) -> tuple[list[Row], list[int], list[str] | None]:
    """A JSON object with the rows under "data" (SQuAD keeps its own layout): read whole, as such
    files are (a JSON list is streamed record by record instead)."""
    text = "".join(text_chunks(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{source}: line {err.lineno}: invalid JSON ({err.msg})") from None
    if is_squad(data):
        rows, names = flatten_squad(data["data"], source)
        return rows, list(range(1, len(rows) + 1)), names
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UserError(f"{source}: expected a JSON list of objects (or {{\"data\": [...]}}), got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise UserError(f"{source}: record {i + 1}: expected a JSON object, got {type(row).__name__}")
    return data, list(range(1, len(data) + 1)), None


def is_squad(data: Any) -> bool:
    """The official SQuAD layout: {"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}."""
    articles = data.get("data") if isinstance(data, dict) else None
    return bool(articles) and isinstance(articles, list) and all(
        isinstance(a, dict) and "paragraphs" in a for a in articles)


def flatten_squad(articles: list[Row], source: str) -> tuple[list[Row], list[str]]:
    """One row per question (id, title, question, context, answers as {"text": [...], "answer_start":
    [...]}, is_impossible), in file order; rows are named by question id in error messages."""
    rows, names = [], []
    for a, article in enumerate(articles, start=1):
        paragraphs = article["paragraphs"]
        if not isinstance(paragraphs, list):
            raise UserError(f"{source}: article {a}: 'paragraphs' must be a list")
        for p, paragraph in enumerate(paragraphs, start=1):
            where = f"{source}: article {a} paragraph {p}"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("qas"), list):
                raise UserError(f"{where}: expected an object with 'context' and a 'qas' list")
            for q, qa in enumerate(paragraph["qas"], start=1):
                if not isinstance(qa, dict):
                    raise UserError(f"{where} question {q}: expected a JSON object, got {type(qa).__name__}")
                answers = qa.get("answers") or []
                if not isinstance(answers, list) or not all(isinstance(x, dict) for x in answers):
                    raise UserError(f"{where} question {qa.get('id', q)}: 'answers' must be a list of "
                                    "{\"text\", \"answer_start\"} objects")
                rows.append({
                    "id": qa.get("id"), "title": article.get("title", ""), "question": qa.get("question"),
                    "context": paragraph.get("context"),
                    "answers": {"text": [x.get("text") for x in answers],
                                "answer_start": [x.get("answer_start") for x in answers]},
                    "is_impossible": bool(qa.get("is_impossible", False)),
                })
                names.append(f"question {qa['id']}" if qa.get("id") is not None else f"article {a} paragraph {p} question {q}")
    return rows, names


def read_hub_dataset(name: str, key: str, split: str) -> Table:
    """`owner/name` or `owner/name:split` from the Hugging Face Hub (needs the network or a cache)."""
    import datasets

    name, _, explicit_split = name.partition(":")
    try:
        data = datasets.load_dataset(name, split=explicit_split or split)
    except Exception as err:
        raise UserError(
            f"{name}: not a local file and could not be loaded from the Hub ({key}): {type(err).__name__}"
        ) from None
    return Table(name, data, key=cache.digest(name, explicit_split or split, data._fingerprint))


def pick_column(table: Table, wanted: str | None, candidates: tuple[str, ...], key: str) -> str:
    """The column named in the recipe, or the first of the usual names that the data has."""
    if wanted is not None:
        table.require(wanted, key=key.rsplit(".", 1)[0])
        return wanted
    for name in candidates:
        if name in table.columns:
            return name
    raise UserError(
        f"{table.source}: none of the columns {', '.join(candidates)} (columns: {', '.join(table.columns)}); "
        f"name yours with {key}"
    )


T = TypeVar("T")


@dataclass
class Splits(Generic[T]):
    """A method's checked training split and its held-out one (None when there is none)."""

    train: T
    eval: T | None
