"""Two machines on one host (issue 26): accelerate's multi-machine launch on loopback, one process
per "machine", for sft under DDP and FSDP. Both machines share the cache folder on one disk, as
clusters with a shared file system do, so their two local main processes prepare the same data at
once; the run must equal the 2-process single-machine run's (losses to 1e-6)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, SHARED, write

from tunekit.config import RECIPES_DIR


def sft_recipe(tmp_path, model):
    return write(tmp_path / "s.yaml", f"""\
method: sft
model:
  name: {model}
data:
  train: {SHARED}/alpaca/alpaca_data_1k.json
  train_limit: 48
  eval_size: 8
train:
  num_train_epochs: 1
  per_device_train_batch_size: 4
  learning_rate: 3.0e-3
  logging_steps: 1
  save_strategy: "no"
  train_sampling_strategy: sequential
""")


def machine_config(tmp_path, engine: str, rank: int, port: int):
    """The engine's shipped accelerate config, for machine `rank` of two, one process each."""
    base = (RECIPES_DIR / "accelerate" / f"{engine}.yaml").read_text()
    lines = [line for line in base.splitlines() if not line.startswith(("num_machines", "machine_rank", "num_processes"))]
    lines += ["num_machines: 2", "num_processes: 2", f"machine_rank: {rank}", "main_process_ip: 127.0.0.1",
              f"main_process_port: {port}", "rdzv_backend: static", "same_network: true"]
    return write(tmp_path / f"{engine}-machine-{rank}.yaml", "\n".join(lines) + "\n")


def environment(cache):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TUNEKIT_CACHE": str(cache)}
    env.pop("TUNEKIT_FAULT", None)
    return env


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_machines_on_one_host_equal_one_machine_with_two_processes(tmp_path, tiny_gpt, engine):
    recipe = sft_recipe(tmp_path, tiny_gpt)
    one = subprocess.run([sys.executable, "-m", "tunekit", "sft", str(recipe), "--accelerate-config",
                          str(RECIPES_DIR / "accelerate" / f"{engine}.yaml"), "--nproc", "2", "-o", str(tmp_path / "one")],
                         cwd=ROOT, env=environment(tmp_path / "cache-one"), capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    port, shared = free_port(), tmp_path / "cache-shared"  # both machines prepare into one cold cache at once
    machines = [subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                                  str(machine_config(tmp_path, engine, rank, port)), "-m", "tunekit", "sft", str(recipe),
                                  "-o", str(tmp_path / "two")],
                                 cwd=ROOT, env=environment(shared), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for rank in (0, 1)]
    outputs = [machine.communicate(timeout=900) for machine in machines]
    for machine, (_, err) in zip(machines, outputs):
        assert machine.returncode == 0, err[-3000:]
    info = json.loads((tmp_path / "two" / "run.json").read_text())
    assert info["status"] == "done" and info["num_processes"] == 2 and info["engine"] == engine
    assert len(losses(tmp_path / "one")) > 3
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-6)
    evaluated = [json.loads((tmp_path / run / "eval.json").read_text())["loss"] for run in ("one", "two")]
    assert evaluated[1] == pytest.approx(evaluated[0], abs=1e-6)
