"""Defects found in review (issue 26), one test each: every test failed on the code before its fix."""

from __future__ import annotations

import json

import pytest
from conftest import write

from tunekit.data import corpus


@pytest.fixture(scope="module")
def tokenizer():
    from tunekit.data.chat import train_tokenizer

    return train_tokenizer(["the quick brown fox jumps over the lazy dog\n" * 50], 300)


def test_packed_blocks_and_trained_tokenizer_follow_the_text_column(tmp_path, tokenizer):
    rows = [{"text": f"alpha beta gamma {i}", "body": f"zeta eta theta {i} {i}"} for i in range(40)]
    path = write(tmp_path / "c.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    by_text = corpus.sources([str(path)], "data.train", "text")
    by_body = corpus.sources([str(path)], "data.train", "body")
    assert by_text[0].key != by_body[0].key  # the trained tokenizer's cache key is built from these
    text_blocks = corpus.packed(by_text, tokenizer, 8, 1).dataset["input_ids"]
    body_blocks = corpus.packed(by_body, tokenizer, 8, 1).dataset["input_ids"]
    expected = tokenizer("zeta eta theta 0 0", add_special_tokens=False)["input_ids"][:8]
    assert body_blocks[0] == expected and text_blocks != body_blocks


def test_a_same_size_rewrite_with_its_mtime_restored_is_read_again(tmp_path):
    import os

    from tunekit.data.tables import read_table

    path = write(tmp_path / "a.jsonl", '{"text": "old"}\n')
    stat = path.stat()
    assert list(read_table(str(path)).rows) == [{"text": "old"}]
    path.write_text('{"text": "new"}\n')
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert list(read_table(str(path)).rows) == [{"text": "new"}]


def test_a_file_is_hashed_once_per_version(tmp_path, monkeypatch):
    from tunekit.data import cache

    path = write(tmp_path / "a.jsonl", '{"text": "x"}\n')
    first = cache.file_key(path)
    monkeypatch.setattr(cache, "content_hash", lambda p: pytest.fail("hashed an unchanged file again"))
    assert cache.file_key(path) == first
