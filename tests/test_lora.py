"""PEFT: only the adapter (and the new head) learns; adapters save, reload, merge; QLoRA runs on CPU."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import SHARED, write

from tunekit.methods import classify


def classify_recipe(tmp_path, model, peft="lora"):
    return write(tmp_path / "c.yaml", f"""\
method: classify
model:
  name: {model}
data:
  train: {SHARED}/sst2/train.tsv
  eval: {SHARED}/sst2/dev.tsv
  train_limit: 64
  eval_limit: 16
  max_length: 32
peft:
  method: {peft}
  r: 4
train:
  max_steps: 3
  per_device_train_batch_size: 16
  learning_rate: 1.0e-2
  logging_steps: 1
  save_strategy: "no"
""")


def test_lora_changes_only_adapter_and_head(tmp_path, tiny_bert, monkeypatch, cli):
    created = {}
    original = classify.load_model

    def spy(config, names):
        created["model"] = model = original(config, names)
        created["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return model

    monkeypatch.setattr(classify, "load_model", spy)
    out = tmp_path / "run"
    result = cli("lora", classify_recipe(tmp_path, tiny_bert), "-o", out)
    assert result.code == 0, result.err
    changed = {n for n, p in created["model"].named_parameters() if not torch.equal(p.cpu(), created["before"][n].cpu())}
    assert changed, "nothing trained"
    assert all("lora_" in n or "modules_to_save" in n for n in changed), sorted(changed)
    assert any("lora_" in n for n in changed) and any("classifier" in n for n in changed)
    info = json.loads((out / "run.json").read_text())
    assert 0 < info["trainable_params"] < 0.5 * info["total_params"]
    assert (out / "adapter" / "adapter_config.json").is_file() and not (out / "model").exists()


def test_merge_gives_the_adapter_run_logits(tmp_path, tiny_bert, cli):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunekit.models import load_run_model

    out = tmp_path / "run"
    assert cli("lora", classify_recipe(tmp_path, tiny_bert), "-o", out).code == 0
    meta = yaml.safe_load((out / "README.md").read_text().removeprefix("---\n").partition("\n---\n")[0])
    assert meta["library_name"] == "peft" and meta["tags"] == ["tunekit", "classify", "lora"]
    merged = cli("merge", out)
    assert merged.code == 0, merged.err
    assert merged.last_line == str(out / "merged")
    adapter_model, tokenizer = load_run_model(out, AutoModelForSequenceClassification)
    plain = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    batch = AutoTokenizer.from_pretrained(out / "merged")(
        ["a fine film", "a dull, plodding mess of a movie"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = adapter_model.eval()(**batch).logits
        got = plain(**batch).logits
    exact = got.dtype == torch.float32  # on a GPU the frozen base, and so the merged model, is bf16
    assert torch.allclose(expected, got, atol=1e-4 if exact else 2e-3, rtol=0 if exact else 1e-2), (expected, got)
    again = cli("eval", out, "--data", write(tmp_path / "d.tsv", "sentence\tlabel\ngood\t1\nbad\t0\n"))
    assert again.code == 0 and "accuracy" in json.loads(again.last_line)
    assert cli("merge", out).code == 2  # the output folder exists now


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_other_adapters_train(tmp_path, tiny_bert, cli, method):
    out = tmp_path / "run"
    result = cli("classify", classify_recipe(tmp_path, tiny_bert, peft=method), "-o", out)
    assert result.code == 0, result.err
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == ("IA3" if method == "ia3" else "LORA")
    assert config.get("use_dora", False) == (method == "dora")


def test_qlora_4bit_sft_runs_on_this_device(tmp_path, tiny_gpt, cli):
    out = tmp_path / "run"
    recipe = write(tmp_path / "s.yaml", f"""\
method: sft
model:
  name: {tiny_gpt}
data:
  train: {SHARED}/alpaca/alpaca_data_1k.json
  train_limit: 40
  eval_size: 8
peft:
  method: lora
  quantize: 4bit
train:
  max_steps: 4
  per_device_train_batch_size: 4
  learning_rate: 5.0e-3
  logging_steps: 1
  save_strategy: "no"
""")
    result = cli("sft", recipe, "-o", out)
    assert result.code == 0, result.err
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["loss"] < metrics["loss_before"]
    base_config = json.loads((out / "adapter" / "config.json").read_text())
    assert base_config["quantization_config"]["load_in_4bit"] is True


def test_quantize_without_adapter_is_refused(tmp_path, tiny_bert, cli):
    result = cli("classify", classify_recipe(tmp_path, tiny_bert, peft="none"), "--set", "peft.quantize=4bit", "--dry-run")
    assert result.code == 2 and "peft.quantize needs an adapter" in result.err


def test_qlora_evaluates_layers_of_any_width(tmp_path, tiny_gpt, cli):
    """bitsandbytes' CPU fast path for 4-bit evaluation needs widths in multiples of 32/64; an MLP of
    96 (in_features of down_proj) must still evaluate."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_gpt)
    config.intermediate_size = 96
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "odd")
    AutoTokenizer.from_pretrained(tiny_gpt).save_pretrained(tmp_path / "odd")
    recipe = write(tmp_path / "s.yaml", f"""\
method: sft
model:
  name: {tmp_path / "odd"}
data:
  train: {SHARED}/alpaca/alpaca_data_1k.json
  train_limit: 16
  eval_size: 4
peft:
  method: lora
  quantize: 4bit
train:
  max_steps: 1
  per_device_train_batch_size: 4
  save_strategy: "no"
""")
    result = cli("sft", recipe, "-o", tmp_path / "run")
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["loss"] > 0


def test_4bit_training_forward_is_unchanged_by_an_evaluation(tiny_gpt):
    """bitsandbytes' CPU fast path repacks 4-bit weights in place during evaluation; training after
    it (SFT evaluates before training) must compute with the same weights as before."""
    from transformers import AutoModelForCausalLM

    from tunekit.config import ModelSection, PeftSection
    from tunekit.models import load_for_training

    model = load_for_training(AutoModelForCausalLM, ModelSection(name=str(tiny_gpt)),
                              PeftSection(method="lora", quantize="4bit"), "CAUSAL_LM")
    ids = torch.randint(5, 500, (2, 12))
    model.train()
    before = model(input_ids=ids).logits.detach()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    assert torch.equal(model(input_ids=ids).logits.detach(), before)
