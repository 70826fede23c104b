"""`tunekit eval --task` with the exact_answer scorer: the reward function's extraction, greedy or
sampled generation (batched = one at a time), the standard error over prompts, and bad values as
one line with exit 2."""

from __future__ import annotations

import json
import math
import random

import pytest
from conftest import write

from tunekit.lmeval import Task, build_prompt, generate_raw, generation_task, score_answers
from tunekit.runs.metrics import mean_and_se

ROWS = [{"prompt": f"Ann has {a} apples and gets {b} more. How many apples does Ann have?", "answer": str(a + b)}
        for a, b in [(12, 3), (40, 7), (7, 7), (81, 9), (33, 1), (5, 60), (19, 2)]]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_gpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_gpt).eval(), AutoTokenizer.from_pretrained(tiny_gpt)


def test_exact_answer_is_the_rewards_extraction():
    task = Task(kind="generate", data="x", scorer="exact_answer", marker="The answer is")
    rows = [{"answer": "28"}, {"answer": "1531"}, {"answer": "7"}, {"answer": "7"}]
    answers = ["20 + 8 = 28. The answer is 28.", "The answer is 1,531", "The answer is 8. No: The answer is 7.", "7"]
    assert score_answers(task, rows, answers) == [1.0, 1.0, 1.0, 0.0]  # the last marker; none: no answer
    last_number = Task(kind="generate", data="x", scorer="exact_answer")
    assert score_answers(last_number, rows, ["It is 28, I think", "1531.0", "7 or 9", "7"]) == [1.0, 1.0, 0.0, 1.0]


def test_standard_error():
    assert mean_and_se([1.0, 0.0, 1.0, 1.0]) == (0.75, pytest.approx(math.sqrt(0.75 * 0.25 / 4)))
    assert mean_and_se([0.5, 0.5]) == (0.5, 0.0)  # per-prompt means that agree: no spread over prompts


def test_k_samples_are_averaged_per_prompt_and_the_se_is_over_prompts(monkeypatch):
    from tunekit import lmeval

    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}, {"prompt": "c", "answer": "3"}]
    said = {"a": ["1", "1", "0"], "b": ["0", "2", "0"], "c": ["0", "0", "0"]}
    monkeypatch.setattr(lmeval, "generate_raw", lambda model, tokenizer, prompts, task: [
        said[p].pop(0) for p in prompts])
    task = Task(kind="generate", data="x", template="{prompt}", scorer="exact_answer", temperature=1.0, samples=3)
    metrics = generation_task(None, None, task, rows, rows, random.Random(0))
    per_prompt = [2 / 3, 1 / 3, 0.0]
    p = sum(per_prompt) / 3
    assert metrics["exact_answer"] == pytest.approx(p) and metrics["examples"] == 3 and metrics["samples"] == 3
    assert metrics["exact_answer_se"] == pytest.approx(math.sqrt(sum((m - p) ** 2 for m in per_prompt) / 3 / 3))


def test_a_chat_answer_keeps_its_paragraphs_a_plain_one_stops_at_a_blank_line(monkeypatch):
    from tunekit import generation

    monkeypatch.setattr(generation, "continue_texts", lambda *args: [{"response": "20 + 8 = 28.\n\nThe answer is 28."}])
    tokenizer = type("Tokenizer", (), {"pad_token": "<pad>"})()
    chat = Task(kind="generate", data="x", chat=True, scorer="exact_answer")
    assert generate_raw(None, tokenizer, ["q"], chat) == ["20 + 8 = 28.\n\nThe answer is 28."]
    assert generate_raw(None, tokenizer, ["q"], Task(kind="generate", data="x")) == ["20 + 8 = 28."]


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("own_pad", [True, False])
def test_batched_greedy_answers_equal_one_at_a_time(model_and_tokenizer, chat, own_pad):
    model, tokenizer = model_and_tokenizer
    if not own_pad:  # a tokenizer without a pad token: EOS pads (masked out)
        tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
        tokenizer.pad_token = None
    task = Task(kind="generate", data="x", template="{prompt}", chat=chat, scorer="exact_answer", max_new_tokens=12)
    prompts = [build_prompt(task, tokenizer, row, [], str) for row in ROWS]
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 1  # padding happens
    batched = generate_raw(model, tokenizer, prompts, task)
    one_by_one = [generate_raw(model, tokenizer, [p], task)[0] for p in prompts]
    assert batched == one_by_one and any(batched)


def task_file(tmp_path, rows, **keys):
    data = write(tmp_path / "rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    task = {"kind": "generate", "data": str(data), "template": "{prompt}", "chat": True, "scorer": "exact_answer",
            "max_new_tokens": 6, **keys}
    return write(tmp_path / "t.yaml", json.dumps(task) + "\n")  # JSON is YAML


def test_sampled_eval_of_a_model_folder(tmp_path, cli, tiny_gpt):
    task = task_file(tmp_path, ROWS, temperature=0.7, samples=3, seed=1, marker="The answer is")
    first = cli("eval", tiny_gpt, "--task", task)
    assert first.code == 0, first.err
    metrics = json.loads(first.last_line)[str(tiny_gpt)]["t"]
    assert metrics["examples"] == len(ROWS) and metrics["samples"] == 3
    assert 0 <= metrics["exact_answer"] <= 1 and metrics["exact_answer_se"] >= 0
    assert "t exact_answer_se" in first.err
    assert json.loads(cli("eval", tiny_gpt, "--task", task).last_line)[str(tiny_gpt)]["t"] == metrics  # same seed


@pytest.mark.parametrize(("keys", "expected"), [
    ({"temperature": -0.5}, "t.yaml: temperature: Input should be greater than or equal to 0"),
    ({"samples": 0}, "t.yaml: samples: Input should be greater than or equal to 1"),
    ({"samples": 4}, "samples: 4 greedy answers would all be the same; set temperature above 0"),
    ({"top_p": 1.5}, "t.yaml: top_p: Input should be less than or equal to 1"),
    ({"answer_column": "result"}, "t.yaml: answer_column: "),
    ({"scorer": "f1", "marker": "Answer:"}, "marker and answer_column are arguments of scorer exact_answer"),
])
def test_bad_values_are_one_line_exit_2(tmp_path, cli, keys, expected):
    result = cli("eval", "no-such-model-is-loaded", "--task", task_file(tmp_path, ROWS, **keys))
    assert result.code == 2 and expected in result.err and result.err.count("\n") == 1, result.err
