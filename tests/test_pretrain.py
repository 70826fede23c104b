"""`tunekit pretrain`: packing into blocks, tokenizer training, and a few-step causal and masked run."""

from __future__ import annotations

import json

from conftest import MINILM, SHARED, write

from tunekit.data.corpus import blocks
from tunekit.methods.pretrain import split_blocks


def test_pack_joins_documents_with_eos_and_drops_the_tail(tiny_gpt):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt)
    texts = ["To be, or not to be", "that is the question"]
    stream = [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    pieces = [(tokenizer(text, add_special_tokens=False)["input_ids"], True) for text in texts]
    packed = [row.tolist() for array in blocks(iter(pieces), tokenizer.eos_token_id, 4) for row in array]
    assert packed == [stream[i : i + 4] for i in range(0, len(stream) - 3, 4)]
    assert all(len(b) == 4 for b in packed)


def test_held_out_blocks_are_disjoint_and_seeded():
    train, held = split_blocks(100, 0.1, seed=1)
    assert len(held) == 10 and len(train) == 90
    assert not set(train.tolist()) & set(held.tolist())
    assert split_blocks(100, 0.1, seed=1)[1].tolist() == held.tolist()


def recipe(tmp_path, body):
    return write(tmp_path / "pt.yaml", "method: pretrain\n" + body + """\
train:
  max_steps: 8
  per_device_train_batch_size: 4
  logging_steps: 1
  save_strategy: "no"
""")


def test_causal_from_config_trains_its_own_tokenizer(tmp_path, cli):
    text = write(tmp_path / "corpus.txt", (SHARED / "tiny_shakespeare" / "input.txt").read_text()[:40000])
    path = recipe(tmp_path, f"""\
model:
  config: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2}}
data:
  train: {text}
  block_size: 64
tokenizer:
  vocab_size: 400
""")
    out = tmp_path / "run"
    result = cli("pretrain", path, "-o", out)
    assert result.code == 0, result.err
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["perplexity"] > 1 and metrics["loss"] > 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 8 and losses[-1] < losses[0]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert tokenizer.eos_token == "<|end|>" and "{% generation %}" in tokenizer.chat_template
    assert len(tokenizer) == 400


def test_masked_lm_continues_minilm(tmp_path, cli):
    path = recipe(tmp_path, f"""\
model:
  name: {MINILM}
data:
  train: {SHARED}/sst2/dev.tsv
  text_column: sentence
  block_size: 32
pretrain:
  objective: mlm
""")
    out = tmp_path / "run"
    result = cli("pretrain", path, "--set", "train.max_steps=2", "-o", out)
    assert result.code == 0, result.err
    assert json.loads((out / "eval.json").read_text())["loss"] > 0
