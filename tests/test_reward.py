"""Reward models: preference data in every layout, HH-RLHF parsing on real lines, the Bradley-Terry
loss on a hand-built batch, bad data as one line with exit code 2, and few-step runs end to end on an
encoder and on a causal LM."""

from __future__ import annotations

import json
import math

import pytest
from conftest import SHARED, write

from tunekit.data.preference import Pair, Pairs, PreferenceData, dialogue_text, load_preferences, to_pair
from tunekit.data.tables import read_table

HH = SHARED / "hh_rlhf" / "helpful-base_test.jsonl.gz"


def test_hh_rlhf_parsing_on_real_lines():
    rows = read_table(str(HH)).rows
    first = to_pair(rows[0], "hh", "hh: line 1")
    assert first.prompt == [{"role": "user", "content": "Do you know why turkeys became the official food of thanksgiving?"}]
    assert first.chosen == [{"role": "assistant", "content": rows[0]["chosen"].rsplit("\n\nAssistant: ", 1)[1]}]
    assert first.rejected == [{"role": "assistant", "content": rows[0]["rejected"].rsplit("\n\nAssistant: ", 1)[1]}]
    multi = next(to_pair(r, "hh", "x") for r in rows if r["chosen"].count("\n\nHuman:") >= 3)
    assert [m["role"] for m in multi.prompt] == ["user", "assistant"] * (len(multi.prompt) // 2) + ["user"]
    assert len(multi.chosen) == len(multi.rejected) == 1 and multi.chosen != multi.rejected
    # an empty final answer (4 rejected sides of helpful-base) is a real, bad answer: kept
    empty = to_pair(rows[120], "hh", "x")
    assert empty.rejected == [{"role": "assistant", "content": ""}] and empty.chosen[-1]["content"]
    # as plain text (what an encoder scores) a dialogue reads as it was written
    assert dialogue_text([*first.prompt, *first.chosen]) == rows[0]["chosen"].strip()


def test_hh_split_drops_the_two_identical_pairs(capsys):
    data = load_preferences(PreferenceData(train=str(HH), eval_size=354), "r.yaml")
    assert data.train.kind == "hh"
    assert (len(data.train.pairs), len(data.eval.pairs)) == (1999, 353)  # 2,000 + 354 rows, one identical in each
    err = capsys.readouterr().err
    assert "dropped 1 pair(s) whose chosen and rejected are identical (line 722)" in err
    assert "(line 2169)" in err


@pytest.mark.parametrize(
    ("row", "kind", "expected"),
    [
        ({"chosen": "Yes.", "rejected": "No."}, "pairs", Pair("", "Yes.", "No.")),
        ({"prompt": "Q: ", "chosen": "Yes.", "rejected": "No."}, "prompt_pairs", Pair("Q: ", "Yes.", "No.")),
        ({"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Yes."}],
          "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "No."}]}, "conversation",
         Pair([{"role": "user", "content": "Q"}], [{"role": "assistant", "content": "Yes."}],
              [{"role": "assistant", "content": "No."}])),
        ({"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "Yes."}],
          "rejected": [{"role": "assistant", "content": "No."}]}, "conversation",
         Pair([{"role": "user", "content": "Q"}], [{"role": "assistant", "content": "Yes."}],
              [{"role": "assistant", "content": "No."}])),
    ],
)
def test_every_layout_becomes_prompt_chosen_rejected(row, kind, expected):
    assert to_pair(row, kind, "f.jsonl: line 1") == expected


def test_label_pairs_are_seeded_and_use_each_sentence_once():
    section = PreferenceData(train=str(SHARED / "sst2" / "dev.tsv"), format="label_pairs", text_column="sentence")
    pairs = load_preferences(section, "r.yaml").train
    dev = read_table(str(SHARED / "sst2" / "dev.tsv")).rows
    label = {r["sentence"]: r["label"] for r in dev}
    assert len(pairs.pairs) == min(sum(r["label"] == "1" for r in dev), sum(r["label"] == "0" for r in dev))
    assert all(label[p.chosen] == "1" and label[p.rejected] == "0" and p.prompt == "" for p in pairs.pairs)
    assert len({p.chosen for p in pairs.pairs}) == len(pairs.pairs)
    assert load_preferences(section, "r.yaml").train.pairs == pairs.pairs
    other = load_preferences(section.model_copy(update={"pairs_seed": 1}), "r.yaml").train.pairs
    assert other != pairs.pairs


@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_gpt"])
def test_encoding_keeps_the_end_and_marks_it(request, backbone):
    from transformers import AutoTokenizer

    from tunekit.rl.reward_scores import encode

    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(backbone))
    text = " ".join(f"word{i}" for i in range(60)) + " the final answer"
    full, cut = encode(tokenizer, text, 1000), encode(tokenizer, text, 12)
    assert len(cut) == 12
    if tokenizer.eos_token is None:  # encoder: [CLS] ... [SEP], no EOS to append
        assert cut[0] == tokenizer.cls_token_id and cut[-1] == tokenizer.sep_token_id
        assert cut[1:-1] == full[-11:-1]
    else:  # causal LM: the head reads the last token, the EOS
        assert cut[-1] == tokenizer.eos_token_id and cut == full[-12:]
    assert "final answer" in tokenizer.decode(cut)


@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_gpt"])
def test_loss_is_minus_log_sigmoid_of_the_margin(request, tmp_path, backbone):
    """RewardTrainer's loss on a hand-built batch equals -log sigmoid(r_chosen - r_rejected), with
    the rewards that tunekit's own scoring gives the same texts."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from tunekit.methods.reward import encode_pairs, pair_metrics
    from tunekit.rl.reward_scores import score_texts
    from tunekit.train_section import device_defaults

    folder = request.getfixturevalue(backbone)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    pairs = Pairs("pairs", [Pair("", "a fine, moving film", "dull"), Pair("", "good", "a long and tiresome mess of a plot")],
                  ["line 1", "line 2"])
    rows = encode_pairs(tokenizer, pairs, 32)
    args = RewardConfig(output_dir=str(tmp_path), **device_defaults())
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, trainer.data_collator(rows)).item()
    chosen = score_texts(model, tokenizer, ["a fine, moving film", "good"], max_length=32)
    rejected = score_texts(model, tokenizer, ["dull", "a long and tiresome mess of a plot"], max_length=32)
    margins = [c - r for c, r in zip(chosen, rejected)]
    assert any(abs(m) > 1e-4 for m in margins)
    expected = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / 2
    assert loss == pytest.approx(expected, abs=1e-5)
    metrics = pair_metrics(model, tokenizer, pairs, 32, 8)
    assert metrics["loss"] == pytest.approx(expected, abs=1e-5)
    assert metrics["margin"] == pytest.approx(sum(margins) / 2, abs=1e-5)
    assert metrics["accuracy"] == sum(m > 0 for m in margins) / 2


def reward_recipe(tmp_path, model, data_lines, **data):
    body = "".join(f"  {k}: {v}\n" for k, v in data.items())
    return write(tmp_path / "reward.yaml", f"""\
method: reward
model:
  name: {model}
data:
  train: {data_lines}
  max_length: 64
{body}train:
  max_steps: 4
  per_device_train_batch_size: 8
  learning_rate: 1.0e-3
  logging_steps: 1
  save_strategy: "no"
""")


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.jsonl", '{"chosen": "good", "rejected": "bad"}\n{"chosen": "fine", "rejected": "  "}\n',
         "empty.jsonl: line 2: 'rejected' is empty"),
        ("missing.jsonl", '{"chosen": "good", "rejected": "bad"}\n{"chosen": "fine"}\n', "line 2: 'rejected' is missing"),
        ("nocol.jsonl", '{"chosen": "good", "other": "bad"}\n', "needs 'chosen' and 'rejected' columns"),
        ("type.jsonl", '{"chosen": "good", "rejected": 3}\n', "line 1: 'rejected' must be text"),
        ("hh.jsonl", '{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: hello", "rejected": "\\n\\nHuman: hi"}\n',
         "line 1: 'rejected' does not end with an Assistant turn"),
        ("conv.jsonl", '{"chosen": [{"role": "assistant", "content": "x"}], "rejected": []}\n', "line 1: 'rejected' is empty"),
        ("same.jsonl", '{"chosen": "same", "rejected": "same"}\n', "no pairs left"),
    ],
)
def test_bad_preference_data_is_one_line_and_exit_2(tmp_path, cli, tiny_bert, name, content, expected):
    recipe = reward_recipe(tmp_path, tiny_bert, write(tmp_path / name, content))
    result = cli("reward", recipe, "--dry-run")
    assert result.code == 2, result.err
    last = result.err.strip().splitlines()[-1]
    assert expected in last and last.startswith("tunekit: error: "), result.err
    assert result.err.count("tunekit: error") == 1


def test_label_pairs_without_a_class_is_exit_2(tmp_path, cli, tiny_bert):
    data = write(tmp_path / "one.tsv", "sentence\tlabel\ngood\t1\nfine\t1\n")
    result = cli("reward", reward_recipe(tmp_path, tiny_bert, data, format="label_pairs"), "--dry-run")
    assert result.code == 2 and "data.negative_label: no row has a label other than 1" in result.err
    assert result.err.count("\n") == 1


def test_identical_pairs_are_counted_and_dropped(tmp_path, cli, tiny_bert):
    data = write(tmp_path / "p.jsonl", '{"chosen": "a", "rejected": "b"}\n{"chosen": "c", "rejected": "c"}\n'
                                       '{"chosen": "d", "rejected": "e"}\n')
    result = cli("reward", reward_recipe(tmp_path, tiny_bert, data), "--dry-run")
    assert result.code == 0, result.err
    assert "dropped 1 pair(s) whose chosen and rejected are identical (line 2)" in result.err


def test_few_step_encoder_reward_model_then_predict_and_eval(tmp_path, cli, tiny_bert):
    out = tmp_path / "run"
    recipe = reward_recipe(tmp_path, tiny_bert, SHARED / "sst2" / "train.tsv", eval=SHARED / "sst2" / "dev.tsv",
                           format="label_pairs", text_column="sentence", train_limit=32, eval_limit=24)
    result = cli("reward", recipe, "-o", out)
    assert result.code == 0, result.err
    assert result.last_line == str(out)
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["pairs"] == 24 and 0 <= metrics["accuracy"] <= 1 and math.isfinite(metrics["margin"])
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert json.loads((out / "run.json").read_text())["method"] == "reward"
    texts = write(tmp_path / "t.tsv", "sentence\tlabel\na wonderful film\t1\nawful\t0\n")
    predicted = cli("predict", out, "--data", texts)
    assert predicted.code == 0, predicted.err
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(set(r) == {"reward"} for r in rows)
    again = cli("eval", out, "--data", SHARED / "sst2" / "dev.tsv")
    assert again.code == 0, again.err
    assert {"accuracy", "margin"} <= set(json.loads(again.last_line))


def test_few_step_causal_lm_reward_adapter_on_hh_then_merge(tmp_path, cli, tiny_gpt):
    import torch
    from transformers import AutoModelForSequenceClassification

    from tunekit.models import load_run_model
    from tunekit.rl.reward_scores import score_texts

    out = tmp_path / "run"
    recipe = reward_recipe(tmp_path, tiny_gpt, HH, eval_size=354, train_limit=16, eval_limit=8)
    result = cli("reward", recipe, "--set", "peft.method=lora", "--set", "peft.r=4", "-o", out)
    assert result.code == 0, result.err
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "eval.json").read_text())["pairs"] == 8
    merged = cli("merge", out)
    assert merged.code == 0, merged.err
    texts = ["<|user|>\nHello<|end|>\n<|assistant|>\nHi there.<|end|>", "Just text"]
    adapter_model, tokenizer = load_run_model(out, AutoModelForSequenceClassification)
    plain = AutoModelForSequenceClassification.from_pretrained(out / "merged")
    expected, got = score_texts(adapter_model, tokenizer, texts), score_texts(plain, tokenizer, texts)
    assert torch.allclose(torch.tensor(expected), torch.tensor(got), atol=1e-4)
