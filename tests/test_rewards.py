"""Verifiable rewards (rlhf.reward_fn): the built-ins on hand-made strings, loading a user's function,
one-line errors at validate time and at run time (with the last checkpoint kept), reward functions
alone for PPO and GRPO with their components logged, and the seeded arithmetic problems."""

from __future__ import annotations

import json
import math

import pytest
from conftest import write

from tunekit import arithmetic
from tunekit.errors import UserError
from tunekit.rl.rewards import (
    RewardFunction,
    RewardFunctionError,
    RewardFunctionSection,
    answer_of,
    exact_answer,
    load_callable,
    regex,
)

# ---------------------------------------------------------------------------------------------
# The built-ins


def test_answer_of_takes_the_last_number_or_the_text_after_the_last_marker():
    assert answer_of("347 + 128 = 475. The answer is 475.", None) == "475"
    assert answer_of("I think -12.5, no, 1,531", None) == "1,531"
    assert answer_of("no digits here", None) is None
    assert answer_of("The answer is 3. The answer is  Paris.\nmore", "The answer is") == "Paris"
    assert answer_of("475", "The answer is") is None


def test_exact_answer_on_hand_made_responses():
    rows = [{"answer": "475"}, {"answer": "475"}, {"answer": "1531"}, {"answer": "8"}, {"answer": "Paris"}]
    responses = ["347 + 128 = 475. The answer is 475.", "The answer is 474. Or 475",
                 "998 + 533 = 1,531", "8 eggs, wait: 9", "the answer is paris"]
    assert exact_answer(responses, rows, "answer", None) == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert exact_answer(responses, rows, "answer", "The answer is") == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert exact_answer(responses[-1:], rows[-1:], "answer", "answer is", ignore_case=True) == [1.0]
    assert exact_answer(["475"], [{"other": "475"}], "answer", None) == [0.0]  # no such column: never right


def test_regex_on_hand_made_responses():
    assert regex(["The answer is 12.", "answer: 12", "THE ANSWER IS 3."], r"The answer is \d+\.$") == [1.0, 0.0, 0.0]
    assert regex(["THE ANSWER IS 3."], r"the answer is \d+", ignore_case=True) == [1.0]


def test_reward_fn_sections_reject_arguments_of_another_function():
    from pydantic import ValidationError

    for bad in ({"name": "regex"}, {"name": "regex", "pattern": "("}, {"name": "exact_answer", "pattern": "x"},
                {"name": "regex", "pattern": "x", "marker": "y"}, {"name": "scorer"}):
        with pytest.raises(ValidationError):
            RewardFunctionSection(**bad)


# ---------------------------------------------------------------------------------------------
# A user's function


def test_load_callable_from_a_module_and_from_a_file(tmp_path, monkeypatch):
    write(tmp_path / "my_rewards.py", "def length(prompts, responses, rows):\n    return [len(r) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = load_callable("my_rewards:length", "rlhf.reward_fn")
    by_file = load_callable(f"{tmp_path}/my_rewards.py:length", "rlhf.reward_fn")
    assert by_module(["p"], ["abc"], [{}]) == by_file(["p"], ["abc"], [{}]) == [3]
    for spec, expected in (("my_rewards:missing", "missing not found in my_rewards"),
                           ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
                           (f"{tmp_path}/nope.py:f", "no file"), ("my_rewards:", "expected module:function")):
        with pytest.raises(UserError, match=expected):
            load_callable(spec, "rlhf.reward_fn")


@pytest.mark.parametrize(("body", "expected"), [
    ("raise ValueError('boom')", "raised ValueError: boom"),
    ("return [float('nan')] * len(responses)", "returned nan for response 0"),
    ("return [1.0]", "returned 1 values for 2 responses"),
    ("return ['high', 'low']", "returned 'high' (str) for response 0; expected a float"),
])
def test_a_bad_reward_function_is_one_line(tmp_path, body, expected):
    write(tmp_path / "bad.py", f"def score(prompts, responses, rows):\n    {body}\n")
    function = RewardFunction(RewardFunctionSection(name=f"{tmp_path}/bad.py:score"))
    with pytest.raises(RewardFunctionError) as err:
        function(["p", "q"], ["a", "b"], [{}, {}])
    assert expected in str(err.value) and "bad.py:score" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# Runs: recipes with reward functions


def arith_recipe(tmp_path, policy, algo="ppo", reward_fn="[{name: exact_answer}]", **sections):
    arithmetic.write(tmp_path / "arith", seed=1, train=64, heldout=8, pretrain=0, equations=0)
    extra = "".join(f"{name}:\n" + "".join(f"  {k}: {v}\n" for k, v in keys.items()) for name, keys in sections.items())
    return write(tmp_path / "rlhf.yaml", f"""\
method: rlhf
model:
  name: {policy}
data:
  train: {tmp_path}/arith/train.jsonl
  eval: {tmp_path}/arith/heldout.jsonl
rlhf:
  algo: {algo}
  num_generations: 2
  reward_fn: {reward_fn}
generation:
  max_new_tokens: 6
train:
  learning_rate: 1.0e-3
  logging_steps: 1
{extra}""")


def test_wrong_reward_fn_names_are_exit_2_at_validate(tmp_path, cli, tiny_gpt):
    recipe = arith_recipe(tmp_path, tiny_gpt)
    assert cli("validate", recipe).code == 0
    write(tmp_path / "mine.py", "def score(prompts, responses, rows):\n    return [0.0] * len(responses)\n")
    assert cli("validate", recipe, "--set", f"rlhf.reward_fn={tmp_path}/mine.py:score").code == 0
    cases = {
        f"rlhf.reward_fn={tmp_path}/mine.py:scor": "scor not found in",
        "rlhf.reward_fn=no_such_module_xyz:score": "cannot import no_such_module_xyz",
        "rlhf.reward_fn=exact_anwser": "neither a built-in",
        "rlhf.reward_fn=[{name: exact_answer, column: solution}]": "has no column 'solution'",
        "rlhf.reward_fn=[]": "needs a reward",
    }
    for override, expected in cases.items():
        result = cli("validate", recipe, "--set", override)
        assert result.code == 2 and expected in result.err and result.err.count("\n") == 1, (override, result.err)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_reward_fn_alone_logs_each_component(tmp_path, cli, tiny_gpt, algo):
    """No reward model: exact_answer + regex, weighted; each logged as reward/<name>, and eval.json
    reports each before and after on the held-out prompts."""
    out = tmp_path / "run"
    functions = "[{name: exact_answer, weight: 2.0}, {name: regex, pattern: '[0-9]', weight: 0.5}]"
    recipe = arith_recipe(tmp_path, tiny_gpt, algo, functions,
                          ppo={"steps": 2, "rollout_batch_size": 4, "minibatch_size": 2, "epochs": 1})
    result = cli("rlhf", recipe, "-o", out)
    assert result.code == 0, result.err
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        parts = record["reward/exact_answer"], record["reward/regex"]
        assert all(0.0 <= p <= 1.0 for p in parts)
        assert record["reward"] == pytest.approx(2.0 * parts[0] + 0.5 * parts[1], abs=1e-5)
    metrics = json.loads((out / "eval.json").read_text())
    assert {"exact_answer_before", "exact_answer_after", "regex_before", "regex_after"} <= set(metrics)
    assert metrics["reward_before"] == pytest.approx(2.0 * metrics["exact_answer_before"] + 0.5 * metrics["regex_before"])
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("failure", ["raise", "nan", "count"])
def test_a_failing_reward_fn_stops_the_run_keeping_the_last_checkpoint(tmp_path, cli, tiny_gpt, failure):
    """The function works for the held-out evaluation and step 1 (checkpoint-1 is saved), then fails
    in step 2: one line, exit 1, run.json failed with the reason, checkpoint-1 complete and intact."""
    bad = {"raise": "raise KeyError('answer')", "nan": "values[0] = float('nan')", "count": "values = values[1:]"}
    write(tmp_path / "flaky.py", f"""\
CALLS = []
def score(prompts, responses, rows):
    CALLS.append(1)
    values = [float(len(r) > 2) for r in responses]
    if len(CALLS) > 2:
        {bad[failure]}
    return values
""")
    out = tmp_path / "run"
    recipe = arith_recipe(tmp_path, tiny_gpt, "ppo", f"{tmp_path}/flaky.py:score",
                          ppo={"steps": 3, "rollout_batch_size": 4, "minibatch_size": 2, "epochs": 1})
    result = cli("rlhf", recipe, "-o", out, "--set", "train.save_steps=1")
    assert result.code == 1, result.err
    line = result.err.strip().splitlines()[-1]
    assert line.startswith("tunekit: training failed: rlhf.reward_fn") and "flaky.py:score" in line
    assert "Traceback" not in result.err
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and "flaky.py:score" in info["reason"]
    assert (out / "checkpoint-1" / "tunekit-checkpoint.json").is_file()
    assert not list(out.glob("checkpoint-2*")) and not list(out.glob(".checkpoint-*"))
    resumed = cli("rlhf", recipe, "-o", out, "--resume", "--set", "train.save_steps=1")  # from checkpoint-1
    assert resumed.code == 1 and "flaky.py:score" in resumed.err  # the file is loaded afresh: fails again later


def test_a_failing_reward_fn_stops_grpo_in_one_line(tmp_path, cli, tiny_gpt):
    """TRL's trainer calls the same checked function: the held-out evaluation passes, training's
    first call raises."""
    write(tmp_path / "flaky.py", """\
CALLS = []
def score(prompts, responses, rows):
    CALLS.append(1)
    if len(CALLS) > 1:
        raise RuntimeError("grader offline\\nsecond line")
    return [0.0] * len(responses)
""")
    out = tmp_path / "run"
    recipe = arith_recipe(tmp_path, tiny_gpt, "grpo", f"{tmp_path}/flaky.py:score",
                          ppo={"steps": 2, "rollout_batch_size": 4, "minibatch_size": 2, "epochs": 1})
    result = cli("rlhf", recipe, "-o", out)
    assert result.code == 1, result.err
    assert result.err.strip().splitlines()[-1].endswith("flaky.py:score raised RuntimeError: grader offline")
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


# ---------------------------------------------------------------------------------------------
# The arithmetic problems


def test_arithmetic_problems_are_seeded_and_held_out_sums_never_trained(tmp_path):
    first = arithmetic.make(seed=3, train=300, heldout=100, pretrain=300, equations=300)
    again = arithmetic.make(seed=3, train=300, heldout=100, pretrain=300, equations=300)
    other = arithmetic.make(seed=4, train=300, heldout=100, pretrain=300, equations=300)
    assert first == again and first != other
    held = {p.key for p in first["heldout"]}
    assert len(held) == 100
    assert not held & {p.key for p in first["train"] + first["pretrain"] + first["equations"]}
    for problem in first["train"]:
        op, a, b = problem.key
        assert int(problem.answer) == (a + b if op == "+" else a - b) >= 0
        assert exact_answer([problem.worked], [problem.row()], "answer", arithmetic.MARKER) == [1.0]
    paths = arithmetic.write(tmp_path, seed=3, train=300, heldout=100, pretrain=300, equations=300)
    rows = [json.loads(line) for line in paths[0].read_text().splitlines()]
    assert rows == [p.row() for p in first["heldout"]]
    texts = [json.loads(line)["text"] for line in paths[2].read_text().splitlines()]
    assert len(texts) == 600 and sum(t.endswith("?") or "The answer is" in t for t in texts) == 300
