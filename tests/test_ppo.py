"""RLHF runs: the recipe checks, and few-step runs of PPO (full and LoRA), GRPO and RLOO on tiny
models with a stand-in reward model, resumed and on two processes (the math: test_ppo_math.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SHARED, write


@pytest.fixture(scope="module")
def reward_run(tiny_bert, tmp_path_factory):
    """A stand-in `tunekit reward` run: the tiny BERT with a one-output head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("reward-run")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=1)
    model.save_pretrained(folder / "model")
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder / "model")
    write(folder / "run.json", json.dumps({"method": "reward", "status": "done"}))
    write(folder / "config.yaml", f"method: reward\nmodel:\n  name: {tiny_bert}\n")
    return folder


def rlhf_recipe(tmp_path, policy, reward, **sections):
    extra = "".join(f"{name}:\n" + "".join(f"  {k}: {v}\n" for k, v in keys.items()) for name, keys in sections.items())
    return write(tmp_path / "rlhf.yaml", f"""\
method: rlhf
model:
  name: {policy}
data:
  train: {SHARED}/sst2/train.tsv
  columns: {{text: sentence}}
  prompt_words: 3
  train_limit: 64
  eval_size: 8
generation:
  max_new_tokens: 6
train:
  learning_rate: 1.0e-3
  logging_steps: 1
{extra}""")


def test_recipe_checks_are_exit_2(tmp_path, cli, tiny_gpt, reward_run):
    recipe = rlhf_recipe(tmp_path, tiny_gpt, reward_run, rlhf={"reward_model": reward_run})
    assert cli("rlhf", recipe, "--dry-run").code == 0
    cases = {
        "rlhf.reward_model=": "ppo needs a reward: set rlhf.reward_model",
        "ppo.minibatch_size=64": "lower ppo.minibatch_size",
        "train.label_smoothing_factor=0.1": "train.label_smoothing_factor: not used by tunekit's PPO",
        "train.max_steps=10": "train.max_steps: set by tunekit; use ppo.steps",
        "data.prompt_words=1000": "no prompts left with more than data.prompt_words=1000 words",
        "ppo.kl_coeff=0.1": "ppo.kl_coeff: unknown key; did you mean kl_coef?",
    }
    for override, expected in cases.items():
        result = cli("rlhf", recipe, "--dry-run", "--set", override)
        assert result.code == 2 and expected in result.err and result.err.count("\n") == 1, (override, result.err)
    result = cli("rlhf", recipe, "--dry-run", "--set", "rlhf.algo=grpo", "--set", "ppo.rollout_batch_size=30")
    assert result.code == 2 and "must be a multiple of rlhf.num_generations (4)" in result.err


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_few_step_ppo(tmp_path, cli, tiny_gpt, reward_run, peft):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    recipe = rlhf_recipe(tmp_path, tiny_gpt, reward_run, rlhf={"reward_model": reward_run, "chat_template": "false"},
                         ppo={"steps": 3, "rollout_batch_size": 8, "minibatch_size": 4, "epochs": 2,
                              "missing_eos_penalty": 1.0, "kl_target": 1.0})
    result = cli("rlhf", recipe, "-o", out, "--set", f"peft.method={peft}")
    assert result.code == 0, result.err
    assert result.last_line == str(out)
    metrics = json.loads((out / "eval.json").read_text())
    assert {"reward_before", "reward_after", "kl"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    expected = {"reward", "score", "kl", "kl_coef", "entropy", "policy_loss", "value_loss", "clip_fraction",
                "approx_kl", "response_length", "samples"}
    assert expected <= set(records[0]) and len(records[0]["samples"]) == 3
    assert records[-1]["kl_coef"] != 0.05  # adaptive
    assert all(math.isfinite(r["loss"]) for r in records)
    assert (out / "loss.png").is_file() and (out / "reward.png").is_file() and (out / "README.md").is_file()
    if peft == "lora":
        assert not (out / "model").exists()
        weights = load_file(out / "adapter" / "adapter_model.safetensors")
        assert any(float(w.abs().sum()) > 0 for k, w in weights.items() if "lora_B" in k)  # the adapter moved
    else:
        trained = load_file(out / "model" / "model.safetensors")
        start = load_file(tiny_gpt / "model.safetensors")
        assert any(not torch.equal(trained[k], start[k]) for k in start)
    generated = cli("generate", out, "--prompt", "the film is", "--max-new-tokens", "4")
    assert generated.code == 0, generated.err


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_few_step_trl_algos_report_the_same_metrics(tmp_path, cli, tiny_gpt, reward_run, algo):
    out = tmp_path / "run"
    recipe = rlhf_recipe(tmp_path, tiny_gpt, reward_run, rlhf={"reward_model": reward_run, "algo": algo,
                                                               "num_generations": 2},
                         ppo={"steps": 2, "rollout_batch_size": 8, "minibatch_size": 4, "epochs": 1})
    result = cli("rlhf", recipe, "-o", out, "--set", "peft.method=lora")
    assert result.code == 0, result.err
    metrics = json.loads((out / "eval.json").read_text())
    assert {"reward_before", "reward_after", "kl"} <= set(metrics)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert {"reward", "entropy", "response_length", "clip_fraction", "samples"} <= set(records[0])
    assert (out / "adapter").is_dir() and (out / "reward.png").is_file()


@pytest.mark.parametrize(("fault", "code"), [("kill-after-save:2", -9), ("interrupt-rank-0:3", 130)])
def test_ppo_resume_continues_steps_and_kl_controller(tmp_path, cli, tiny_gpt, reward_run, fault, code):
    """Killed with SIGKILL after the step-2 checkpoint, or stopped with Ctrl-C in step 3 (which
    saves checkpoint-3), resumed: the same steps, KL coefficients and final policy as a run never
    interrupted."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    recipe = rlhf_recipe(tmp_path, tiny_gpt, reward_run, rlhf={"reward_model": reward_run, "chat_template": "false"},
                         ppo={"steps": 4, "rollout_batch_size": 8, "minibatch_size": 4, "epochs": 1, "kl_target": 1.0})
    overrides = ["--set", "train.save_steps=2", "--set", "train.use_cpu=true"]  # bit-equal: a CPU property
    assert cli("rlhf", recipe, "-o", tmp_path / "straight", *overrides).code == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNEKIT_FAULT": fault}
    killed = subprocess.run([sys.executable, "-m", "tunekit", "rlhf", str(recipe), "-o", str(tmp_path / "killed"), *overrides],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert killed.returncode == code, killed.stderr[-2000:]
    if code == 130:
        assert (tmp_path / "killed" / "checkpoint-3" / "tunekit-checkpoint.json").is_file()
        assert json.loads((tmp_path / "killed" / "run.json").read_text())["status"] == "interrupted"
    resumed = cli("rlhf", recipe, "-o", tmp_path / "killed", "--resume", *overrides)
    assert resumed.code == 0, resumed.err
    straight, again = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert [r["kl_coef"] for r in again] == pytest.approx([r["kl_coef"] for r in straight])
    assert [r["reward"] for r in again] == pytest.approx([r["reward"] for r in straight])
    name = "model/model.safetensors"
    assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()


def test_ppo_on_two_processes(tmp_path, tiny_gpt, reward_run):
    """Each rank samples and scores its own prompts; statistics are averaged over both."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    recipe = rlhf_recipe(tmp_path, tiny_gpt, reward_run, rlhf={"reward_model": reward_run, "chat_template": "false"},
                         ppo={"steps": 2, "rollout_batch_size": 4, "minibatch_size": 2, "epochs": 1})
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tunekit", "rlhf", str(recipe), "--nproc", "2", "-o", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    info = json.loads((out / "run.json").read_text())
    assert info["num_processes"] == 2 and info["effective_batch_size"] == 8
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert {"reward_before", "reward_after", "kl"} <= set(json.loads((out / "eval.json").read_text()))


def test_grpo_resumes_from_a_checkpoint(tmp_path, cli, tiny_gpt, reward_run):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    recipe = rlhf_recipe(tmp_path, tiny_gpt, reward_run, rlhf={"reward_model": reward_run, "algo": "grpo",
                                                               "num_generations": 2},
                         ppo={"steps": 3, "rollout_batch_size": 4, "minibatch_size": 4, "epochs": 1})
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNEKIT_FAULT": "kill-after-save:2"}
    killed = subprocess.run([sys.executable, "-m", "tunekit", "rlhf", str(recipe), "-o", str(out), "--set",
                             "train.save_steps=2"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = cli("rlhf", recipe, "-o", out, "--resume", "--set", "train.save_steps=2")
    assert resumed.code == 0, resumed.err
    assert json.loads((out / "run.json").read_text())["status"] == "done"
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
