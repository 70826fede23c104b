"""Crash safety: a run killed with SIGKILL after a checkpoint, or stopped with Ctrl-C (which saves
one first), resumes to the same result as an uninterrupted one; a checkpoint cut short is never picked up; a changed config is refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, SHARED, write


def classify_recipe(tmp_path, model):
    return write(tmp_path / "c.yaml", f"""\
method: classify
model:
  name: {model}
data:
  train: {SHARED}/sst2/train.tsv
  eval: {SHARED}/sst2/dev.tsv
  train_limit: 96
  eval_limit: 32
  max_length: 32
train:
  max_steps: 12
  per_device_train_batch_size: 8
  learning_rate: 1.0e-3
  logging_steps: 1
  save_steps: 4
  use_cpu: true  # bit-equal resumes: a CPU property
  save_total_limit: 2
""")


def sft_recipe(tmp_path, model):
    return write(tmp_path / "s.yaml", f"""\
method: sft
model:
  name: {model}
data:
  train: {SHARED}/alpaca/alpaca_data_1k.json
  train_limit: 64
  eval_size: 8
train:
  max_steps: 8
  per_device_train_batch_size: 4
  learning_rate: 3.0e-3
  logging_steps: 1
  save_steps: 4
  use_cpu: true  # bit-equal resumes: a CPU property
""")


def tunekit(*args, fault=None, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TUNEKIT_FAULT", None)
    if fault:
        env["TUNEKIT_FAULT"] = fault
    proc = subprocess.run([sys.executable, "-m", "tunekit", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def weights(run_dir):
    return (run_dir / "model" / "model.safetensors").read_bytes()


@pytest.mark.parametrize(("method", "fault", "code", "status"), [
    ("classify", "kill-after-save:4", -9, "running"),  # SIGKILL after the step-4 checkpoint
    ("sft", "kill-after-save:4", -9, "running"),
    ("sft", "interrupt-rank-0:5", 130, "interrupted"),  # Ctrl-C during step 5 (no checkpoint due there)
])
def test_stopped_then_resumed_equals_uninterrupted(tmp_path, tiny_bert, tiny_gpt, method, fault, code, status, cli):
    recipe = classify_recipe(tmp_path, tiny_bert) if method == "classify" else sft_recipe(tmp_path, tiny_gpt)
    assert cli(method, recipe, "-o", tmp_path / "straight").code == 0
    killed = tunekit(method, recipe, "-o", tmp_path / "killed", fault=fault, check=False)
    assert killed.returncode == code, killed.stderr[-2000:]
    assert json.loads((tmp_path / "killed" / "run.json").read_text())["status"] == status
    assert not (tmp_path / "killed" / "model").exists()
    if code == 130:
        assert (tmp_path / "killed" / "checkpoint-5" / "tunekit-checkpoint.json").is_file()
        assert killed.stderr.strip().splitlines()[-1] == (
            f"tunekit: interrupted; checkpoint-5 saved in {tmp_path / 'killed'}; continue with --resume")
    resumed = cli(method, recipe, "-o", tmp_path / "killed", "--resume")
    assert resumed.code == 0, resumed.err
    assert weights(tmp_path / "killed") == weights(tmp_path / "straight")
    assert (tmp_path / "killed" / "eval.json").read_text() == (tmp_path / "straight" / "eval.json").read_text()
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps), "metrics after the checkpoint were logged twice"


def test_kill_while_saving_never_leaves_a_checkpoint_resume_picks(tmp_path, tiny_bert, cli):
    recipe = classify_recipe(tmp_path, tiny_bert)
    out = tmp_path / "run"
    killed = tunekit("classify", recipe, "-o", out, fault="kill-before-mark:8", check=False)
    assert killed.returncode == -9
    assert (out / "checkpoint-8").is_dir() and (out / "checkpoint-4").is_dir()
    # a second way to be cut short: trainer_state.json half written
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-12")
    (out / "checkpoint-12" / "trainer_state.json").write_text('{"global_step": 1')
    assert cli("classify", recipe, "-o", out, "--resume").code == 0
    assert (out / ".incomplete-checkpoint-8").is_dir() and (out / ".incomplete-checkpoint-12").is_dir()
    assert json.loads((out / "run.json").read_text())["status"] == "done"


def test_resume_refuses_a_changed_config_but_allows_logging_changes(tmp_path, tiny_bert, cli):
    recipe = classify_recipe(tmp_path, tiny_bert)
    out = tmp_path / "run"
    tunekit("classify", recipe, "-o", out, fault="kill-after-save:4", check=False)
    changed = cli("classify", recipe, "-o", out, "--resume", "--set", "train.learning_rate=5e-4")
    assert changed.code == 2
    assert "train.learning_rate: 0.001 -> 0.0005" in changed.err and "only logging and saving options" in changed.err
    fine = cli("classify", recipe, "-o", out, "--resume", "--set", "train.logging_steps=2")
    assert fine.code == 0, fine.err


def test_resume_without_a_checkpoint_is_exit_2(tmp_path, tiny_bert, cli):
    result = cli("classify", classify_recipe(tmp_path, tiny_bert), "-o", tmp_path / "none", "--resume")
    assert result.code == 2 and "no complete checkpoint" in result.err
