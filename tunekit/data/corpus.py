"""Pre-training text as a stream: documents read in pieces, tokenised in parallel, joined with EOS
between documents and packed into fixed blocks, written to an Arrow file in batches. Neither the
corpus nor its token stream is ever held in memory; a gigabyte of text needs a few hundred MB.

A document is a text file, or one row (its text column) of a jsonl/json/csv/tsv/parquet file or a
Hub dataset. A text file is cut into pieces of about 1 MB at a newline between two non-space
characters: byte-level BPE tokenizers (GPT-2 style pre-tokenisation, which tunekit's own tokenizer
uses) never join tokens across such a point, so the ids are the same as tokenising the file whole.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunekit.data import cache
from tunekit.data.readers import text_chunks
from tunekit.data.tables import Table, check_file, file_suffix, read_table
from tunekit.errors import UserError
from tunekit.jsontypes import Row

PIECE = 256 << 10  # characters of a text file tokenised at a time
UNIT = 1 << 20  # characters sent to a worker process at once (a fast tokenizer's output costs ~100x the text)
WRITE_BLOCKS = 2048  # blocks per Arrow record batch


@dataclass
class Source:
    """One data file or Hub dataset of a corpus: a text file read in pieces, or a table's rows."""

    spec: str
    key: str  # what decides the source's text: the file (or Hub dataset) and, for a table, its text column
    path: Path | None = None  # a text file
    table: Table | None = None  # rows with a text column
    column: str = "text"

    def pieces(self) -> Iterator[tuple[str, bool]]:
        """(text, whether a document ends with it)."""
        if self.path is not None:
            yield from file_pieces(self.path)
            return
        assert self.table is not None
        for i, row in enumerate(self.table.rows):
            text = row_text(row, self.column, self.table.where, i)
            if text.strip():
                yield text, True


def row_text(row: Row, column: str, where: Any, index: int) -> str:
    """The text column, or (e.g. Alpaca records) the row's string fields joined."""
    value = row.get(column)
    if value is None:
        value = "\n".join(v for v in row.values() if isinstance(v, str) and v.strip())
    if not isinstance(value, str):
        raise UserError(f"{where(index)}: {column!r} must be text, got {type(value).__name__}")
    return value


def file_pieces(path: Path) -> Iterator[tuple[str, bool]]:
    """A text file (one document) in pieces cut at a newline between two non-space characters."""
    buffer = ""
    seen_text = False
    for chunk in text_chunks(path):
        buffer += chunk
        while len(buffer) > PIECE:
            cut = cut_point(buffer, PIECE)
            if cut is None:
                break
            seen_text = seen_text or bool(buffer[:cut].strip())
            yield buffer[:cut], False
            buffer = buffer[cut:]
    if seen_text or buffer.strip():
        yield buffer, True


def cut_point(text: str, near: int) -> int | None:
    """The position just after the last "\\n" before `near` that has a non-space character on each side."""
    end = near
    while True:
        newline = text.rfind("\n", 1, end)
        if newline < 1:
            return None
        if newline + 1 < len(text) and not text[newline - 1].isspace() and not text[newline + 1].isspace():
            return newline + 1
        end = newline


def sources(specs: list[str], key: str, column: str, streaming: bool = False) -> list[Source]:
    """Each data file or Hub dataset, checked in a streaming pass (UTF-8, text in every row; the
    result is cached under the file); with `streaming`, a Hub dataset is read as it is trained on."""
    found = []
    for spec in specs:
        path = check_file(spec, key)
        if path is not None and file_suffix(path) == ".txt":
            source = Source(spec, cache.file_key(path), path=path)
        elif path is None and streaming:
            source = Source(spec, cache.digest(spec, "text_column", column), table=hub_stream(spec, key), column=column)
            found.append(source)
            continue
        else:
            # The key names the rows and the column read from them: every result keyed on a Source
            # (the packed blocks, a tokenizer trained on the corpus) then differs with data.text_column.
            table = read_table(spec, key)
            source = Source(spec, cache.digest(table.key, "text_column", column), table=table, column=column)
        marker = cache.folder("checks") / f"{cache.digest('corpus', source.key)}.json"
        if cache.read_marker(marker) is None:
            if not sum(bool(text.strip()) for text, _ in source.pieces()):
                raise UserError(f"{spec}: no text found (data.text_column is {column!r})")
            cache.write_marker(marker, {"source": spec})
        found.append(source)
    return found


def hub_stream(spec: str, key: str) -> Table:
    """A Hub dataset read row by row while training (`data.streaming`), never downloaded whole."""
    import datasets

    name, _, split = spec.partition(":")
    try:
        rows = datasets.load_dataset(name, split=split or "train", streaming=True)
    except Exception as err:
        raise UserError(f"{name}: not a local file and could not be streamed from the Hub ({key}): "
                        f"{type(err).__name__}") from None
    return Table(spec, rows)


def texts(corpus: list[Source]) -> Iterator[str]:
    for source in corpus:
        for text, _ in source.pieces():
            yield text


def units(corpus: list[Source]) -> Iterator[list[tuple[str, bool]]]:
    """The corpus's pieces in groups of about UNIT characters (the work of one worker call)."""
    unit: list[tuple[str, bool]] = []
    size = 0
    for source in corpus:
        for piece in source.pieces():
            unit.append(piece)
            size += len(piece[0])
            if size >= UNIT:
                yield unit
                unit, size = [], 0
    if unit:
        yield unit


_TOKENIZER: Any = None


def _set_tokenizer(tokenizer: Any) -> None:
    global _TOKENIZER
    _TOKENIZER = tokenizer


def _encode(unit: list[tuple[str, bool]]) -> list[tuple[list[int], bool]]:
    ids = _TOKENIZER([text for text, _ in unit], add_special_tokens=False, return_attention_mask=False,
                     return_token_type_ids=False)["input_ids"]
    return [(piece, end) for piece, (_, end) in zip(ids, unit)]


def encoded(corpus: list[Source], tokenizer: Any, num_proc: int) -> Iterator[tuple[list[int], bool]]:
    """Token ids of each piece, in corpus order; `num_proc` processes tokenise, with a bounded
    number of units in flight so that memory stays flat."""
    if num_proc <= 1:
        _set_tokenizer(tokenizer)
        for unit in units(corpus):
            yield from _encode(unit)
        return
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(num_proc, context, _set_tokenizer, (tokenizer,)) as pool:
        pending: list[Any] = []
        for unit in units(corpus):
            pending.append(pool.submit(_encode, unit))
            if len(pending) >= 2 * num_proc:
                yield from pending.pop(0).result()
        for future in pending:
            yield from future.result()


def blocks(pieces: Iterator[tuple[list[int], bool]], eos: int, block_size: int) -> Iterator[Any]:
    """Arrays of up to WRITE_BLOCKS full blocks (rows of block_size ids): documents joined with EOS
    after each; the ragged tail at the very end is dropped."""
    import numpy as np

    stream = np.empty(0, dtype=np.int32)
    waiting: list[Any] = []
    count = 0
    for ids, end in pieces:
        waiting.append(np.asarray([*ids, eos] if end else ids, dtype=np.int32))
        count += len(waiting[-1])
        if count >= block_size * WRITE_BLOCKS:
            stream = np.concatenate([stream, *waiting])
            waiting, count = [], 0
            full = len(stream) // block_size * block_size
            yield stream[:full].reshape(-1, block_size)
            stream = stream[full:]
    stream = np.concatenate([stream, *waiting])
    full = len(stream) // block_size * block_size
    if full:
        yield stream[:full].reshape(-1, block_size)


def write_blocks(chunks: Iterator[Any], target: Path) -> None:
    import pyarrow as pa

    from tunekit.data.prepare import token_features

    schema = token_features(False).arrow_schema
    with pa.ipc.new_stream(str(target), schema) as writer:
        for array in chunks:
            offsets = pa.array(range(0, array.size + 1, array.shape[1]), type=pa.int32())
            column = pa.ListArray.from_arrays(offsets, pa.array(array.reshape(-1)))
            writer.write_batch(pa.record_batch([column], schema=schema))


def end_token(tokenizer: Any) -> int:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def packed(corpus: list[Source], tokenizer: Any, block_size: int, num_proc: int | None) -> Any:
    """The corpus as blocks (a prepared, cached dataset of `input_ids`), built once."""
    import os

    from tunekit.data import prepare

    key = cache.digest("pretrain", [s.key for s in corpus], cache.tokenizer_key(tokenizer), block_size,
                       end_token(tokenizer))
    found = prepare.load(key)
    if found is not None:
        return found
    target = cache.folder("prepared") / f"{key}.arrow"
    temporary = cache.temporary(target)
    procs = max(1, num_proc or prepare.available_cores())
    try:
        write_blocks(blocks(encoded(corpus, tokenizer, procs), end_token(tokenizer), block_size), temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return prepare.record(key, [str(target)])


@dataclass(frozen=True)
class StreamPosition:
    """Where a resumed run stood in its stream: the optimizer steps it had taken, and how the
    Trainer turns blocks into steps (a batch over all processes, accumulated; each pass over the
    corpus is one Trainer epoch, whose last batch and last accumulation may be short)."""

    steps: int
    batch: int  # blocks per batch, all processes together (rank 0 reads the stream and hands them out)
    accumulation: int
    drop_last: bool = False

    def skip(self, pass_blocks: int | None) -> int:
        """Blocks to skip from the start of a pass; `pass_blocks`: a pass's length, once known."""
        per_step = self.batch * self.accumulation
        if pass_blocks is None:  # not yet gone round the corpus (if it had, a pass says so)
            return self.steps * per_step
        batches = pass_blocks // self.batch if self.drop_last else -(-pass_blocks // self.batch)
        return self.steps % max(1, -(-batches // self.accumulation)) * per_step


def streamed(corpus: list[Source], tokenizer: Any, block_size: int, resume: StreamPosition | None = None) -> Any:
    """The corpus as an IterableDataset of blocks, tokenised while training reads it; each pass over
    it is one epoch of the Trainer's. With `resume`, the first pass starts where the interrupted run
    stood, past the blocks it had trained on (counted round the corpus as often as it had gone
    round). The skipped blocks are read and tokenised again (a stream keeps no index of where its
    blocks start), never trained on."""
    from datasets import IterableDataset

    pending = [resume]

    def generate() -> Iterator[dict[str, list[int]]]:
        position, pending[0] = pending[0], None
        left = position.skip(None) if position else 0
        while True:
            count = given = 0
            for array in blocks(encoded(corpus, tokenizer, 1), end_token(tokenizer), block_size):
                for row in array:
                    count += 1
                    if left:
                        left -= 1
                        continue
                    given += 1
                    yield {"input_ids": row.tolist()}
            if given or not count or position is None:
                return
            left, position = position.skip(count), None  # it had gone round: the same place in this pass

    return IterableDataset.from_generator(generate)


def stream_position(checkpoint: Path, args: Any) -> StreamPosition:
    """Where the run that saved `checkpoint` stood in its stream."""
    import json

    step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    return StreamPosition(step, args.per_device_train_batch_size * args.world_size, args.gradient_accumulation_steps,
                          args.dataloader_drop_last)
