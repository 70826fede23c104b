"""Reading training data: local files (jsonl, json, csv, tsv, parquet, txt, optionally gzipped) or a
Hub dataset, checked row by row so that a bad line is reported with its number before training.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunekit.catalog import missing_file_message
from tunekit.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")


@dataclass
class Table:
    """Rows of one data source, with the line each row came from (for error messages)."""

    source: str
    rows: list[dict[str, Any]]
    lines: list[int]
    names: list[str] | None = field(default=None)  # what to call a row where lines mean nothing (SQuAD)

    def where(self, index: int) -> str:
        if self.names is not None:
            return f"{self.source}: {self.names[index]}"
        return f"{self.source}: line {self.lines[index]}"

    @property
    def columns(self) -> list[str]:
        return list(self.rows[0]) if self.rows else []

    def head(self, limit: int | None) -> Table:
        if limit is None:
            return self
        names = self.names[:limit] if self.names is not None else None
        return Table(self.source, self.rows[:limit], self.lines[:limit], names)

    def require(self, *columns: str, key: str = "data") -> None:
        """Every row has these columns (present and not null)."""
        for column in columns:
            if column not in self.columns:
                raise UserError(
                    f"{self.source}: no column {column!r} (columns: {', '.join(self.columns)}); "
                    f"map yours with {key}.*_column in the recipe"
                )
            for i, row in enumerate(self.rows):
                if row.get(column) is None:
                    raise UserError(f"{self.where(i)}: column {column!r} is missing or null")


def read_table(spec: str, key: str = "data.train", split: str = "train") -> Table:
    """Read a data file, or a Hub dataset when `spec` is not a path that exists.

    Relative paths start at the current folder; failing that, at the project root, so that the
    shipped recipes (which read data/) work from anywhere."""
    path = Path(spec)
    if not path.exists() and not path.is_absolute() and (PROJECT_ROOT / spec).exists():
        path = PROJECT_ROOT / spec
    if path.is_dir():
        raise UserError(f"{spec}: is a directory ({key}); give a data file ({', '.join(SUFFIXES)})")
    if not path.exists():
        if _looks_like_a_path(spec):
            raise UserError(missing_file_message(spec, key))
        return read_hub_dataset(spec, key, split)
    suffix = path.suffix.lower() if path.suffix.lower() != ".gz" else Path(path.stem).suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"{spec}: unsupported file type {suffix or '(none)'!r} ({key}); use one of {', '.join(SUFFIXES)}")
    if path.stat().st_size == 0:
        raise UserError(f"{spec}: the file is empty ({key})")
    reader = {".jsonl": parse_jsonl, ".json": parse_json, ".csv": parse_csv, ".tsv": parse_tsv, ".txt": parse_txt}
    if suffix == ".parquet":
        table = read_parquet(path)
    else:
        table = reader[suffix](read_text(path), spec)
    if not table.rows:
        raise UserError(f"{spec}: no rows ({key})")
    return table


def hub_dataset_name(spec: str) -> str | None:
    """The Hub dataset a data spec names (without its `:split`), or None for a local file: the same
    rule `read_table` follows."""
    if Path(spec).exists() or (PROJECT_ROOT / spec).exists() or _looks_like_a_path(spec):
        return None
    return spec.partition(":")[0]


def _looks_like_a_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.lower().endswith(SUFFIXES + (".gz",)) or "\\" in spec


def read_text(path: Path) -> str:
    """UTF-8 text of a file (gunzipped if .gz); binary files are refused with a clear message."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    if path.suffix.lower() == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError):
            raise UserError(f"{path}: not a valid gzip file") from None
    if b"\x00" in raw[:8192]:
        raise UserError(f"{path}: looks like a binary file (NUL bytes); expected text data")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: not UTF-8 text (byte {err.start}); re-save the file as UTF-8") from None


def parse_jsonl(text: str, source: str) -> Table:
    rows, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{source}: line {number}: invalid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(row, dict):
            raise UserError(f"{source}: line {number}: expected a JSON object per line, got {type(row).__name__}")
        rows.append(row)
        lines.append(number)
    return Table(source, rows, lines)


def parse_json(text: str, source: str) -> Table:
    """A JSON list of objects, or an object with the list under "data" (SQuAD keeps its own reader)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{source}: line {err.lineno}: invalid JSON ({err.msg})") from None
    if is_squad(data):
        return flatten_squad(data["data"], source)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UserError(f"{source}: expected a JSON list of objects (or {{\"data\": [...]}}), got {type(data).__name__}")
    # json.loads keeps no line numbers: report the record's position instead (1-based).
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise UserError(f"{source}: record {i + 1}: expected a JSON object, got {type(row).__name__}")
    return Table(source, data, list(range(1, len(data) + 1)))


def is_squad(data: Any) -> bool:
    """The official SQuAD layout: {"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}."""
    articles = data.get("data") if isinstance(data, dict) else None
    return bool(articles) and isinstance(articles, list) and all(
        isinstance(a, dict) and "paragraphs" in a for a in articles)


def flatten_squad(articles: list[dict[str, Any]], source: str) -> Table:
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
    return Table(source, rows, list(range(1, len(rows) + 1)), names)


def parse_csv(text: str, source: str) -> Table:
    reader = csv.reader(io.StringIO(text, newline=""))
    return _rows_from_fields(reader, source, lambda: reader.line_num)


def parse_tsv(text: str, source: str) -> Table:
    """Tab-separated, header first, no quote processing (GLUE ships quotes as ordinary characters)."""
    lines = text.splitlines()
    records = ((number, line.split("\t")) for number, line in enumerate(lines, start=1) if line.strip())
    header: list[str] | None = None
    rows, numbers = [], []
    for number, fields in records:
        if header is None:
            header = [h.strip() for h in fields]
            continue
        if len(fields) != len(header):
            raise UserError(f"{source}: line {number}: expected {len(header)} tab-separated fields, got {len(fields)}")
        rows.append(dict(zip(header, fields)))
        numbers.append(number)
    return Table(source, rows, numbers)


def _rows_from_fields(reader: Any, source: str, line_number: Any) -> Table:
    header: list[str] | None = None
    rows, numbers = [], []
    try:
        for fields in reader:
            if not fields:
                continue
            if header is None:
                header = [h.strip() for h in fields]
                continue
            if len(fields) != len(header):
                raise UserError(f"{source}: line {line_number()}: expected {len(header)} fields, got {len(fields)}")
            rows.append(dict(zip(header, fields)))
            numbers.append(line_number())
    except csv.Error as err:
        raise UserError(f"{source}: line {line_number()}: malformed CSV ({err})") from None
    return Table(source, rows, numbers)


def parse_txt(text: str, source: str) -> Table:
    """Plain text: the whole file as one `text` row (pre-training packs it into blocks anyway)."""
    return Table(source, [{"text": text}], [1])


def read_parquet(path: Path) -> Table:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises many types for a corrupt file
        raise UserError(f"{path}: not a readable parquet file ({type(err).__name__})") from None
    return Table(str(path), rows, list(range(1, len(rows) + 1)))


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
    rows = data.to_list()
    return Table(name, rows, list(range(1, len(rows) + 1)))


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
