"""tunekit.arithmetic: the default (easy) files are byte for byte those of before `--difficulty`
existed; hard problems are worked correctly, step by step, and never leak a held-out sum."""

from __future__ import annotations

import hashlib
import json
import os
import re

from tunekit import arithmetic

# sha256 of `python -m tunekit.arithmetic FOLDER` (seed 0, default sizes) as written before the
# hard difficulty was added: the easy data, and every result measured on it, must not move.
EASY_SHA256 = {
    "heldout.jsonl": "a2bdb48cfe087cc1f9d0aa8f98d45c66b8aaeb9e6410166267d30dd9f56efd5b",
    "train.jsonl": "7ec963eb79ddb4c59ed4f2cc34037a30b46114dc267d55d7d105d6b258f8e27a",
    "pretrain.jsonl": "8ddc4124bf7377ac9af412718e3a8c5eab25fa637977583a0420a4431ffddef6",
}
STEP = re.compile(r"(\d+) ([+-]) (\d+) = (\d+)\.")


def test_default_files_are_unchanged(tmp_path):
    arithmetic.main([str(tmp_path)])
    assert {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in tmp_path.iterdir()} == EASY_SHA256


def test_writing_the_same_problems_again_leaves_the_files_untouched(tmp_path):
    sizes = ["--train", "20", "--heldout", "10", "--pretrain", "5", "--equations", "5"]
    arithmetic.main([str(tmp_path), *sizes])
    for path in tmp_path.iterdir():
        os.utime(path, (1_000_000, 1_000_000))
    arithmetic.main([str(tmp_path), *sizes])
    assert {path.stat().st_mtime for path in tmp_path.iterdir()} == {1_000_000}  # make sees nothing new
    arithmetic.main([str(tmp_path), *sizes, "--seed", "1"])
    assert all(path.stat().st_mtime > 1_000_000 for path in tmp_path.iterdir())


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_hard_problems_are_worked_step_by_step_and_held_out(tmp_path):
    arithmetic.main([str(tmp_path), "--difficulty", "hard", "--train", "600", "--heldout", "300",
                     "--pretrain", "50", "--equations", "50"])
    train, heldout = read(tmp_path / "train.jsonl"), read(tmp_path / "heldout.jsonl")
    assert len(train) == 600 and len(heldout) == 300
    two_step = 0
    for row in train + heldout:
        assert set(row) == {"prompt", "completion", "answer"}
        assert row["completion"].endswith(f"The answer is {row['answer']}.")
        steps = STEP.findall(row["completion"])
        assert 1 <= len(steps) <= 2
        for i, (x, op, y, result) in enumerate(steps):
            assert int(result) == (int(x) + int(y) if op == "+" else int(x) - int(y)) >= 0
            assert x in row["prompt"] or (i > 0 and x == steps[i - 1][3])  # step 2 continues from step 1
            assert y in row["prompt"]
        assert steps[-1][3] == row["answer"]
        two_step += len(steps) == 2
        assert 100 <= int(steps[0][0]) <= 999  # a three-digit first operand
    assert two_step > len(train + heldout) // 2  # mostly two-step problems

    def key(row):
        return tuple(token for step in STEP.findall(row["completion"]) for token in step[1:3]) + (
            STEP.findall(row["completion"])[0][0],)

    assert not {key(r) for r in heldout} & {key(r) for r in train}
    assert len({key(r) for r in heldout}) == len(heldout)
    equations = [json.loads(line)["text"] for line in (tmp_path / "pretrain.jsonl").read_text().splitlines()]
    assert len(equations) == 100 and not any("The answer is" in t and "?" not in t for t in equations)


def test_the_arithmetic_table_comes_from_the_files_the_chain_wrote(tmp_path):
    from tunekit import arith_table

    (tmp_path / "smol-eval").mkdir()
    (tmp_path / "smol-time").mkdir()
    for name, value in (("base", 0.05), ("grpo-seed1", 0.61), ("grpo-seed2", 0.65), ("sft", 0.3)):
        metrics = {"arith-hard-exact-sampled": {"exact_answer": value, "exact_answer_se": 0.02, "examples": 500}}
        (tmp_path / "smol-eval" / f"{name}.json").write_text(json.dumps({"some/model": metrics}))
    for report, (cpu_s, kb) in {"grpo-seed1.txt": (500.0, 3500000), "eval-base.txt": (60.0, 1900000)}.items():
        (tmp_path / "smol-time" / report).write_text(f"\tUser time (seconds): {cpu_s - 10}\n\tSystem time (seconds): 10.0\n"
                                                     f"\tMaximum resident set size (kbytes): {kb}\n")
    for folder, version in (("lora-smollm2-arith", "0.1.0 (abc1234)"), ("lora-smollm2-arith-grpo-seed1", "0.1.0 (def5678)")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "run.json").write_text(json.dumps({"tunekit": version}))
    lines = arith_table.real_table(tmp_path)
    assert lines[0].endswith("runs on tunekit 0.1.0 (abc1234), 0.1.0 (def5678):")  # the seed runs' commit too
    row = next(line for line in lines if line.startswith("| grpo-seed1 |"))
    assert "0.610 +- 0.020" in row and row.endswith("| 8.3 | 3.50 | - | - |")  # trained, not evaluated, here
    assert next(line for line in lines if line.startswith("| base |")).endswith("| - | - | 1.0 | 1.90 |")
    rows = [line.split(" |")[0] for line in lines if line.startswith("| ")][1:]
    assert rows == ["| base", "| sft", "| grpo-seed1", "| grpo-seed2"]  # the chain's order, not the names'
    assert any("mean 0.630" in line and "0.610-0.650" in line for line in lines)
    assert "0.050 +- 0.020" in next(line for line in lines if line.startswith("| base |"))


def test_the_tiny_table_shows_each_model_evaluated_and_each_rl_run_before_and_after(tmp_path):
    from tunekit import arith_table

    (tmp_path / "tiny-eval").mkdir()
    for name, greedy in (("sft", 0.974), ("ppo", 0.958)):
        metrics = {"arith-exact": {"exact_answer": greedy, "exact_answer_se": 0.007, "examples": 500}}
        (tmp_path / "tiny-eval" / f"{name}.json").write_text(json.dumps({f"runs/{name}": metrics}))
    run = tmp_path / "rlhf-tiny-gpt-arith-ppo"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps({"exact_answer_before": 0.96, "exact_answer_after": 0.93}))
    (run / "run.json").write_text(json.dumps({"tunekit": "0.1.0 (abc1234)"}))
    lines = arith_table.tiny_table(tmp_path)
    assert lines[2] == "| model | arith-exact | step CPU min | step peak GB | eval CPU min | eval peak GB |"  # only the tasks the files hold
    assert "0.958 +- 0.007" in next(line for line in lines if line.startswith("| ppo |"))
    assert "| rlhf-tiny-gpt-arith-ppo | 0.960 -> 0.930 | - | 0.1.0 (abc1234) |" in lines


def test_worked_steps_gives_credit_for_each_reference_step_in_its_place():
    row = {"prompt": "...", "completion": "818 - 34 = 784. 784 + 80 = 864. The answer is 864.", "answer": "864"}
    responses = [
        "818 - 34 = 784. 784 + 80 = 864. The answer is 864.",  # both steps
        "818 - 34 = 784. 784 + 80 = 874. The answer is 874.",  # the first step only
        "818 - 34 = 802. 802 + 80 = 882. The answer is 882.",  # a wrong first step: the second is off the reference
        "1 + 1 = 2. 2 + 2 = 4. The answer is 864.",             # true equations that are not the problem's
        "The answer is 864.",
    ]
    assert arithmetic.worked_steps(["..."] * 5, responses, [row] * 5) == [1.0, 0.5, 0.0, 0.0, 0.0]


def test_worked_steps_is_a_reward_function_a_recipe_can_name(tmp_path):
    from tunekit.rl.rewards import RewardFunction, RewardFunctionSection

    reward = RewardFunction(RewardFunctionSection(name="tunekit.arithmetic:worked_steps", weight=0.5))
    row = {"completion": "63 - 5 = 58. The answer is 58.", "answer": "58"}
    assert reward(["q", "q"], ["63 - 5 = 58. The answer is 58.", "63 - 5 = 57."], [row, row]) == [1.0, 0.0]
