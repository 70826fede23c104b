"""DPO: long prompts keep their end, the reference is the base model (adapter off, or a frozen copy),
held-out reward accuracy and margins land in eval.json, bad data is one line with exit code 2."""

from __future__ import annotations

import json
import math

import pytest
from conftest import SHARED, write

HH = SHARED / "hh_rlhf" / "helpful-base_test.jsonl.gz"


@pytest.fixture(scope="module")
def tokenizer(tiny_gpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_gpt)


def test_long_prompts_keep_their_last_turns(tokenizer):
    from tunekit.methods.dpo import token_count, trim_prompt

    turns = [{"role": r, "content": f"turn {i} " + "words " * 20} for i, r in enumerate(["user", "assistant"] * 3)]
    prompt = turns[:-1]  # ends with a user turn

    def length(messages):
        return token_count(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    assert trim_prompt(tokenizer, prompt, length(prompt)) == prompt
    assert trim_prompt(tokenizer, prompt, length(prompt[-2:])) == prompt[-2:]  # whole turns dropped from the start
    assert trim_prompt(tokenizer, prompt, length(prompt[-2:]) + 3) == prompt[-2:]
    short = trim_prompt(tokenizer, prompt[-1:], 10)  # one message over budget: its start is cut
    assert short[0]["content"].endswith("words ") and len(short[0]["content"]) < len(prompt[-1]["content"])
    text = "one two three four five six"
    assert text.endswith(trim_prompt(tokenizer, text, 3)) and token_count(tokenizer, trim_prompt(tokenizer, text, 3)) == 3


def dpo_recipe(tmp_path, model, train, peft="none", **data):
    body = "".join(f"  {k}: {v}\n" for k, v in data.items())
    return write(tmp_path / "dpo.yaml", f"""\
method: dpo
model:
  name: {model}
data:
  train: {train}
  max_length: 96
{body}peft:
  method: {peft}
  r: 4
train:
  max_steps: 3
  per_device_train_batch_size: 4
  per_device_eval_batch_size: 4
  learning_rate: 5.0e-3
  logging_steps: 1
  save_strategy: "no"
""")


@pytest.mark.parametrize("peft", ["lora", "none"])
def test_few_step_dpo_reports_held_out_reward_accuracy(tmp_path, cli, tiny_gpt, peft):
    out = tmp_path / "run"
    recipe = dpo_recipe(tmp_path, tiny_gpt, HH, peft=peft, eval_size=354, train_limit=12, eval_limit=6)
    result = cli("dpo", recipe, "-o", out)
    assert result.code == 0, result.err
    assert result.last_line == str(out)
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["pairs"] == 6 and 0 <= metrics["reward_accuracy"] <= 1
    assert math.isfinite(metrics["reward_margin"]) and metrics["reward_margin"] != 0  # the policy moved off the reference
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("rewards/accuracies" in r for r in logged) == 3
    info = json.loads((out / "run.json").read_text())
    folder = "adapter" if peft == "lora" else "model"
    assert (out / folder).is_dir() and info["method"] == "dpo"
    assert info["reference"] == ("the base model, adapter off" if peft == "lora" else "a frozen copy of the base model")


def test_adapter_off_is_the_base_model(tmp_path, tiny_gpt):
    """With an adapter, DPO's reference log-probabilities are the untouched base model's."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunekit.config import load_config
    from tunekit.methods import dpo
    from tunekit.upstream import completion_logps

    config = load_config(dpo.Config, str(dpo_recipe(tmp_path, tiny_gpt, HH, peft="lora", train_limit=4)))
    model, reference, tokenizer = dpo.load_models(config)
    assert reference is None
    with torch.no_grad():  # move the adapter off zero, as training would
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.05)
    ids = tokenizer("<|user|>\nHello<|end|>\n<|assistant|>\nHi.<|end|>", return_tensors="pt")["input_ids"]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.ones_like(ids)}
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt).eval()
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            off = completion_logps(model, batch)
        on = completion_logps(model, batch)
        expected = completion_logps(base, batch)
    assert torch.allclose(off, expected, atol=1e-5) and not torch.allclose(on, expected, atol=1e-3)


def test_bad_dpo_data_is_exit_2(tmp_path, cli, tiny_gpt):
    data = write(tmp_path / "p.jsonl", '{"prompt": "Q", "chosen": "", "rejected": "no"}\n')
    result = cli("dpo", dpo_recipe(tmp_path, tiny_gpt, data), "--dry-run")
    assert result.code == 2 and "p.jsonl: line 1: 'chosen' is empty" in result.err
    assert result.err.count("\n") == 1


@pytest.mark.parametrize("peft", ["lora", "none"])
def test_lean_step_gives_trl_loss(tmp_path, tiny_gpt, peft):
    """tunekit's DPO step (log-probabilities from plain logits) equals TRL's fused-head step."""
    import torch
    from datasets import Dataset
    from trl import DPOTrainer

    from tunekit.config import load_config
    from tunekit.methods import dpo
    from tunekit.runs.folder import RunFolder
    from tunekit.training import training_arguments
    from tunekit.upstream import LeanDPOTrainer

    config = load_config(dpo.Config, str(dpo_recipe(tmp_path, tiny_gpt, HH, peft=peft, train_limit=4)))
    data = dpo.check(config)
    model, reference, tokenizer = dpo.load_models(config)
    with torch.no_grad():  # a policy away from its reference, so that the loss is not log 2
        for name, param in model.named_parameters():
            if ("lora_B" in name) or (peft == "none" and name.endswith("q_proj.weight")):
                param.add_(0.02)
    rows = Dataset.from_list(dpo.trl_rows(tokenizer, data.train, 48))
    args = training_arguments(config, RunFolder(tmp_path / "run"))
    lean = LeanDPOTrainer(model=model, ref_model=reference, args=args, train_dataset=rows, processing_class=tokenizer)
    batch = next(iter(lean.get_train_dataloader()))
    with torch.no_grad():
        ours = lean.compute_loss(model, dict(batch)).item()
        theirs = DPOTrainer._compute_loss(lean, model, dict(batch), False).item()
    assert ours != pytest.approx(math.log(2), abs=1e-4)
    assert ours == pytest.approx(theirs, abs=1e-5)
