"""Data files: every format parses, and every kind of broken file is one line naming file and line."""

from __future__ import annotations

import gzip
import json

import pytest
from conftest import SHARED, write

from tunekit.config import validate_config
from tunekit.data.tables import read_table
from tunekit.errors import UserError
from tunekit.methods import classify


def test_glue_tsv_keeps_quotes_and_reads_every_row():
    table = read_table(str(SHARED / "sst2" / "dev.tsv"))
    assert len(table.rows) == 872
    assert table.columns == ["sentence", "label"]
    assert table.where(0) == f"{SHARED / 'sst2' / 'dev.tsv'}: line 2"
    rte = read_table(str(SHARED / "rte" / "dev.tsv"))
    assert len(rte.rows) == 277 and "sentence2" in rte.columns


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("a.jsonl", '{"text": "hi", "label": 1}\n\n{"text": "yo", "label": 0}\n'),
        ("a.json", '[{"text": "hi", "label": 1}, {"text": "yo", "label": 0}]'),
        ("a.csv", 'text,label\n"hi, there",1\nyo,0\n'),
        ("a.tsv", "text\tlabel\nhi\t1\nyo\t0\n"),
    ],
)
def test_formats(tmp_path, name, text):
    table = read_table(str(write(tmp_path / name, text)))
    assert len(table.rows) == 2 and set(table.columns) == {"text", "label"}


def test_parquet_and_gzip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "a", "label": 0}]), tmp_path / "a.parquet")
    assert read_table(str(tmp_path / "a.parquet")).rows == [{"text": "a", "label": 0}]
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a", "label": 1}\n'))
    assert read_table(str(tmp_path / "b.jsonl.gz")).rows[0]["label"] == 1


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("a.jsonl", '{"text": "a"}\n{"text": "b"\n', "a.jsonl: line 2: invalid JSON"),
        ("a.jsonl", '{"text": "a"}\n[1, 2]\n', "line 2: expected a JSON object"),
        ("a.json", '{"text": 1', "invalid JSON"),
        ("a.json", '"just a string"', "expected a JSON list of objects"),
        ("a.tsv", "text\tlabel\nok\t1\nbroken\n", "line 3: expected 2 tab-separated fields, got 1"),
        ("a.csv", "text,label\nok,1\na,b,c\n", "line 3: expected 2 fields, got 3"),
        ("a.jsonl", "", "the file is empty"),
        ("a.xlsx", "x", "unsupported file type"),
        ("a.jsonl.gz", "not gzip", "not a valid gzip file"),
    ],
)
def test_broken_files(tmp_path, name, content, expected):
    path = write(tmp_path / name, content)
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        read_table(str(path))


def test_binary_non_utf8_missing_and_directory(tmp_path):
    (tmp_path / "bin.jsonl").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "latin.tsv").write_bytes("text\tlabel\nok\t1\ncaf\xe9\t0\n".encode("latin-1"))
    with pytest.raises(UserError, match="binary"):
        read_table(str(tmp_path / "bin.jsonl"))
    with pytest.raises(UserError, match="line 3: not UTF-8"):
        read_table(str(tmp_path / "latin.tsv"))
    with pytest.raises(UserError, match="no such file"):
        read_table(str(tmp_path / "missing.tsv"))
    with pytest.raises(UserError, match="is a directory"):
        read_table(str(tmp_path))


def classify_config(train, **data):
    raw = {"model": {"name": "x"}, "data": {"train": str(train), **data}}
    return validate_config(classify.Config, raw, "r.yaml")


def rows(tmp_path, records, name="d.jsonl"):
    return write(tmp_path / name, "".join(json.dumps(r) + "\n" for r in records))


def test_string_labels_map_to_sorted_ids(tmp_path):
    path = rows(tmp_path, [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    data = classify.check(classify_config(path))
    assert data.label_names == ["neg", "pos"]
    assert data.train.labels == [1, 0]


def test_sentence_pairs_are_detected():
    data = classify.check(classify_config(SHARED / "rte" / "train.tsv", train_limit=5))
    assert data.train.pairs is not None and len(data.train.pairs) == 5
    assert data.label_names == ["entailment", "not_entailment"]


@pytest.mark.parametrize(
    ("records", "extra", "expected"),
    [
        ([{"text": "a", "label": 1.5}], {}, "line 1: label 1.5 is not a class id"),
        ([{"text": "a", "label": [1]}], {}, "label [1] must be an int or a string"),
        ([{"text": "a", "label": True}], {}, "label True must be an int or a string"),
        ([{"text": "a", "label": None}], {}, "column 'label' is missing or null"),
        ([{"text": "a", "label": 0}, {"text": "b", "label": "x"}], {}, "line 2: column 'label' is str where earlier rows have int"),
        ([{"text": "a", "label": 3}], {"label_column": "label"}, None),
        ([{"text": 5, "label": 0}], {}, "'text' must be text"),
        ([{"sentence_x": "a", "label": 0}], {}, "none of the columns sentence, text"),
        ([{"text": "a", "lbl": 0}], {}, "no column 'label' (columns: text, lbl)"),
    ],
)
def test_bad_labels_and_columns(tmp_path, records, extra, expected):
    config = classify_config(rows(tmp_path, records), **extra)
    if expected is None:  # 3 with no class names means classes 0..3
        assert classify.check(config).label_names == ["0", "1", "2", "3"]
        return
    with pytest.raises(UserError) as info:
        classify.check(config)
    assert expected in str(info.value)


def test_label_out_of_range_and_unknown_eval_label(tmp_path):
    train = rows(tmp_path, [{"text": "a", "label": "neg"}, {"text": "b", "label": "pos"}])
    bad_eval = rows(tmp_path, [{"text": "a", "label": "meh"}], name="e.jsonl")
    with pytest.raises(UserError, match="unknown label 'meh'"):
        classify.check(classify_config(train, eval=str(bad_eval)))
    numeric = rows(tmp_path, [{"text": "a", "label": 0}, {"text": "b", "label": 2}], name="n.jsonl")
    config = classify_config(numeric)
    config.classify.labels = ["neg", "pos"]
    with pytest.raises(UserError, match="label 2 out of range 0..1"):
        classify.check(config)
