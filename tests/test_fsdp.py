"""FSDP for real, on 2 CPU processes (gloo): the parameters are sharded (no DDP underneath), a run
matches one process with the matching gradient accumulation, a run killed after a checkpoint resumes
to the same weights, and the consolidated model/ loads with plain transformers. Combinations that
cannot work are refused before any process starts.

Each 2-process launch costs most of its time in starting Python and torch twice; the runs are
shared between the tests (module-scoped), and kept to a few steps of tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, SHARED, write

from tunekit.config import RECIPES_DIR

FSDP = RECIPES_DIR / "accelerate" / "fsdp.yaml"


def tunekit(*args, env=None):
    """`tunekit ARGS` in a new process (one that launches the workers)."""
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    for name in ("TUNEKIT_FAULT", "TUNEKIT_INSPECT"):
        if env is None or name not in env:
            full.pop(name, None)
    return subprocess.run([sys.executable, "-m", "tunekit", *map(str, args)], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=600)


def in_process(*args):
    """`tunekit ARGS` in this process (one process, no launch: cheaper)."""
    from tunekit.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        assert exc.code in (0, None), f"tunekit {' '.join(map(str, args))} exited with {exc.code}"


def sft_recipe(folder, model):
    return write(folder / "sft.yaml", f"""\
method: sft
model:
  name: {model}
data:
  train: {SHARED}/alpaca/alpaca_data_1k.json
  train_limit: 40
  eval_size: 8
train:
  max_steps: 6
  per_device_train_batch_size: 4
  per_device_eval_batch_size: 1  # held-out loss = mean over rows, the same however the rows are split
  learning_rate: 3.0e-3
  logging_steps: 1
  save_steps: 3
  save_total_limit: 2
  train_sampling_strategy: sequential
""")


def classify_recipe(folder, model):
    return write(folder / "classify.yaml", f"""\
method: classify
model:
  name: {model}
data:
  train: {SHARED}/sst2/train.tsv
  eval: {SHARED}/sst2/dev.tsv
  train_limit: 64
  eval_limit: 32
  max_length: 32
train:
  max_steps: 6
  per_device_train_batch_size: 4
  learning_rate: 3.0e-3
  logging_steps: 1
  save_strategy: "no"
  train_sampling_strategy: sequential
""")


@dataclass
class Pair:
    two: Path  # 2 processes under FSDP
    one: Path  # 1 process, twice the gradient accumulation
    stderr: str  # of the 2-process launch
    inspected: Path  # each rank's description of its model as training started


RUNS = {"sft": ("sft", []), "sft-lora": ("sft", ["--set", "peft.method=lora"]),
        "classify": ("classify", []), "classify-lora": ("classify", ["--set", "peft.method=lora"])}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_gpt, tiny_bert):
    """name -> Pair, each trained once for the whole module."""
    done: dict[str, Pair] = {}

    def get(name: str) -> Pair:
        if name not in done:
            command, extra = RUNS[name]
            folder = tmp_path_factory.mktemp(name)
            recipe = sft_recipe(folder, tiny_gpt) if command == "sft" else classify_recipe(folder, tiny_bert)
            two = tunekit(command, recipe, *extra, "--accelerate-config", FSDP, "-o", folder / "two",
                          env={"TUNEKIT_INSPECT": str(folder / "inspected")})
            assert two.returncode == 0, two.stderr[-3000:]
            in_process(command, recipe, *extra, "--set", "train.gradient_accumulation_steps=2", "-o", folder / "one")
            done[name] = Pair(folder / "two", folder / "one", two.stderr, folder / "inspected")
        return done[name]

    return get


def logged(run_dir, key):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in records if key in r]


@pytest.mark.parametrize("name", list(RUNS))
def test_two_fsdp_processes_match_one_process(trained, name):
    pair = trained(name)
    two, one = logged(pair.two, "loss"), logged(pair.one, "loss")
    assert [step for step, _ in two] == [step for step, _ in one] == list(range(1, 7))
    held_out_two = json.loads((pair.two / "eval.json").read_text())["loss"]
    held_out_one = json.loads((pair.one / "eval.json").read_text())["loss"]
    assert held_out_two == pytest.approx(held_out_one, rel=0.02)
    assert (pair.two / ("adapter" if name.endswith("lora") else "model")).is_dir()


@pytest.mark.parametrize("name", ["sft", "classify-lora"])
def test_each_rank_holds_half_of_the_model_and_no_ddp_wrapper(trained, name):
    pair = trained(name)
    ranks = [json.loads((pair.inspected / f"rank-{r}.json").read_text()) for r in (0, 1)]
    total = sum(p["numel"] for p in ranks[0]["parameters"])
    for rank in ranks:
        assert rank["ddp_wrappers"] == 0
        assert rank["model_class"].startswith("FSDP")  # fully_shard swaps the class of the module it shards
        assert {p["type"] for p in rank["parameters"]} == {"DTensor"}
        held = sum(p["local_numel"] for p in rank["parameters"])
        assert 0.4 * total < held < 0.6 * total
    assert sum(p["local_numel"] for rank in ranks for p in rank["parameters"]) == total


def test_run_json_and_banner_name_the_engine_and_the_sharding(trained):
    pair = trained("sft")
    info = json.loads((pair.two / "run.json").read_text())
    assert info["engine"] == "fsdp" and info["num_processes"] == 2
    assert info["sharding"] == "parameters, gradients and optimizer state over 2 processes (FSDP2 full shard)"
    assert f"engine fsdp; sharded: {info['sharding']}" in pair.stderr
    single = json.loads((pair.one / "run.json").read_text())
    assert single["engine"] == "single" and single["sharding"] == "none: one process"


HELD_OUT_LOSS = """
import json, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from tunekit.config import validate_config
from tunekit.methods import sft
from tunekit.runs.folder import read_run_config
run = Path(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(run / "model").eval()
tokenizer = AutoTokenizer.from_pretrained(run / "model")
config = validate_config(sft.Config, read_run_config(run), "config.yaml")
rows = sft.tokenize_split(tokenizer, sft.check(config).eval, config).dataset
with torch.no_grad():
    losses = [model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss.item() for r in rows]
print(sum(losses) / len(losses))
"""


def test_consolidated_model_loads_with_transformers_and_gives_the_eval_json_loss(trained):
    pair = trained("sft")
    result = subprocess.run([sys.executable, "-c", HELD_OUT_LOSS, str(pair.two)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((pair.two / "eval.json").read_text())["loss"]
    assert float(result.stdout.strip().splitlines()[-1]) == pytest.approx(saved, rel=1e-5)


def test_an_fsdp_adapter_run_evaluates_again_with_tunekit_eval(trained, tmp_path, cli):
    pair = trained("classify-lora")
    dev = write(tmp_path / "dev.tsv", "\n".join((SHARED / "sst2" / "dev.tsv").read_text().splitlines()[:33]) + "\n")
    result = cli("eval", pair.two, "--data", dev)
    assert result.code == 0, result.err
    again, saved = json.loads(result.last_line), json.loads((pair.two / "eval.json").read_text())
    assert again["loss"] == pytest.approx(saved["loss"], rel=1e-5)
    assert again["accuracy"] == saved["accuracy"]


def test_killed_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(trained, tmp_path, tiny_gpt, cli):
    """Rank 1 is killed (SIGKILL) while the step-6 checkpoint is being saved, after the step-3 one:
    checkpoint-6 is never marked complete (rank 0 marks only once every rank has written its part),
    and the resume continues from checkpoint-3 to the same weights, bit for bit (CPU, gloo: the
    same reductions in the same order; every rank's RNG state and the data position restored)."""
    straight = trained("sft").two
    recipe = sft_recipe(tmp_path, tiny_gpt)
    out = tmp_path / "killed"
    killed = tunekit("sft", recipe, "--accelerate-config", FSDP, "-o", out, env={"TUNEKIT_FAULT": "kill-before-mark-rank-1:6"})
    assert killed.returncode == 1, killed.stderr[-3000:]
    assert "SIGKILL" in killed.stderr and not (out / "model").exists()
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):  # each rank wrote its own shard
        assert {p.name for p in (out / "checkpoint-3" / part).glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    assert (out / "checkpoint-3" / "tunekit-checkpoint.json").is_file()
    assert not (out / "checkpoint-6" / "tunekit-checkpoint.json").exists()
    unsharded = cli("sft", recipe, "-o", out, "--resume")  # one process cannot read the shards
    assert unsharded.code == 2 and "the checkpoint is sharded by FSDP and this run would use single" in unsharded.err
    resumed = tunekit("sft", recipe, "--accelerate-config", FSDP, "-o", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / ".incomplete-checkpoint-6").is_dir()
    assert "training step 4/6" in resumed.stderr and "training step 1/6" not in resumed.stderr
    assert (out / "model" / "model.safetensors").read_bytes() == (straight / "model" / "model.safetensors").read_bytes()
    assert json.loads((out / "eval.json").read_text())["loss"] == json.loads((straight / "eval.json").read_text())["loss"]


@pytest.mark.parametrize(("recipe", "extra", "config", "message"), [
    ("sft/tiny-gpt-alpaca", ["--set", "peft.method=lora", "--set", "peft.quantize=4bit"], "fsdp",
     "peft.quantize: 4bit (QLoRA) under FSDP needs CUDA GPUs"),
    ("sft/tiny-gpt-alpaca", [], "deepspeed-zero2", "DeepSpeed needs CUDA GPUs and this machine has none"),
    ("sft/tiny-gpt-alpaca", [], "deepspeed-zero3", "DeepSpeed needs CUDA GPUs and this machine has none"),
    ("rlhf/tiny-gpt-sentiment-ppo", [], "fsdp", "rlhf.algo: ppo does not run under fsdp yet"),
    ("rlhf/tiny-gpt-sentiment-ppo", [], "deepspeed-zero3", "DeepSpeed needs CUDA GPUs"),
])
def test_impossible_engines_are_one_line_exit_2_before_any_process_starts(tmp_path, cli, recipe, extra, config, message):
    out = tmp_path / "run"
    result = cli(recipe.split("/")[0], recipe, *extra, "--accelerate-config", RECIPES_DIR / "accelerate" / f"{config}.yaml",
                 "-o", out)
    assert result.code == 2
    assert result.err.count("\n") == 1 and message in result.err, result.err
    assert "launching" not in result.err and not out.exists()


def test_engine_of_names_what_a_launch_asks_for():
    from tunekit.launch import engine_of

    accelerate = RECIPES_DIR / "accelerate"
    assert engine_of(None) == "single" and engine_of(None, 2) == "ddp"
    assert engine_of(str(accelerate / "ddp.yaml")) == "ddp" and engine_of(str(accelerate / "ddp.yaml"), 1) == "single"
    assert engine_of(str(accelerate / "fsdp.yaml")) == "fsdp"
    assert engine_of(str(accelerate / "deepspeed-zero3.yaml")) == "deepspeed"


def test_a_run_stops_when_accelerate_did_not_set_up_the_engine_asked_for(monkeypatch):
    """What the issue saw: an FSDP config that accelerate turned into DDP. The worker now stops
    before the first step instead of training with the wrong engine."""
    from types import SimpleNamespace

    from tunekit.distributed import check_started, running
    from tunekit.errors import TrainingFailure

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert running().name == "fsdp"
    ddp = SimpleNamespace(accelerator=SimpleNamespace(distributed_type="DistributedType.MULTI_CPU", num_processes=2))
    with pytest.raises(TrainingFailure, match="asks for fsdp, but accelerate set up ddp"):
        check_started(ddp)
    fsdp = SimpleNamespace(accelerator=SimpleNamespace(distributed_type="DistributedType.FSDP", num_processes=2))
    check_started(fsdp)
