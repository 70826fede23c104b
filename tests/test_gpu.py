"""CUDA-only checks (marked `gpu`, skipped without CUDA): bf16 SFT on packed rows, QLoRA with
bitsandbytes 4-bit layers on the GPU, LoRA PPO on the GPU, and the attention kernel that packed rows
get. Self-contained (a tokenizer trained on synthetic text, tiny models from configs), so they run
on a GPU machine that has neither the shared datasets nor the MiniLM package."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import write

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """(tiny Llama folder with tokenizer, prompt/completion jsonl, stand-in reward run folder)."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from tunekit.data.chat import train_tokenizer

    root = tmp_path_factory.mktemp("gpu")
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghij", k=rng.randint(2, 6))) for _ in range(300)]
    rows = [{"prompt": " ".join(rng.choices(words, k=rng.randint(3, 20))),
             "completion": " ".join(rng.choices(words, k=rng.randint(3, 40)))} for _ in range(64)]
    data = write(root / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = train_tokenizer([r["prompt"] + " " + r["completion"] for r in rows], vocab_size=400)
    fields = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**fields)).save_pretrained(root / "gpt")
    tokenizer.save_pretrained(root / "gpt")
    reward = root / "reward"
    AutoModelForSequenceClassification.from_config(LlamaConfig(**fields, num_labels=1)).save_pretrained(reward / "model")
    tokenizer.save_pretrained(reward / "model")
    write(reward / "run.json", json.dumps({"method": "reward", "status": "done"}))
    write(reward / "config.yaml", f"method: reward\nmodel:\n  name: {root / 'gpt'}\n")
    return root / "gpt", data, reward


def sft_recipe(tmp_path, gpt, data, peft=""):
    return write(tmp_path / "sft.yaml", f"""\
method: sft
model:
  name: {gpt}
data:
  train: {data}
  eval_size: 8
  max_length: 128
{peft}train:
  max_steps: 6
  per_device_train_batch_size: 4
  packing: true
  learning_rate: 1.0e-3
  logging_steps: 1
  save_strategy: "no"
""")


def losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_sft_bf16_on_packed_rows(tmp_path, cli, synthetic):
    from safetensors.torch import load_file

    gpt, data, _ = synthetic
    out = tmp_path / "run"
    result = cli("sft", sft_recipe(tmp_path, gpt, data), "-o", out)
    assert result.code == 0, result.err
    assert "bf16: true" in (out / "config.yaml").read_text()  # the GPU default: bf16 autocast
    trained = losses(out)
    assert all(math.isfinite(x) for x in trained) and trained[-1] < trained[0]
    weights = load_file(out / "model" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}  # fp32 master weights, not pure bf16


def test_qlora_trains_4bit_layers_on_the_gpu(tmp_path, cli, synthetic, monkeypatch):
    import bitsandbytes as bnb

    from tunekit import models

    gpt, data, _ = synthetic
    seen = {}
    original = models.load_causal_lm

    def spy(section, peft):
        model, tokenizer = original(section, peft)
        seen["4bit"] = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        return model, tokenizer

    monkeypatch.setattr(models, "load_causal_lm", spy)
    out = tmp_path / "run"
    result = cli("lora", sft_recipe(tmp_path, gpt, data, "peft:\n  method: lora\n  quantize: 4bit\n"), "-o", out)
    assert result.code == 0, result.err
    assert seen["4bit"] and all(m.weight.device.type == "cuda" for m in seen["4bit"])
    assert all(math.isfinite(x) for x in losses(out))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_lora_ppo_on_the_gpu(tmp_path, cli, synthetic, monkeypatch):
    from tunekit.rl.ppo import PPOTrainer

    gpt, data, reward = synthetic
    devices = set()
    original = PPOTrainer.ppo_step

    def spy(self, prompts):
        devices.update(p.device.type for p in self.model.parameters())
        return original(self, prompts)

    monkeypatch.setattr(PPOTrainer, "ppo_step", spy)
    recipe = write(tmp_path / "rlhf.yaml", f"""\
method: rlhf
model:
  name: {gpt}
data:
  train: {data}
  eval_size: 8
rlhf:
  reward_model: {reward}
peft:
  method: lora
ppo:
  steps: 2
  rollout_batch_size: 8
  minibatch_size: 4
generation:
  max_new_tokens: 8
train:
  logging_steps: 1
""")
    out = tmp_path / "run"
    result = cli("rlhf", recipe, "-o", out)
    assert result.code == 0, result.err
    metrics = json.loads((out / "eval.json").read_text())
    assert all(math.isfinite(v) for v in metrics.values())
    assert devices == {"cuda"}


def test_packed_rows_run_on_the_memory_efficient_kernel(synthetic):
    """tunekit's packed rows (position ids that restart, no attention mask) make transformers pass a
    block-diagonal mask to SDPA, which rules the flash kernel out; the memory-efficient kernel must
    take it (else torch falls back to the math kernel, which materialises every score)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AutoModelForCausalLM

    from tunekit.methods.sft import PackedRows
    from tunekit.models import SAVED_MODEL

    gpt, _, _ = synthetic
    model = AutoModelForCausalLM.from_pretrained(gpt, attn_implementation="sdpa", **SAVED_MODEL).cuda()
    rows = [{"input_ids": [5] * 100, "labels": [5] * 100, "seq_lengths": [40, 60]},
            {"input_ids": [6] * 128, "labels": [6] * 128, "seq_lengths": [128]}]
    batch = {k: v.cuda() for k, v in PackedRows(0)(rows).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    assert math.isfinite(float(loss))
