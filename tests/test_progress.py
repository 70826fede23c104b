"""The training display: a rich bar with ETA, throughput and loss on a terminal, one plain line per
logging step anywhere else; the libraries' tqdm bars never show."""

from __future__ import annotations

import io
import json
import re

from conftest import SHARED, write

from tunekit.progress import Progress, clock

LINE = re.compile(r"^training step (\d+)/8 \((\d+)%\)  loss [\d.]+  [\d,]+ tok/s  elapsed \d+:\d\d  ETA \d+:\d\d$")


def test_plain_lines_when_stderr_is_not_a_terminal(tmp_path, cli):
    text = write(tmp_path / "corpus.txt", (SHARED / "tiny_shakespeare" / "input.txt").read_text()[:30000])
    recipe = write(tmp_path / "p.yaml", f"""\
method: pretrain
model:
  config: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2}}
data:
  train: {text}
  block_size: 32
tokenizer:
  vocab_size: 400
train:
  max_steps: 8
  per_device_train_batch_size: 4
  logging_steps: 2
  save_strategy: "no"
""")
    result = cli("pretrain", recipe, "-o", tmp_path / "run")
    assert result.code == 0, result.err
    lines = [line for line in result.err.splitlines() if line.startswith("training step")]
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    assert [int(m.group(1)) for m in matches] == [2, 4, 6, 8]  # one line per logging step
    assert matches[-1].group(2) == "100" and lines[-1].endswith("ETA 0:00")
    logged = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert f"loss {logged[-3]['loss']:.4g}" in lines[-1]  # the last logged training loss
    assert "it/s]" not in result.err and "Writing model shards" not in result.err  # no library bars
    device = json.loads((tmp_path / "run" / "run.json").read_text())["device"]
    assert device in result.err  # the start banner names it


def test_rich_bar_on_a_terminal():
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    progress = Progress(total=10, per_step=4, tokens_per_sample=100.0, console=console)
    progress.start_at(0)
    for step in range(1, 11):
        if step == 5:
            progress.note(2.3456)
        progress.update(step)
    progress.close()
    shown = out.getvalue()
    assert "10/10" in shown and "100%" in shown and "ETA" in shown
    assert "tok/s" in shown and "loss 2.346" in shown and "━" in shown


def test_speed_counts_samples_or_tokens_and_resumed_runs_count_only_new_steps(monkeypatch):
    from rich.console import Console

    now = [100.0]
    monkeypatch.setattr("tunekit.progress.time.monotonic", lambda: now[0])
    quiet = Console(file=io.StringIO())
    progress = Progress(total=100, per_step=8, console=quiet)
    progress.start_at(40)  # resumed at step 40
    for _ in range(10):
        now[0] += 0.5
        progress.update(progress.step + 1)
    assert progress.speed() == "16.0 samples/s"  # 8 samples a step, 2 steps a second
    assert progress.eta() == 25.0  # 50 steps left at 0.5 s each
    progress.tokens_per_sample = 128
    assert progress.speed() == "2,048 tok/s"
    assert clock(3725) == "1:02:05" and clock(65) == "1:05"
