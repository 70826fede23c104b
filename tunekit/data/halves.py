"""Two disjoint halves of a data file, picked by a stable hash of each row's text: `data.split_half:
first` and `second` train two models on rows that neither sees twice (the proxy reward model of an
RLHF run and the judge that checks it, say). A hash, not the row order, decides: the halves do not
change when the file is reordered, identical texts land in the same half (so the halves share no
sentence), and each half is a random-like half of every part of the file."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from tunekit.data.tables import Table

SplitHalf = Literal["first", "second"]
SPLIT_HALF_HELP = ("train on one half of data.train's rows, by a stable hash of each row's text (first | second: "
                   "disjoint, together the whole file); null = every row")


def in_first_half(text: str) -> bool:
    """The half a text belongs to: the first bit of its SHA-256 (leading and trailing spaces ignored)."""
    return hashlib.sha256(text.strip().encode("utf-8")).digest()[0] < 128


def half_of(table: Table, which: SplitHalf | None, text_column: str | None = None) -> Table:
    """The rows of `table` in half `which` (all rows when None): by the text in `text_column`, or by
    the whole row (its JSON) when there is no one text column."""
    if which is None:
        return table
    import numpy as np

    if text_column:
        texts = [str(value) for value in table.column(text_column)]
    else:
        texts = [json.dumps(row, sort_keys=True, default=str) for row in table.rows]
    first = which == "first"
    kept = [i for i, text in enumerate(texts) if in_first_half(text) == first]
    return table.select(np.array(kept, dtype=np.int64))
