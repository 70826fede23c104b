"""`tunekit classify` end to end on a tiny model and on MiniLM: training works, files are right,
the saved model reloads and predicts the same, and the run folder is never overwritten by accident."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from conftest import MINILM, SHARED, write


def recipe(tmp_path, model, train_limit=256, eval_limit=64, **train):
    train_yaml = "".join(f"  {k}: {v}\n" for k, v in train.items())
    return write(
        tmp_path / "recipe.yaml",
        f"""\
method: classify
model:
  name: {model}
data:
  train: {SHARED}/sst2/train.tsv
  eval: {SHARED}/sst2/dev.tsv
  train_limit: {train_limit}
  eval_limit: {eval_limit}
  max_length: 32
classify:
  labels: [negative, positive]
train:
  logging_steps: 2
  save_steps: 1000
{train_yaml}""",
    )


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_bert):
    """One tiny-model run shared by the tests below (a few seconds)."""
    from tunekit.cli import main

    tmp = tmp_path_factory.mktemp("tiny-run")
    out = tmp / "run"
    path = recipe(tmp, tiny_bert, train_limit=128, num_train_epochs=10, learning_rate="2.0e-3", per_device_train_batch_size=16)
    try:
        main(["classify", str(path), "--output-dir", str(out)])
    except SystemExit as exc:
        assert exc.code in (0, None)
    return out


def test_tiny_run_writes_the_run_folder(tiny_run):
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "run.json", "README.md", "loss.png"):
        assert (tiny_run / name).is_file(), name
    assert (tiny_run / "model" / "model.safetensors").is_file()
    info = json.loads((tiny_run / "run.json").read_text())
    assert info["status"] == "done" and info["trainable_params"] == info["total_params"] > 0
    assert info["wall_time_s"] > 0 and info["num_processes"] == 1
    card = (tiny_run / "README.md").read_text()
    assert "tunekit classify" in card and "accuracy" in card
    head, _, body = card.removeprefix("---\n").partition("\n---\n")
    meta = yaml.safe_load(head)  # the Hub's model-card metadata; a local base model is no Hub id
    assert meta == {"library_name": "transformers", "tags": ["tunekit", "classify"], "pipeline_tag": "text-classification"}
    assert "https://github.com/" not in body
    assert not list(tiny_run.glob(".*tmp*")), "a temporary file was left behind"


def test_tiny_run_loss_is_finite_and_falls(tiny_run):
    losses = [r["loss"] for r in records(tiny_run) if "loss" in r]
    assert len(losses) >= 10
    assert all(loss == loss and loss < 10 for loss in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first * 0.8, (first, last)


def test_eval_reproduces_eval_json_and_predict_writes_rows(tiny_run, tmp_path, cli):
    saved = json.loads((tiny_run / "eval.json").read_text())
    dev = write(tmp_path / "dev.tsv", "\n".join((SHARED / "sst2" / "dev.tsv").read_text().splitlines()[:65]) + "\n")
    result = cli("eval", tiny_run, "--data", dev)
    assert result.code == 0, result.err
    again = json.loads(result.last_line)
    assert again["accuracy"] == pytest.approx(saved["accuracy"], abs=1e-9)
    assert again["f1"] == pytest.approx(saved["f1"], abs=1e-9)
    result = cli("predict", tiny_run, "--data", dev, "--out", tmp_path / "p.jsonl")
    assert result.code == 0, result.err
    predictions = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(predictions) == 64 and {p["label"] for p in predictions} <= {"negative", "positive"}
    correct = sum(p["label"] == ("positive" if row.endswith("1") else "negative")
                  for p, row in zip(predictions, dev.read_text().splitlines()[1:]))
    assert correct / 64 == pytest.approx(saved["accuracy"])


def test_existing_run_folder_is_refused(tiny_run, tmp_path, cli, tiny_bert):
    before = sorted(p.name for p in tiny_run.iterdir())
    result = cli("classify", recipe(tmp_path, tiny_bert), "--output-dir", tiny_run)
    assert result.code == 2
    assert "run folder exists; pass --overwrite" in result.err and "Traceback" not in result.err
    assert sorted(p.name for p in tiny_run.iterdir()) == before


def test_dry_run_loads_nothing_and_writes_nothing(tmp_path, cli, tiny_bert):
    out = tmp_path / "never"
    result = cli("classify", recipe(tmp_path, tiny_bert), "--dry-run", "--output-dir", out)
    assert result.code == 0, result.err
    assert "train_sampling_strategy: group_by_length" in result.out
    assert not out.exists()


def test_minilm_few_steps_reload_predicts_the_same(tmp_path, cli):
    """The real pretrained encoder: a few steps, finite loss, and model/ gives the same logits."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "run"
    result = cli("classify", recipe(tmp_path, MINILM, train_limit=64, eval_limit=32, max_steps=4,
                                    per_device_train_batch_size=16), "-o", out)
    assert result.code == 0, result.err
    assert result.last_line == str(out)
    losses = [r["loss"] for r in records(out) if "loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    batch = tokenizer(["a gripping, funny film", "dull and lifeless"], padding=True, return_tensors="pt")
    with torch.no_grad():
        first, second = model(**batch).logits, model(**batch).logits
    assert torch.equal(first, second)
    from tunekit.methods import classify
    from tunekit.models import load_finished_run

    _, reloaded, _ = load_finished_run(out, classify.Config)
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(**batch).logits, first, atol=1e-6)


def test_non_finite_loss_stops_the_run_with_exit_1(tmp_path, cli, tiny_bert):
    out = tmp_path / "run"
    result = cli("classify", recipe(tmp_path, tiny_bert, train_limit=32, max_steps=4, learning_rate="1.0e+30",
                                    max_grad_norm=0), "-o", out)
    assert result.code == 1
    assert "training failed:" in result.err and "became nan at step" in result.err
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and "became nan" in info["reason"]


def test_secrets_never_reach_the_run_folder(tmp_path, cli, tiny_bert, monkeypatch):
    secret = "hf_SECRETtoken1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    out = tmp_path / "run"
    result = cli("classify", recipe(tmp_path, tiny_bert, train_limit=16, max_steps=1), "-o", out,
                 "--set", f"description=uses {secret}")
    assert result.code == 0, result.err
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".yaml", ".md", ".jsonl"):
            assert secret not in path.read_text(), path


def test_gradient_accumulation_keeps_the_mean_loss(tmp_path, cli, tiny_bert):
    """A random 2-class head starts at a loss of ln 2 whatever the accumulation: transformers 5.24
    took BERT's plain mean loss for one normalised by the item count and logged (and stepped on)
    2 ln 2 at 2 accumulation steps."""
    path = recipe(tmp_path, tiny_bert, train_limit=32, max_steps=1, logging_steps=1, learning_rate="1.0e-9",
                  per_device_train_batch_size=8, gradient_accumulation_steps=2)
    result = cli("classify", path, "--output-dir", tmp_path / "run")
    assert result.code == 0, result.err
    first = next(r for r in records(tmp_path / "run") if "loss" in r)
    assert abs(first["loss"] - math.log(2)) < 0.15, first
