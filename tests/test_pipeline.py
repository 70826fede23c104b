"""Chaining steps in a Makefile: each step reads the previous run folder; a second `make` does nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, SHARED, write

MAKEFILE = """\
TUNEKIT := {tunekit}
all: tuned/README.md
base/README.md: pretrain.yaml
\t$(TUNEKIT) pretrain $< --output-dir base --overwrite
tuned/README.md: sft.yaml base/README.md
\t$(TUNEKIT) sft $< --set model.name=base/model --output-dir tuned --overwrite
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_two_step_makefile_pipeline_reruns_nothing(tmp_path):
    write(tmp_path / "corpus.txt", (SHARED / "tiny_shakespeare" / "input.txt").read_text()[:30000])
    write(tmp_path / "pretrain.yaml", """\
method: pretrain
model:
  config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2}
data:
  train: corpus.txt
  block_size: 64
tokenizer:
  vocab_size: 400
train: {max_steps: 3, per_device_train_batch_size: 4, save_strategy: "no"}
""")
    write(tmp_path / "sft.yaml", f"""\
method: sft
model:
  name: placeholder
data:
  train: {SHARED}/alpaca/alpaca_data_1k.json
  train_limit: 24
  eval_size: 4
train: {{max_steps: 2, per_device_train_batch_size: 4, save_strategy: "no"}}
""")
    write(tmp_path / "Makefile", MAKEFILE.format(tunekit=f"{sys.executable} -m tunekit"))
    env_cmd = ["make", "-C", str(tmp_path)]
    first = subprocess.run(env_cmd, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "tuned" / "eval.json").is_file(), first.stdout[-2000:] + first.stderr[-2000:]
    second = subprocess.run(env_cmd, capture_output=True, text=True)
    assert second.returncode == 0
    assert "tunekit" not in second.stdout and "Nothing to be done" in second.stdout
    (tmp_path / "sft.yaml").touch()  # only the changed step runs again
    third = subprocess.run(env_cmd, capture_output=True, text=True)
    assert "tunekit sft" in third.stdout and "tunekit pretrain" not in third.stdout
