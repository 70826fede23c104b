"""Several processes on CPU (gloo): both ranks train, the result matches one process with twice the
gradient accumulation, and a failed or hung rank ends the whole run, with a message, in bounded time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT, SHARED, write

from tunekit.config import RECIPES_DIR

ACCELERATE_CONFIGS = sorted((RECIPES_DIR / "accelerate").glob("*.yaml"))


def tunekit(*args, fault=None, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TUNEKIT_FAULT", None)
    if fault:
        env["TUNEKIT_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "tunekit", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def classify_recipe(tmp_path, model):
    return write(tmp_path / "c.yaml", f"""\
method: classify
model:
  name: {model}
data:
  train: {SHARED}/sst2/train.tsv
  train_limit: 128
  max_length: 32
train:
  num_train_epochs: 1
  per_device_train_batch_size: 8
  learning_rate: 1.0e-3
  logging_steps: 1
  save_strategy: "no"
  train_sampling_strategy: sequential
""")


def sft_recipe(tmp_path, model):
    return write(tmp_path / "s.yaml", f"""\
method: sft
model:
  name: {model}
data:
  train: {SHARED}/alpaca/alpaca_data_1k.json
  train_limit: 64
train:
  num_train_epochs: 1
  per_device_train_batch_size: 4
  learning_rate: 3.0e-3
  logging_steps: 1
  save_strategy: "no"
  train_sampling_strategy: sequential
""")


@pytest.mark.parametrize("method", ["classify", "sft"])
def test_two_processes_match_one_with_double_accumulation(tmp_path, tiny_bert, tiny_gpt, method):
    recipe = classify_recipe(tmp_path, tiny_bert) if method == "classify" else sft_recipe(tmp_path, tiny_gpt)
    two = tunekit(method, recipe, "--nproc", 2, "-o", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.strip().splitlines()[-1] == str(tmp_path / "two")
    one = tunekit(method, recipe, "--set", "train.gradient_accumulation_steps=2", "-o", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    info_two = json.loads((tmp_path / "two" / "run.json").read_text())
    info_one = json.loads((tmp_path / "one" / "run.json").read_text())
    assert info_two["num_processes"] == 2 and info_one["num_processes"] == 1
    assert info_two["effective_batch_size"] == info_one["effective_batch_size"]
    two_losses, one_losses = losses(tmp_path / "two"), losses(tmp_path / "one")
    # each rank sees half the batches of an optimizer step: the same number of steps either way
    assert len(two_losses) == len(one_losses) > 2
    assert two_losses == pytest.approx(one_losses, rel=0.02)


@pytest.mark.parametrize("fault", ["crash-rank-1:2", "stall-rank-1:2"])
def test_a_failed_or_hung_rank_ends_the_run(tmp_path, tiny_bert, fault):
    recipe = classify_recipe(tmp_path, tiny_bert)
    start = time.monotonic()
    result = tunekit("classify", recipe, "--nproc", 2, "--set", "train.ddp_timeout=20", "-o", tmp_path / "run",
                     fault=fault, timeout=300)
    assert result.returncode != 0
    assert time.monotonic() - start < 240
    assert "Traceback" in result.stderr or "failed" in result.stderr.lower()


def test_ctrl_c_on_one_rank_stops_both_at_the_same_step_with_a_checkpoint(tmp_path, tiny_bert):
    """The ranks agree on the step to stop at, so the checkpoint is complete and the exit code is 130."""
    recipe = classify_recipe(tmp_path, tiny_bert)
    out = tmp_path / "run"
    result = tunekit("classify", recipe, "--nproc", 2, "-o", out, fault="interrupt-rank-1:3", timeout=300)
    assert result.returncode == 130, result.stderr[-3000:]
    assert (out / "checkpoint-3" / "tunekit-checkpoint.json").is_file()
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert "continue with --resume" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=[p.stem for p in ACCELERATE_CONFIGS])
def test_accelerate_configs_are_accepted_by_dry_run(config, cli):
    """Every config is accepted where its engine can run; DeepSpeed needs CUDA and the package."""
    import importlib.util

    import torch

    assert config.read_text().startswith("# tunekit ")
    result = cli("sft", "sft/tiny-gpt-alpaca", "--accelerate-config", config, "--dry-run")
    runnable = not config.stem.startswith("deepspeed") or (
        torch.cuda.is_available() and importlib.util.find_spec("deepspeed") is not None)
    assert result.code == (0 if runnable else 2), result.err


def test_a_bad_accelerate_config_is_exit_2(tmp_path, cli):
    bad = write(tmp_path / "a.yaml", "distributed_type: TURBO\n")
    result = cli("sft", "sft/tiny-gpt-alpaca", "--accelerate-config", bad, "--dry-run")
    assert result.code == 2 and "distributed_type: expected one of" in result.err


def test_a_finished_worker_leaves_its_process_group(tmp_path):
    """After a finished run a worker destroys its process group (with a barrier first), rather than
    leaving gloo to the interpreter's exit, where it can abort a process after training finished."""
    import torch.distributed as dist

    from tunekit.launch import leave_process_group

    leave_process_group()  # no group: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    leave_process_group()
    assert not dist.is_initialized()
