"""Defects found in review (issue 26), one test each: every test failed on the code before its fix.
The server ones are in tests/test_serve_reliability.py."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED, write

from tunekit.data import corpus


@pytest.fixture(scope="module")
def tokenizer():
    from tunekit.data.chat import train_tokenizer

    return train_tokenizer(["the quick brown fox jumps over the lazy dog\n" * 50], 300)


def test_packed_blocks_and_trained_tokenizer_follow_the_text_column(tmp_path, tokenizer):
    rows = [{"text": f"alpha beta gamma {i}", "body": f"zeta eta theta {i} {i}"} for i in range(40)]
    path = write(tmp_path / "c.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    by_text = corpus.sources([str(path)], "data.train", "text")
    by_body = corpus.sources([str(path)], "data.train", "body")
    assert by_text[0].key != by_body[0].key  # the trained tokenizer's cache key is built from these
    text_blocks = corpus.packed(by_text, tokenizer, 8, 1).dataset["input_ids"]
    body_blocks = corpus.packed(by_body, tokenizer, 8, 1).dataset["input_ids"]
    expected = tokenizer("zeta eta theta 0 0", add_special_tokens=False)["input_ids"][:8]
    assert body_blocks[0] == expected and text_blocks != body_blocks


def test_a_same_size_rewrite_with_its_mtime_restored_is_read_again(tmp_path):
    import os

    from tunekit.data.tables import read_table

    path = write(tmp_path / "a.jsonl", '{"text": "old"}\n')
    stat = path.stat()
    assert list(read_table(str(path)).rows) == [{"text": "old"}]
    path.write_text('{"text": "new"}\n')
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert list(read_table(str(path)).rows) == [{"text": "new"}]


def test_a_file_is_hashed_once_per_version(tmp_path, monkeypatch):
    from tunekit.data import cache

    path = write(tmp_path / "a.jsonl", '{"text": "x"}\n')
    first = cache.file_key(path)
    monkeypatch.setattr(cache, "content_hash", lambda p: pytest.fail("hashed an unchanged file again"))
    assert cache.file_key(path) == first


def test_nested_keys_first_seen_in_a_later_batch_are_kept(tmp_path, monkeypatch):
    from tunekit.data import readers
    from tunekit.data.tables import read_table

    monkeypatch.setattr(readers, "BATCH", 2)
    rows = [
        {"meta": {"id": 1}, "messages": [{"role": "user", "content": "a"}]},
        {"meta": {"id": 2}, "messages": [{"role": "user", "content": "b"}]},
        {"meta": {"id": 3, "alias": "c"}, "messages": [{"role": "user", "content": "c", "name": "x"}]},
    ]
    path = write(tmp_path / "nested.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    read = list(read_table(str(path)).rows)
    assert read[2]["meta"] == {"id": 3, "alias": "c"}
    assert read[2]["messages"] == [{"role": "user", "content": "c", "name": "x"}]
    assert read[0]["meta"] == {"id": 1, "alias": None}  # the same columns in every row


@pytest.mark.parametrize("body, said", [
    ("raise ValueError('bad value\\nsecond line')\n", "raised ValueError: bad value"),
    ("raise RuntimeError('no GPU here')\n", "raised RuntimeError: no GPU here"),
    ("import argparse\nargparse.ArgumentParser().add_argument('--x', required=True)\n"
     "argparse.ArgumentParser(prog='r').parse_args(['--y'])\n", "called sys.exit(2)"),
    ("import sys\nsys.exit('cannot run')\n", "called sys.exit('cannot run')"),
])
@pytest.mark.parametrize("as_module", [False, True])
def test_a_reward_module_that_fails_to_load_is_one_line(tmp_path, monkeypatch, capsys, body, said, as_module):
    from tunekit.errors import UserError
    from tunekit.rl.rewards import load_callable

    name = f"broken_reward_{abs(hash((body, as_module)))}"
    path = write(tmp_path / f"{name}.py", body + "def reward(p, r, rows):\n    return [0.0] * len(r)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = f"{name}:reward" if as_module else f"{path}:reward"
    with pytest.raises(UserError) as err:
        load_callable(spec, "r.yaml: rlhf.reward_fn.0.name")
    message = str(err.value)
    assert said in message and "\n" not in message, message
    out = capsys.readouterr()
    assert out.out == out.err == ""  # what the module printed is in the one line, not on the terminal


WAITER = """
import datetime, sys, time
from pathlib import Path
import torch.distributed as dist
from transformers import TrainingArguments
from tunekit.training import first_on_each_machine

# A 2 s collective timeout (train.ddp_timeout scaled down; accelerate keeps a group it finds made)
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=2))
args = TrainingArguments(output_dir=sys.argv[1], ddp_timeout=2, use_cpu=True, report_to=[])
built = Path(sys.argv[1]) / "built"
with first_on_each_machine(args, "preparing"):
    if args.local_process_index == 0:
        time.sleep(6)  # a preparation three times the collective timeout
        built.write_text("x")
    assert built.exists()
print("through", args.process_index, flush=True)
"""


def test_waiting_for_the_local_main_process_outlasts_ddp_timeout(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    script = write(tmp_path / "waiter.py", WAITER)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(line for line in done.stdout.splitlines() if line.startswith("through")) == ["through 0", "through 1"]


def test_a_rank_waiting_for_a_local_main_process_that_died_stops_with_one_line(tmp_path):
    import subprocess
    import sys

    from tunekit.distributed import wait_for_signal
    from tunekit.errors import TrainingFailure

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with pytest.raises(TrainingFailure, match="ended while tokenising"):
        wait_for_signal(tmp_path / "never", gone.pid, "tokenising")
    write(tmp_path / "failed", "failed: ValueError")
    with pytest.raises(TrainingFailure, match="failed: ValueError while tokenising"):
        wait_for_signal(tmp_path / "failed", gone.pid, "tokenising")


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_trl_algorithms_under_fsdp_on_cpus_are_refused_before_any_model_loads(tmp_path, cli, algo):
    from tunekit.config import RECIPES_DIR

    out = tmp_path / "run"
    result = cli("rlhf", "rlhf/tiny-gpt-arith-grpo", "--set", f"rlhf.algo={algo}", "--accelerate-config",
                 RECIPES_DIR / "accelerate" / "fsdp.yaml", "-o", out)
    assert result.code == 2 and result.err.count("\n") == 1, result.err
    assert f"rlhf.algo: {algo} under FSDP needs CUDA GPUs" in result.err and not out.exists()


MIXED = """
import sys
from pathlib import Path
from tunekit.upstream import fsdp_on_cpu

fsdp_on_cpu()
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin

accelerator = Accelerator(mixed_precision="bf16", fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2), cpu=True)
policy = accelerator.state.fsdp_plugin.mixed_precision_policy
said = f"{accelerator.distributed_type} {getattr(policy, 'param_dtype', None)}"
(Path(sys.argv[1]) / f"rank-{accelerator.process_index}").write_text(said)
"""


def test_fsdp_on_cpu_takes_the_mixed_precision_policy(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    script = write(tmp_path / "mixed.py", MIXED)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_FSDP": "true"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    said = [(tmp_path / f"rank-{rank}").read_text() for rank in (0, 1)]
    assert said == ["DistributedType.FSDP torch.bfloat16"] * 2  # bf16 gathers, as on GPUs


def test_trl_arguments_use_the_current_names_and_library_warnings_go_to_the_run_log(tmp_path):
    import warnings
    from types import SimpleNamespace

    from tunekit.config import load_config
    from tunekit.methods import rlhf
    from tunekit.rl.trl_algos import trl_arguments
    from tunekit.runs.folder import RunFolder
    from tunekit.runs.library_warnings import hold_library_warnings

    config = load_config(rlhf.Config, "rlhf/tiny-gpt-arith-grpo", ["train.use_cpu=true"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = trl_arguments(config, SimpleNamespace(path=tmp_path / "args"))
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
    assert args.activation_checkpointing is False and args.gradient_checkpointing is False
    model_code = "/venv/lib/python3.11/site-packages/transformers/modeling_utils.py"
    with warnings.catch_warnings(record=True) as shown:  # what reaches the terminal
        warnings.simplefilter("always")
        hold_library_warnings()  # the method sets up: PEFT wraps the model before the run folder exists
        warnings.warn_explicit("asked while PEFT wrapped the model", FutureWarning, model_code, 3313)
        RunFolder(tmp_path / "run").start("rlhf", "method: rlhf\n", False)
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning, model_code, 3313)
        warnings.warn_explicit("your reward module says", FutureWarning, str(tmp_path / "reward.py"), 1)
    assert [str(w.message) for w in shown] == ["your reward module says"]
    log = (tmp_path / "run" / "warnings.log").read_text()
    assert log.index("asked while PEFT wrapped") < log.index("is_gradient_checkpointing")


def one_step_sft(tmp_path, tiny_gpt, rows):
    """A recipe of one SFT step of the tiny GPT on the first `rows` Alpaca rows (`tunekit lora` it
    for an adapter run)."""
    return write(tmp_path / "lora.yaml", f"""\
method: sft
model: {{name: {tiny_gpt}}}
data: {{train: {SHARED}/alpaca/alpaca_data_1k.json, train_limit: {rows}, max_length: 256}}
train: {{max_steps: 1, per_device_train_batch_size: 4, save_strategy: "no"}}
""")


def test_what_peft_says_while_lora_and_merge_load_the_model_goes_to_the_run_log(tmp_path, cli, tiny_gpt):
    import warnings

    recipe = one_step_sft(tmp_path, tiny_gpt, rows=8)
    with warnings.catch_warnings(record=True) as shown:  # what reaches the terminal
        warnings.simplefilter("always")
        result = cli("lora", recipe, "-o", str(tmp_path / "run"))
    assert result.code == 0, result.err
    assert [str(w.message) for w in shown if issubclass(w.category, FutureWarning)] == []  # (DeprecationWarning:
    # hidden outside __main__ by Python's default filters, which "always" here overrides)
    log = tmp_path / "run" / "warnings.log"
    assert "is_gradient_checkpointing" in log.read_text()  # PEFT asked, before the run
    noted = log.read_text().count("is_gradient_checkpointing")

    with warnings.catch_warnings(record=True) as shown:  # `tunekit merge` loads the adapter the same way
        warnings.simplefilter("always")
        result = cli("merge", str(tmp_path / "run"))
    assert result.code == 0, result.err
    assert [str(w.message) for w in shown if issubclass(w.category, FutureWarning)] == []
    assert log.read_text().count("is_gradient_checkpointing") > noted


def test_a_merge_that_fails_while_saving_leaves_no_half_folder(tmp_path, cli, tiny_gpt, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    recipe = one_step_sft(tmp_path, tiny_gpt, rows=4)
    assert cli("lora", recipe, "-o", str(tmp_path / "run")).code == 0
    before = sorted(p.name for p in (tmp_path / "run").iterdir())

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)  # the weights are written by then
    with pytest.raises(OSError, match="No space left"):
        cli("merge", str(tmp_path / "run"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before  # no merged/, no temporary folder
    monkeypatch.undo()
    assert cli("merge", str(tmp_path / "run")).code == 0  # and the next merge is not refused
    assert (tmp_path / "run" / "merged" / "config.json").is_file()


def test_a_resumed_stream_starts_where_the_run_stopped_even_after_going_round(tmp_path, tokenizer):
    from types import SimpleNamespace

    rows = [{"text": f"document number {i} " * (i % 3 + 1)} for i in range(30)]
    path = write(tmp_path / "c.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    corpus_ = corpus.sources([str(path)], "data.train", "text")

    def passes(dataset, count):
        return [[row["input_ids"] for row in dataset] for _ in range(count)]

    whole = passes(corpus.streamed(corpus_, tokenizer, 8), 1)[0]
    assert len(whole) % 4, len(whole)  # in batches of 4, a pass ends with a short batch
    steps_per_pass = len(whole) // 4 + 1
    resumed = passes(corpus.streamed(corpus_, tokenizer, 8, corpus.StreamPosition(steps_per_pass + 2, 4, 1)), 2)
    assert resumed == [whole[8:], whole]  # 2 steps into the second pass, then a full third one
    assert passes(corpus.streamed(corpus_, tokenizer, 8, corpus.StreamPosition(3, 4, 1)), 1) == [whole[12:]]
    exactly_round = corpus.StreamPosition(steps_per_pass, 4, 1)
    assert passes(corpus.streamed(corpus_, tokenizer, 8, exactly_round), 1) == [whole]  # never an empty epoch

    write(tmp_path / "checkpoint-6" / "trainer_state.json", json.dumps({"global_step": 6}))
    args = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=2, world_size=2,
                           dataloader_drop_last=False)
    assert corpus.stream_position(tmp_path / "checkpoint-6", args) == corpus.StreamPosition(6, 8, 2)


def test_a_streamed_pretrain_killed_after_going_round_resumes_to_the_uninterrupted_weights(tmp_path, cli):
    import os
    import subprocess
    import sys

    from conftest import ROOT, SHARED

    text = write(tmp_path / "c.txt", (SHARED / "tiny_shakespeare" / "input.txt").read_text()[:1000])  # 21 blocks: 6 steps a pass
    recipe = write(tmp_path / "p.yaml", f"""\
method: pretrain
model:
  config: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2}}
data:
  train: {text}
  streaming: true
  block_size: 32
tokenizer:
  vocab_size: 300
train:
  max_steps: 12
  per_device_train_batch_size: 4
  learning_rate: 1.0e-2
  logging_steps: 1
  save_steps: 9
  use_cpu: true
""")
    assert cli("pretrain", recipe, "-o", tmp_path / "straight").code == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNEKIT_FAULT": "kill-after-save:9"}
    killed = subprocess.run([sys.executable, "-m", "tunekit", "pretrain", str(recipe), "-o", str(tmp_path / "killed")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = cli("pretrain", recipe, "-o", tmp_path / "killed", "--resume")
    assert resumed.code == 0, resumed.err
    weights = [(tmp_path / run / "model" / "model.safetensors").read_bytes() for run in ("straight", "killed")]
    assert weights[0] == weights[1] and max(steps) == 12
    assert "resuming a streamed corpus after 9 steps" in resumed.err


def test_a_finished_runs_library_notes_go_to_its_own_log_then_the_route_comes_back(tmp_path):
    import warnings

    from tunekit.runs import library_warnings as lw

    def library_note(text):
        warnings.warn_explicit(text, FutureWarning, "/env/lib/site-packages/somelib/mod.py", 1)

    saved = lw._Route.log, lw._Route.held
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        try:
            lw.route_library_warnings(tmp_path / "current.log")
            with lw.library_warnings_to(tmp_path / "read.log"):
                library_note("while the finished run loads")
            library_note("after it")
            with lw.library_warnings_to(tmp_path / "gone" / "warnings.log"):  # a folder that cannot take it
                library_note("dropped, not raised")
        finally:
            lw._Route.log, lw._Route.held = saved
    assert "while the finished run loads" in (tmp_path / "read.log").read_text()
    assert "after it" in (tmp_path / "current.log").read_text()
    assert "while the finished run loads" not in (tmp_path / "current.log").read_text()
