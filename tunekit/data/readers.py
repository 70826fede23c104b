"""Data files read as streams of records into an Arrow file, in bounded memory, with the line of
every record kept for error messages.

A record ends at "\\n" (or "\\r\\n") only: U+0085, U+2028, U+2029 and the other characters that
`str.splitlines()` also breaks on stay inside their field.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import io
import json
import zlib
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from tunekit.errors import UserError
from tunekit.jsontypes import Row

BATCH = 5000  # rows per Arrow record batch while writing
CHUNK = 1 << 20  # bytes read at a time


@contextlib.contextmanager
def open_binary(path: Path) -> Iterator[IO[bytes]]:
    """The file's bytes (gunzipped if .gz); a binary file (NUL bytes at the start) is refused."""
    try:
        stream: IO[bytes] = gzip.open(path) if path.suffix.lower() == ".gz" else open(path, "rb")  # noqa: SIM115
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    try:
        with stream:
            try:
                head = stream.read(8192)
                stream.seek(0)
            except (OSError, EOFError, zlib.error):
                raise UserError(f"{path}: not a valid gzip file") from None
            if b"\x00" in head:
                raise UserError(f"{path}: looks like a binary file (NUL bytes); expected text data")
            yield stream
    except (gzip.BadGzipFile, EOFError, zlib.error):
        raise UserError(f"{path}: not a valid gzip file (or cut short)") from None


def not_utf8(path: Path, line: int, offset: int) -> UserError:
    return UserError(f"{path}: line {line}: not UTF-8 text (byte {offset}); re-save the file as UTF-8")


def lines_of(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line, without its "\\n" or "\\r\\n"."""
    offset = 0
    with open_binary(path) as stream:
        for number, raw in enumerate(stream, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise not_utf8(path, number, offset + err.start) from None
            offset += len(raw)
            if number == 1:
                text = text.removeprefix("\ufeff")
            yield number, text.removesuffix("\n").removesuffix("\r")


def text_chunks(path: Path) -> Iterator[str]:
    """The file's text in pieces of about CHUNK bytes (UTF-8 checked, with the line of a bad byte)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset, first = 1, 0, True
    with open_binary(path) as stream:
        while True:
            raw = stream.read(CHUNK)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as err:
                start = max(err.start - len(decoder.getstate()[0]), 0)
                raise not_utf8(path, line + raw[:start].count(b"\n"), offset + start) from None
            line, offset = line + raw.count(b"\n"), offset + len(raw)
            if first:
                text, first = text.removeprefix("\ufeff"), False
            if text:
                yield text
            if not raw:
                return


def jsonl_rows(path: Path, source: str) -> Iterator[tuple[int, Row]]:
    for number, line in lines_of(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{source}: line {number}: invalid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(row, dict):
            raise UserError(f"{source}: line {number}: expected a JSON object per line, got {type(row).__name__}")
        yield number, row


def tsv_rows(path: Path, source: str) -> Iterator[tuple[int, Row]]:
    """Tab-separated, header first, no quote processing (GLUE ships quotes as ordinary characters)."""
    header: list[str] | None = None
    for number, line in lines_of(path):
        if not line.strip():
            continue
        fields = line.split("\t")
        if header is None:
            header = [h.strip() for h in fields]
            continue
        if len(fields) != len(header):
            raise UserError(f"{source}: line {number}: expected {len(header)} tab-separated fields, got {len(fields)}")
        yield number, dict(zip(header, fields))


def csv_rows(path: Path, source: str) -> Iterator[tuple[int, Row]]:
    header: list[str] | None = None
    with open_binary(path) as stream:
        # newline="": the csv module finds the record ends itself ("\n", "\r\n", quoted newlines).
        reader = csv.reader(io.TextIOWrapper(stream, encoding="utf-8-sig", newline=""))
        try:
            for fields in reader:
                if not fields:
                    continue
                if header is None:
                    header = [h.strip() for h in fields]
                    continue
                if len(fields) != len(header):
                    raise UserError(f"{source}: line {reader.line_num}: expected {len(header)} fields, got {len(fields)}")
                yield reader.line_num, dict(zip(header, fields))
        except csv.Error as err:
            raise UserError(f"{source}: line {reader.line_num}: malformed CSV ({err})") from None
        except UnicodeDecodeError:
            raise UserError(f"{source}: line {reader.line_num + 1}: not UTF-8 text; re-save the file as UTF-8") from None


JSON_SPACE = " \t\r\n"  # the whitespace JSON allows between values (RFC 8259)


def json_list_rows(path: Path, source: str) -> Iterator[tuple[int, Row]]:
    """The records of a JSON list (`[{...}, {...}]`), decoded one at a time; the line given for a
    record is the line where it starts."""
    decoder = json.JSONDecoder()
    chunks = text_chunks(path)
    buffer, pos, line, record = "", 0, 1, 0  # line = the line at buffer[pos]

    def more() -> bool:
        nonlocal buffer, pos
        piece = next(chunks, None)
        if piece is None:
            return False
        buffer, pos = buffer[pos:] + piece, 0
        return True

    def skip_space() -> str:
        nonlocal pos, line
        while True:
            while pos < len(buffer) and buffer[pos] in JSON_SPACE:
                line += buffer[pos] == "\n"
                pos += 1
            if pos < len(buffer) or not more():
                return buffer[pos] if pos < len(buffer) else ""

    if skip_space() != "[":
        raise AssertionError("json_list_rows needs a file that starts with '['")
    pos += 1
    while True:
        if skip_space() == "]" and record == 0:
            pos += 1
            break
        while True:
            try:
                row, end = decoder.raw_decode(buffer, pos)
                break
            except json.JSONDecodeError as err:
                if not more():
                    where = line + buffer.count("\n", pos, err.pos)
                    raise UserError(f"{source}: line {where}: invalid JSON ({err.msg})") from None
        record += 1
        if not isinstance(row, dict):
            raise UserError(f"{source}: record {record} (line {line}): expected a JSON object, got {type(row).__name__}")
        yield line, row
        line += buffer.count("\n", pos, end)
        pos = end
        separator = skip_space()
        pos += 1
        if separator == "]":
            break
        if separator != ",":
            raise UserError(f"{source}: line {line}: invalid JSON (expected ',' or ']' after record {record})")
    if skip_space():
        raise UserError(f"{source}: line {line}: invalid JSON (text after the closing ']')")


def starts_with_list(path: Path) -> bool:
    for piece in text_chunks(path):
        stripped = piece.lstrip(JSON_SPACE)  # what json_list_rows skips: a form feed is no JSON space
        if stripped:
            return stripped[0] == "["
    return False


class ArrowFile:
    """Writes rows (dicts) to an Arrow stream file in batches. Column types are inferred from the
    data; when a later batch needs a wider schema (a new key, null then text), `Restart` says which,
    and the caller writes the file again with it."""

    class Restart(Exception):
        def __init__(self, schema: Any) -> None:
            self.schema = schema

    def __init__(self, target: Path, source: str, schema: Any = None) -> None:
        self.target, self.source, self.schema = target, source, schema
        self.writer: Any = None

    def write(self, rows: list[Row], lines: list[int]) -> None:
        import pyarrow as pa

        names = list(dict.fromkeys(k for row in rows for k in row))
        columns = {name: [row.get(name) for row in rows] for name in names}
        if self.schema is not None and set(names) <= set(self.schema.names) and self._nested():
            # Converting to a struct type drops the keys it lacks without a word (a `meta.alias`, an
            # extra key of a message first seen in a later batch), so this batch's own types are
            # read first, and a wider schema restarts the file.
            wider = self._unified(self._inferred(columns, lines), lines)
            if not wider.equals(self.schema):
                raise ArrowFile.Restart(wider)
        if self.schema is not None and set(names) <= set(self.schema.names):
            try:
                table = pa.Table.from_pydict({n: columns.get(n, [None] * len(rows)) for n in self.schema.names},
                                             schema=self.schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                table = None
            if table is not None:
                return self._append(table)
        table = self._inferred(columns, lines)
        if self.schema is None:
            self.schema = table.schema
            return self._append(table)
        raise ArrowFile.Restart(self._unified(table, lines))

    def _nested(self) -> bool:
        import pyarrow as pa

        return any(pa.types.is_nested(field.type) for field in self.schema)

    def _inferred(self, columns: dict[str, list[Any]], lines: list[int]) -> Any:
        """The batch as a table with the types its own values have."""
        import pyarrow as pa

        try:
            return pa.Table.from_pydict(columns)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as err:
            raise UserError(f"{self.source}: {self._mixed(columns, lines, err)}; give each column one type") from None

    def _unified(self, table: Any, lines: list[int]) -> Any:
        """The schema so far widened to hold the batch too (new columns, new keys of structs)."""
        import pyarrow as pa

        try:
            return pa.unify_schemas([self.schema, table.schema], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            raise UserError(f"{self.source}: {self._changed(table.schema, lines)}; give each column one type") from None

    def _append(self, table: Any) -> None:
        import pyarrow as pa

        if self.writer is None:
            self.writer = pa.ipc.new_stream(str(self.target), table.schema)
        self.writer.write_table(table)

    def _mixed(self, columns: dict[str, list[Any]], lines: list[int], err: Exception) -> str:
        for name, values in columns.items():
            kinds = [type(v) for v in values if v is not None]
            for kind, line in zip((type(v) for v in values), lines):
                if kinds and kind is not type(None) and kind is not kinds[0] and {kind, kinds[0]} != {int, float}:
                    return f"line {line}: column {name!r} is {kind.__name__} where earlier rows have {kinds[0].__name__}"
        return f"lines {lines[0]}-{lines[-1]}: {str(err).splitlines()[0]}"

    def _changed(self, schema: Any, lines: list[int]) -> str:
        for field in schema:
            if field.name in self.schema.names and self.schema.field(field.name).type != field.type:
                return (f"lines {lines[0]}-{lines[-1]}: column {field.name!r} is {field.type} where earlier rows have "
                        f"{self.schema.field(field.name).type}")
        return f"lines {lines[0]}-{lines[-1]}: the columns change type"

    def close(self) -> None:
        if self.writer is None:
            import pyarrow as pa

            self.writer = pa.ipc.new_stream(str(self.target), self.schema or pa.schema([]))
        self.writer.close()


def write_rows(records: Any, target: Path, source: str) -> array:
    """Write the rows from `records()` (an iterator of (line, row)) to `target`; returns the lines.

    Rewritten from the start when a later batch widens the schema (rare: a column that only later
    rows have, or nulls before the first value)."""
    schema = None
    while True:
        out = ArrowFile(target, source, schema)
        lines = array("q")
        try:
            for batch_lines, batch in batches(records()):
                out.write(batch, batch_lines)
                lines.extend(batch_lines)
            out.close()
            return lines
        except ArrowFile.Restart as restart:
            schema = restart.schema
            if out.writer is not None:
                out.writer.close()


def batches(records: Iterable[tuple[int, Row]]) -> Iterator[tuple[list[int], list[Row]]]:
    lines, rows = [], []
    for line, row in records:
        lines.append(line)
        rows.append(row)
        if len(rows) == BATCH:
            yield lines, rows
            lines, rows = [], []
    if rows:
        yield lines, rows


