"""Data at scale: records end at newlines only, the batched and cached preprocessing gives exactly
the per-row function's ids and labels on real rows, corpora are packed in pieces as if whole, and
`tunekit data prepare` / `data.streaming` behave."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED, write

from tunekit.config import validate_config
from tunekit.data import corpus, prepare
from tunekit.data.masking import to_messages, tokenize_conversation
from tunekit.data.tables import read_table
from tunekit.errors import UserError
from tunekit.methods import pretrain, sft

SEPARATORS = "a\u0085b\u2028c\u2029d"  # str.splitlines() breaks on each of these; a record must not


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
@pytest.mark.parametrize("name", ["a.tsv", "a.csv", "a.jsonl", "a.json"])
def test_unicode_line_separators_stay_inside_fields(tmp_path, name, ending):
    rows = [{"text": f"one {SEPARATORS} two", "label": "1"}, {"text": "plain", "label": "0"}]
    if name.endswith(".tsv"):
        text = ending.join(["text\tlabel", *(f"{r['text']}\t{r['label']}" for r in rows)]) + ending
    elif name.endswith(".csv"):
        text = ending.join(["text,label", *(f"{r['text']},{r['label']}" for r in rows)]) + ending
    elif name.endswith(".jsonl"):
        text = ending.join(json.dumps(r, ensure_ascii=False) for r in rows) + ending
    else:
        text = "[" + ("," + ending).join(json.dumps(r, ensure_ascii=False) for r in rows) + "]" + ending
    table = read_table(str(write(tmp_path / name, text)))
    assert list(table.rows) == rows
    assert table.where(1).endswith("line 3" if name.endswith(("tsv", "csv")) else "line 2")  # the 2nd row


def test_json_list_is_read_record_by_record_with_lines(tmp_path):
    path = write(tmp_path / "a.json", '[\n {"text": "a"},\n {"text": "b"},\n 7\n]\n')
    with pytest.raises(UserError, match="record 3 \\(line 4\\): expected a JSON object"):
        read_table(str(path))
    path = write(tmp_path / "b.json", '[\n {"text": "a"},\n {"text": "b"\n]\n')
    with pytest.raises(UserError, match="b.json: line 4: invalid JSON"):
        read_table(str(path))


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE tokenizer with tunekit's chat template, trained on real Alpaca text."""
    from tunekit.data.chat import train_tokenizer

    rows = json.loads((SHARED / "alpaca" / "alpaca_data_1k.json").read_text())
    return train_tokenizer([r["instruction"] + "\n" + r["output"] for r in rows], 500)


def sft_config(tmp_path, train, **data):
    raw = {"model": {"name": str(tmp_path)}, "data": {"train": train, "max_length": 512, **data}}
    return validate_config(sft.Config, raw, "r.yaml")


@pytest.mark.parametrize(("train", "rows"), [
    (str(SHARED / "alpaca" / "alpaca_small_2k.json"), 400),  # the Alpaca recipe's data
    (str(SHARED / "hh_rlhf" / "helpful-base_test.jsonl.gz"), 120),  # the HH chat recipe's dialogues
])
def test_batched_parallel_path_equals_the_per_row_function(tmp_path, monkeypatch, tokenizer, train, rows):
    monkeypatch.setattr(prepare, "ROWS_PER_PROCESS", 50)  # two worker processes even on a few rows
    config = sft_config(tmp_path, train, train_limit=rows, eval_size=20, num_proc=2)
    data = sft.check(config)
    prepared = dict(sft.prepare(config, data, tokenizer))
    for name, split in (("train", data.train), ("eval", data.eval)):
        got = prepared[name].dataset
        table = read_table(train).head(rows)
        offset = 0 if name == "train" else rows - 20
        assert len(got) == len(split)
        for i in range(len(got)):
            row = table.rows[offset + i]
            kind = "alpaca" if "instruction" in row else "hh"
            expected = tokenize_conversation(tokenizer, to_messages(row, kind, "x"), 512)
            assert got[i]["input_ids"] == expected.input_ids
            assert got[i]["labels"] == expected.labels
        assert prepared[name].trained_tokens == sum(sum(x != -100 for x in r) for r in got["labels"])


def test_second_prepare_comes_from_the_cache(tmp_path, monkeypatch, tokenizer):
    from datasets import Dataset

    config = sft_config(tmp_path, str(SHARED / "alpaca" / "alpaca_data_1k.json"), train_limit=60)
    first = dict(sft.prepare(config, sft.check(config), tokenizer))["train"]

    def no_map(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(Dataset, "map", no_map)
    again = dict(sft.prepare(config, sft.check(config), tokenizer))["train"]
    assert again.path == first.path and again.dataset["input_ids"] == first.dataset["input_ids"]
    longer = sft_config(tmp_path, str(SHARED / "alpaca" / "alpaca_data_1k.json"), train_limit=60)
    longer.data.max_length = 64  # another length option: another result, so tokenised again
    with pytest.raises(AssertionError, match="tokenised again"):
        sft.prepare(longer, sft.check(longer), tokenizer)


def test_a_bad_row_inside_the_parallel_map_names_its_line(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setattr(prepare, "ROWS_PER_PROCESS", 2)
    rows = [{"instruction": "Say hi.", "output": "Hi."}] * 5 + [{"instruction": "x " * 2000, "output": "y"}]
    path = write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    config = sft_config(tmp_path, str(path), num_proc=2)
    with pytest.raises(UserError, match="d.jsonl: line 6: no token left to train on"):
        sft.prepare(config, sft.check(config), tokenizer)


def test_corpus_in_pieces_packs_like_the_whole_text(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setattr(corpus, "PIECE", 5000)  # dozens of cuts in 200 kB
    monkeypatch.setattr(corpus, "UNIT", 20000)
    text = (SHARED / "tiny_shakespeare" / "input.txt").read_text()[:200000]
    alpaca = SHARED / "alpaca" / "alpaca_data_1k.json"
    instructions = [r["instruction"] for r in json.loads(alpaca.read_text())]
    stream = []  # what tunekit did before: every document tokenised whole, EOS after each
    for ids in tokenizer([text, *instructions], add_special_tokens=False)["input_ids"]:
        stream += [*ids, tokenizer.eos_token_id]
    expected = [stream[i : i + 64] for i in range(0, len(stream) - 63, 64)]
    raw = {"model": {"config": {"model_type": "llama"}}, "train": {"seed": 3},
           "data": {"train": [str(write(tmp_path / "c.txt", text)), str(alpaca)], "text_column": "instruction",
                    "block_size": 64, "num_proc": 2, "eval_fraction": 0.1}}
    config = validate_config(pretrain.Config, raw, "r.yaml")
    prepared = dict(pretrain.prepare(config, pretrain.check(config), tokenizer, seed=3))
    train, held = pretrain.split_blocks(len(expected), 0.1, 3)
    assert prepared["train"].dataset["input_ids"] == [expected[i] for i in train]
    assert prepared["eval"].dataset["input_ids"] == [expected[i] for i in held]


def test_data_prepare_prints_counts_and_cache(tmp_path, cli, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    recipe = write(tmp_path / "r.yaml", f"""\
method: sft
model:
  name: {tmp_path / 'tok'}
data:
  train: {SHARED / 'alpaca' / 'alpaca_data_1k.json'}
  train_limit: 50
  eval_size: 10
""")
    result = cli("data", "prepare", recipe)
    assert result.code == 0, result.err
    train, held = result.out.strip().splitlines()
    assert train.startswith("train: 40 rows, ") and "trained tokens; cache " in train
    assert held.startswith("eval: 10 rows, ")
    cached = train.rsplit("cache ", 1)[1]
    from datasets import Dataset

    assert len(Dataset.from_file(cached)) == 40
    assert cli("data", "prepare", recipe, "--set", "data.train_limit=0").code == 2


def test_streaming_needs_max_steps(tmp_path, cli):
    text = write(tmp_path / "c.txt", "To be or not to be.\n" * 50)
    recipe = write(tmp_path / "p.yaml", f"method: pretrain\nmodel:\n  config: {{model_type: llama}}\n"
                                        f"data:\n  train: {text}\n  streaming: true\n")
    result = cli("pretrain", recipe, "--dry-run")
    assert result.code == 2 and "set train.max_steps" in result.err and len(result.err.strip().splitlines()) == 1


def test_streaming_pretrain_trains(tmp_path, cli):
    text = write(tmp_path / "c.txt", (SHARED / "tiny_shakespeare" / "input.txt").read_text()[:30000])
    recipe = write(tmp_path / "p.yaml", f"""\
method: pretrain
model:
  config: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2}}
data:
  train: {text}
  eval: {text}
  streaming: true
  block_size: 32
tokenizer:
  vocab_size: 300
train:
  max_steps: 4
  per_device_train_batch_size: 4
  logging_steps: 1
  save_strategy: "no"
""")
    result = cli("pretrain", recipe, "-o", tmp_path / "run")
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["loss"] > 0
