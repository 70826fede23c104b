"""rlhf.judge (tunekit.rl.judge): evaluation points in metrics.jsonl, the win rate in eval.json, the
best evaluation point kept, the judge refused before any policy loads, and the proxy's and the
judge's disjoint halves of SST-2."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import ROOT, SHARED, write
from test_ppo import read_metrics, reward_run, rlhf_recipe  # noqa: F401 - reward_run is a fixture

from tunekit.rl.judge import JudgeTracker, judge_metrics, positive_class, trainable_state
from tunekit.rl.rollout import Evaluation

PPO = {"steps": 3, "rollout_batch_size": 4, "minibatch_size": 4, "epochs": 1, "eval_steps": 1}


def evaluation(judge: list[float]) -> Evaluation:
    return Evaluation([f"p{i}" for i in range(len(judge))], ["r"] * len(judge), [0.0] * len(judge), [1.0] * len(judge),
                      judge=judge)


def test_win_rate_and_its_standard_error_by_hand():
    metrics = judge_metrics(evaluation([0.1, 0.5, 0.3]), evaluation([0.2, 0.5, 0.1]), None)
    # per prompt: a win, a tie (half), a loss -> 0.5; sample std of (1, 0.5, 0) is 0.5
    assert metrics["judge_win_rate"] == pytest.approx(0.5)
    assert metrics["judge_win_rate_se"] == pytest.approx(0.5 / math.sqrt(3))
    assert metrics["judge_before"] == pytest.approx(0.3) and metrics["judge_prompts"] == 3
    assert metrics["samples"][0] == {"prompt": "p0", "start": "r", "final": "r", "judge_start": 0.1, "judge_final": 0.2,
                                     "proxy_start": 0.0, "proxy_final": 0.0}


def test_positive_class_of_a_classifier():
    two = {"num_labels": 2, "id2label": {"0": "negative", "1": "positive"}}
    assert positive_class(two, None, "k") == 1
    assert positive_class(two, "negative", "k") == 0
    assert positive_class({"num_labels": 1}, None, "k") is None
    with pytest.raises(Exception, match="set rlhf.judge_label"):
        positive_class({"num_labels": 2, "id2label": {"0": "a", "1": "b"}}, None, "k")


def test_judge_points_logged_and_win_rate_in_eval_json(tmp_path, cli, tiny_gpt, reward_run):  # noqa: F811
    out = tmp_path / "run"
    recipe = rlhf_recipe(tmp_path, tiny_gpt, reward_run, ppo={**PPO, "steps": 2},
                         rlhf={"reward_model": reward_run, "judge": reward_run, "chat_template": "false"})
    result = cli("rlhf", recipe, "-o", out, "--set", "peft.method=lora")
    assert result.code == 0, result.err
    points = [r for r in read_metrics(out) if "eval/judge" in r]
    assert [r["step"] for r in points] == [0, 1, 2]
    assert points[0]["eval/kl"] == 0.0 and all(math.isfinite(r["eval/proxy"]) for r in points)
    metrics = json.loads((out / "eval.json").read_text())
    assert 0.0 <= metrics["judge_win_rate"] <= 1.0 and 0.0 <= metrics["judge_win_rate_se"] <= 1.0
    assert metrics["judge_prompts"] == 8 and math.isfinite(metrics["judge_before"] + metrics["judge_after"])
    assert metrics["judge_after"] == pytest.approx(points[-1]["eval/judge"])  # the last point is the final policy
    assert len(metrics["samples"]) == 8 and {"start", "final", "judge_start", "judge_final"} <= set(metrics["samples"][0])
    assert (out / "reward.png").is_file() and "samples" not in (out / "README.md").read_text()


def test_keep_best_judge_restores_the_best_points_weights(tmp_path, cli, tiny_gpt, reward_run, monkeypatch):  # noqa: F811
    from safetensors.torch import load_file

    from tunekit.rl import judge

    scores = iter([0.0, 0.5, 0.9, 0.1])  # the starting policy, then steps 1, 2 (the best), 3
    monkeypatch.setattr(judge.Judge, "score", lambda self, prompts, responses: torch.full((len(responses),), next(scores)))
    weights = {}
    at_step = JudgeTracker.at_step

    def recording(self, step, policy, reference):
        weights[step] = trainable_state(policy)
        at_step(self, step, policy, reference)

    monkeypatch.setattr(JudgeTracker, "at_step", recording)
    out = tmp_path / "run"
    recipe = rlhf_recipe(tmp_path, tiny_gpt, reward_run, ppo=PPO,
                         rlhf={"reward_model": reward_run, "judge": reward_run, "keep": "best_judge"})
    result = cli("rlhf", recipe, "-o", out, "--set", "peft.method=lora")
    assert result.code == 0, result.err
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["kept_step"] == 2 and metrics["judge_after"] == pytest.approx(0.9)
    saved = {k: v for k, v in load_file(out / "adapter" / "adapter_model.safetensors").items() if "lora_" in k}
    kept = {k.replace(".default", ""): v for k, v in weights[2].items() if "lora_" in k}
    assert saved.keys() == kept.keys() and all(torch.equal(saved[k], kept[k]) for k in saved)
    last = {k.replace(".default", ""): v for k, v in weights[3].items() if "lora_" in k}
    assert any(not torch.equal(saved[k], last[k]) for k in saved)  # not the last step's policy
    assert json.loads((out / "best-judge" / "point.json").read_text())["step"] == 2


@pytest.fixture(scope="module")
def bad_judges(reward_run, tiny_bert, tmp_path_factory):  # noqa: F811
    """Judge runs that must be refused: a causal LM run, a run without a classifier head, a tokenizer
    that reads English as [UNK], and a tokenizer larger than its model's embeddings."""
    from transformers import BertTokenizerFast

    root = tmp_path_factory.mktemp("judges")

    def run(name, method, architecture, vocab_size=None, status="done"):
        folder = root / name
        shutil.copytree(reward_run / "model", folder / "model")
        config = json.loads((folder / "model" / "config.json").read_text())
        config["architectures"] = [architecture]
        config["vocab_size"] = vocab_size or config["vocab_size"]
        write(folder / "model" / "config.json", json.dumps(config))
        write(folder / "run.json", json.dumps({"method": method, "status": status}))
        return folder

    digits = run("digits", "reward", "BertForSequenceClassification")
    vocab = write(root / "vocab.txt", "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"0123456789"]) + "\n")
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (digits / "model" / name).unlink(missing_ok=True)
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(digits / "model")
    return {
        "sft": (run("sft", "sft", "LlamaForCausalLM"), "a `tunekit sft` run"),
        "headless": (run("headless", "reward", "BertModel"), "without a sequence-classification head"),
        "digits": (digits, "as the unknown token [UNK]"),
        "vocab": (run("vocab", "reward", "BertForSequenceClassification", vocab_size=100), "tokens but its model 100"),
        "running": (run("running", "reward", "BertForSequenceClassification", status="running"), "has not finished"),
    }


@pytest.mark.parametrize("case", ["sft", "headless", "digits", "vocab", "running"])
def test_a_judge_that_cannot_judge_is_exit_2_before_training(tmp_path, cli, tiny_gpt, reward_run, bad_judges, case):  # noqa: F811
    folder, expected = bad_judges[case]
    recipe = rlhf_recipe(tmp_path, tiny_gpt, reward_run, rlhf={"reward_model": reward_run, "judge": folder})
    for extra in (["--dry-run"], ["-o", str(tmp_path / "run")]):
        result = cli("rlhf", recipe, *extra)
        assert result.code == 2 and f"rlhf.judge: {folder}" in result.err and expected in result.err, result.err
        assert result.err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # nothing trained, no run folder


@pytest.mark.parametrize(("overrides", "expected"), [
    (["rlhf.keep=best_judge"], "keep: best_judge needs a judge"),
    (["rlhf.judge=JUDGE", "rlhf.keep=best_judge", "ppo.eval_steps=null"], "best_judge picks among evaluation points"),
    (["rlhf.judge=JUDGE", "rlhf.algo=grpo", "ppo.eval_steps=5"], "grpo: the judge scores before and after training only"),
])
def test_judge_options_that_do_not_fit(tmp_path, cli, tiny_gpt, reward_run, overrides, expected):  # noqa: F811
    recipe = rlhf_recipe(tmp_path, tiny_gpt, reward_run, rlhf={"reward_model": reward_run})
    sets = [a for o in overrides for a in ("--set", o.replace("JUDGE", str(reward_run)))]
    result = cli("rlhf", recipe, "--dry-run", *sets)
    assert result.code == 2 and expected in result.err and result.err.count("\n") == 1, result.err


def test_proxy_and_judge_recipes_train_on_disjoint_halves_of_sst2():
    from tunekit.data.halves import half_of
    from tunekit.data.preference import load_preferences
    from tunekit.data.tables import read_table
    from tunekit.methods import load_recipe, method_named

    reward = method_named("reward")
    proxy, judge = (load_recipe(reward, str(ROOT / f"recipes/reward/minilm-sst2-{n}.yaml")) for n in ("proxy", "judge"))
    assert proxy.data.train == judge.data.train and {proxy.data.split_half, judge.data.split_half} == {"first", "second"}
    table = read_table(str(SHARED / "sst2" / "train.tsv"), "data.train")
    halves = [set(half_of(table, c.data.split_half, "sentence").column("sentence")) for c in (proxy, judge)]
    assert not halves[0] & halves[1]
    assert halves[0] | halves[1] == set(table.column("sentence"))
    assert 0.45 < len(halves[0]) / len(halves[1] | halves[0]) < 0.55
    for config, half in zip((proxy, judge), halves):
        pairs = load_preferences(config.data, config.source).train.pairs
        assert len(pairs) == config.data.train_limit
        assert {p.chosen for p in pairs} | {p.rejected for p in pairs} <= half
