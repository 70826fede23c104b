"""SFT: the loss is on the response (and its end-of-turn token) only, for every data format;
packing keeps sequences apart; bad data is one line and exit code 2; a few-step run works end to end."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED, write

from tunekit.data.masking import to_messages, tokenize_conversation
from tunekit.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(tiny_gpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_gpt)


def trained_text(tokenizer, item):
    return tokenizer.decode([t for t, label in zip(item.input_ids, item.labels) if label != -100])


def masked_prefix(item):
    first = next(i for i, label in enumerate(item.labels) if label != -100)
    return item.input_ids[:first], item.labels[first:]


@pytest.mark.parametrize(
    ("row", "kind", "response"),
    [
        ({"prompt": "Who art thou?", "completion": "A poor player."}, "prompt_completion", "A poor player."),
        ({"instruction": "Name a king.", "input": "of England", "output": "Richard the Third."}, "alpaca", "Richard the Third."),
        ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Speak."},
                       {"role": "assistant", "content": "I will not."}]}, "messages", "I will not."),
    ],
)
def test_prompt_is_masked_response_and_eos_are_trained(tokenizer, row, kind, response):
    messages = to_messages(row, kind, "row 1")
    item = tokenize_conversation(tokenizer, messages)
    prompt_ids, rest = masked_prefix(item)
    # every prompt token is -100, and the prompt is exactly what the template renders before the answer
    assert tokenizer.decode(prompt_ids) == tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True)
    # every response token and the end-of-turn token carry their own id
    trained = [(t, label) for t, label in zip(item.input_ids, item.labels) if label != -100]
    assert all(t == label for t, label in trained)
    assert trained[-1][0] == tokenizer.eos_token_id
    assert trained_text(tokenizer, item) == response + tokenizer.eos_token
    assert all(label == -100 for label in item.labels[len(prompt_ids) + len(trained):])


def test_every_assistant_turn_is_trained(tokenizer):
    messages = [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "Two."},
                {"role": "user", "content": "Three?"}, {"role": "assistant", "content": "Four."}]
    item = tokenize_conversation(tokenizer, messages)
    assert trained_text(tokenizer, item) == f"Two.{tokenizer.eos_token}Four.{tokenizer.eos_token}"


@pytest.mark.parametrize(
    ("row", "kind", "expected"),
    [
        ({"messages": []}, "messages", "non-empty list"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "messages", "role 'bot'; use one of system, user, assistant, tool"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant message"),
        ({"instruction": "x", "output": ""}, "alpaca", "empty 'output'"),
        ({"prompt": "x"}, "prompt_completion", "'completion' is missing"),
    ],
)
def test_bad_conversations(row, kind, expected):
    with pytest.raises(UserError, match=expected.replace("(", r"\(")):
        to_messages(row, kind, "f.jsonl: line 1")


def sft_recipe(tmp_path, model, train, **extra):
    body = "".join(f"  {k}: {v}\n" for k, v in extra.items())
    return write(tmp_path / "sft.yaml", f"""\
method: sft
model:
  name: {model}
data:
  train: {train}
  eval_size: 8
train:
  max_steps: 6
  per_device_train_batch_size: 4
  learning_rate: 3.0e-3
  logging_steps: 1
  save_strategy: "no"
{body}""")


def test_bad_sft_data_is_exit_2(tmp_path, cli, tiny_gpt):
    cases = {
        "noresp.jsonl": ('{"instruction": "a", "answer": "b"}\n', "cannot tell the data format"),
        "empty.jsonl": ('{"messages": []}\n', "line 1: 'messages' must be a non-empty list"),
        "role.jsonl": ('{"messages": [{"role": "narrator", "content": "x"}]}\n', "line 1: message 1 has role 'narrator'"),
    }
    for name, (content, expected) in cases.items():
        data = write(tmp_path / name, content)
        result = cli("sft", sft_recipe(tmp_path, tiny_gpt, data), "--dry-run")
        assert result.code == 2, name
        assert expected in result.err and result.err.count("\n") == 1, result.err
    text = write(tmp_path / "t.jsonl", '{"text": "plain"}\n' * 10)
    result = cli("sft", sft_recipe(tmp_path, tiny_gpt, text), "--dry-run")
    assert result.code == 2 and "sft.completion_only_loss: text data has no prompt/response" in result.err


def test_preview_marks_trained_tokens_and_fails_when_none(tmp_path, cli, tiny_gpt):
    recipe = sft_recipe(tmp_path, tiny_gpt, SHARED / "alpaca" / "alpaca_data_1k.json")
    result = cli("preview", recipe, "-n", "2")
    assert result.code == 0, result.err
    assert result.out.count("[[") >= 2 and "<|end|>]]" in result.out
    assert "1000 examples" not in result.out and "992 examples:" in result.out  # 8 held out
    short = cli("preview", recipe, "--set", "train.max_length=8")
    assert short.code == 2 and "no token carries loss" in short.err


def test_packed_rows_do_not_see_each_other(tiny_gpt):
    """Packing is exact only if attention stays inside each sequence: two rows of two sequences
    each (one row padded) give the logits of the four sequences run alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunekit.methods.sft import PackedRows

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt).eval()
    a, b, c, d = list(range(5, 17)), list(range(40, 47)), list(range(60, 65)), list(range(80, 90))
    rows = [{"input_ids": a + b, "labels": a + b, "seq_lengths": [len(a), len(b)]},
            {"input_ids": c + d, "labels": c + d, "seq_lengths": [len(c), len(d)]}]
    batch = PackedRows(pad_token_id=1)(rows)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (2, len(a) + len(b))
    assert batch["position_ids"][1].tolist() == [*range(len(c)), *range(len(d)), *range(4)]  # padding: its own
    assert batch["labels"][0, len(a)] == -100 and batch["labels"][1, len(c) + len(d):].eq(-100).all()
    with torch.no_grad():
        joint = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for row, start, seq in ((0, 0, a), (0, len(a), b), (1, 0, c), (1, len(c), d)):
            alone = model(input_ids=torch.tensor([seq])).logits[0]
            assert torch.allclose(joint[row, start : start + len(seq)], alone, atol=1e-5)


@pytest.mark.parametrize("packing", [False, True])
def test_few_step_sft_then_generate(tmp_path, cli, tiny_gpt, packing):
    out = tmp_path / "run"
    recipe = sft_recipe(tmp_path, tiny_gpt, SHARED / "alpaca" / "alpaca_data_1k.json", packing=str(packing).lower())
    result = cli("sft", recipe, "--set", "data.train_limit=64", "-o", out)
    assert result.code == 0, result.err
    assert result.last_line == str(out)
    metrics = json.loads((out / "eval.json").read_text())
    assert set(metrics) == {"loss", "perplexity", "loss_before", "perplexity_before"}
    assert metrics["loss"] < metrics["loss_before"]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 6 and all(loss == loss for loss in losses)
    generated = cli("generate", out, "--prompt", "Name a colour.", "--max-new-tokens", "5", "--temperature", "0")
    assert generated.code == 0, generated.err
    if packing:
        return
    shown = cli("preview", out, "-n", "1")  # a run folder: what it trained on
    assert shown.code == 0 and "trained tokens" in shown.out, shown.err
    batch = cli("generate", out, "--heldout", "3", "--max-new-tokens", "4", "--out", tmp_path / "g.jsonl")
    assert batch.code == 0, batch.err
    rows = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all({"prompt", "response", "stopped", "new_tokens"} <= set(r) for r in rows)
    assert all(r["new_tokens"] <= 4 for r in rows)
    assert "responses ended by themselves" in batch.err


def test_chat_repl_answers_and_exits(tmp_path, cli, tiny_gpt, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n/reset\nAgain\n/exit\n"))
    result = cli("chat", tiny_gpt)
    assert result.code == 0, result.err
    assert result.out.count("model>") == 2


def test_hh_rlhf_dialogues_are_multi_turn_conversations(tiny_gpt):
    from transformers import AutoTokenizer

    from tunekit.data.masking import detect_format
    from tunekit.data.tables import Table

    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: Blue."
    table = Table("hh.jsonl", [{"chosen": text, "rejected": text.replace("Blue", "No")}], [1])
    assert detect_format(table, None) == "hh"
    messages = to_messages(table.rows[0], "hh", "hh.jsonl: line 1")
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[-1]["content"] == "Blue."
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt)
    item = tokenize_conversation(tokenizer, messages, 256)
    trained = tokenizer.decode([t for t, label in zip(item.input_ids, item.labels) if label != -100])
    assert trained.replace(" ", "") == "Hello!<|end|>Blue.<|end|>"  # both assistant turns, no human one
    with pytest.raises(UserError, match="not an HH-RLHF dialogue"):
        to_messages({"chosen": "just text"}, "hh", "hh.jsonl: line 2")


def test_training_rows_identical_to_held_out_ones_are_dropped(tmp_path, capsys):
    from tunekit.data.tables import read_table
    from tunekit.methods.sft import Split, checked

    rows = [{"instruction": f"say {i}", "input": "", "output": f"{i}"} for i in range(6)]
    train = write(tmp_path / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    held = write(tmp_path / "held.jsonl", "".join(json.dumps(r) + "\n" for r in (rows[1], rows[4])))
    kept = checked(Split("alpaca", read_table(str(train), "data.train")), Split("alpaca", read_table(str(held), "data.eval")))
    assert len(kept) == 4 and "2 training rows are identical to held-out rows" in capsys.readouterr().err
