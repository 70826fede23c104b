"""`tunekit dpo`: Direct Preference Optimisation of a causal LM on preference pairs, on TRL's
DPOTrainer, with no reward model: the loss is -log sigmoid(beta * (log-ratio of chosen - log-ratio
of rejected)), each log-ratio taken against a frozen reference model.

The reference is the starting model: with an adapter (peft.method) it is the same network with the
adapter switched off, so no second copy is held; with full fine-tuning it is a frozen copy taken
before training. Long prompts keep their end (whole turns are dropped from the start), so the last
question and both answers survive truncation. eval.json reports, on the held-out pairs, the
implicit reward accuracy (beta * log-ratio of chosen above rejected) and the mean reward margin.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import Field

from tunekit.config import Section
from tunekit.data.preference import PreferenceData, Preferences, Side, load_preferences, longer_wins
from tunekit.generation import ChatRecipe
from tunekit.jsontypes import Metrics
from tunekit.method import Method, Setup
from tunekit.train_section import CHECKPOINTS, TrainSection

RESERVED = {
    "chat_template_path": "use model.chat_template",
    "truncation_mode": "tunekit keeps the end of long prompts itself (dpo.max_prompt_length)",
}


def arguments() -> type:
    from trl import DPOConfig

    return DPOConfig


class DpoTask(Section):
    max_prompt_length: int | None = Field(
        None, gt=0, description="longer prompts keep their last tokens (whole turns first); default: half of data.max_length")


# `train:` defaults of `tunekit dpo` (the user's values win)
TRAIN_DEFAULTS = {
    "learning_rate": 1e-6,  # full fine-tuning; an adapter wants ~1e-4
    "num_train_epochs": 1, "warmup_steps": 0.05, "beta": 0.1, "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16, "logging_steps": 10, **CHECKPOINTS,
}


class Config(ChatRecipe):
    """A DPO recipe: a causal LM, preference pairs and the prompt budget."""

    train_section = TrainSection(arguments=arguments, defaults=TRAIN_DEFAULTS, reserved=RESERVED,
                                 from_data=("max_length",))
    data: PreferenceData
    dpo: DpoTask = DpoTask()


def check(config: Config) -> Preferences:
    """Read and validate the preference pairs (no model is loaded)."""
    return load_preferences(config.data, config.source)


# ---------------------------------------------------------------------------------------------
# Data for DPOTrainer: prompt / chosen / rejected, the prompt shortened from its start


def token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def keep_end(tokenizer: Any, text: str, budget: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= budget else tokenizer.decode(ids[-budget:])


def trim_prompt(tokenizer: Any, prompt: Side, budget: int) -> Side:
    """The prompt in at most `budget` tokens, keeping its end: a text loses its first tokens; a
    conversation loses whole turns from the start, then the start of its first remaining message."""
    if isinstance(prompt, str):
        return keep_end(tokenizer, prompt, budget)

    def length(messages: list[dict[str, str]]) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) if messages else ""
        return token_count(tokenizer, text)

    messages = list(prompt)
    while len(messages) > 1 and length(messages) > budget:
        messages = messages[1:]
    excess = length(messages) - budget
    if messages and excess > 0:
        content = messages[0]["content"]
        keep = max(token_count(tokenizer, content) - excess, 1)
        messages[0] = {**messages[0], "content": keep_end(tokenizer, content, keep)}
    return messages


def trl_rows(tokenizer: Any, preferences: Any, budget: int) -> list[dict[str, Any]]:
    return [{"prompt": trim_prompt(tokenizer, p.prompt, budget), "chosen": p.chosen, "rejected": p.rejected}
            for p in preferences.pairs]


# ---------------------------------------------------------------------------------------------
# Training


def load_models(config: Config) -> tuple[Any, Any, Any]:
    """Policy, reference (None with an adapter: the adapter is switched off instead) and tokenizer."""
    from tunekit.models import load_causal_lm

    model, tokenizer = load_causal_lm(config.model, config.peft)
    reference = None
    if not hasattr(model, "peft_config"):
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    return model, reference, tokenizer


def setup(config: Config, data: Preferences, run: Any) -> Any:
    from datasets import Dataset

    from tunekit.training import batch_info, trainer_fit, training_arguments
    from tunekit.upstream import LeanDPOTrainer

    args = training_arguments(config, run)
    model, reference, tokenizer = load_models(config)
    budget = config.dpo.max_prompt_length or args.max_length // 2
    train = Dataset.from_list(trl_rows(tokenizer, data.train, budget))
    held_out = Dataset.from_list(trl_rows(tokenizer, data.eval, budget)) if data.eval else None

    def make_trainer(callbacks: list[Any]) -> Any:
        return LeanDPOTrainer(model=model, ref_model=reference, args=args, train_dataset=train, eval_dataset=held_out,
                              processing_class=tokenizer, callbacks=callbacks)

    def evaluate(trainer: Any) -> Metrics:
        if held_out is None:
            return {}
        return {**reward_metrics(trainer), "baseline_longer_wins": longer_wins(data.eval)}

    info = {"train_data": config.data.train,
            "eval_data": config.data.eval or (f"last {config.data.eval_size} rows" if data.eval else None),
            "train_rows": len(train), "eval_rows": len(held_out) if held_out is not None else 0, **batch_info(args),
            "data_format": data.train.kind,
            "reference": "the base model, adapter off" if reference is None else "a frozen copy of the base model"}
    return Setup(model, tokenizer, info, trainer_fit(make_trainer), evaluate)


# ---------------------------------------------------------------------------------------------
# Held-out figures, pair by pair (TRL's own eval averages per-batch means)


def reward_metrics(trainer: Any) -> dict[str, float]:
    """DPO's implicit rewards beta * (log pi - log pi_ref) on the held-out pairs: the share of pairs
    whose chosen reward is higher (accuracy), the mean margin, the mean rewards and the DPO loss."""
    import contextlib

    import torch
    import torch.nn.functional as F

    from tunekit.upstream import completion_logps

    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    reference = trainer.ref_model if trainer.ref_model is not None else model
    beta, device = trainer.args.beta, trainer.args.device
    chosen, rejected = [], []
    with torch.inference_mode():
        for batch in trainer.get_eval_dataloader():
            batch = {k: v.to(device) for k, v in batch.items() if hasattr(v, "to")}
            policy = completion_logps(model, batch)
            adapter_off = model.disable_adapter() if trainer.ref_model is None else contextlib.nullcontext()
            with adapter_off:
                ref = completion_logps(reference, batch)
            rewards = (beta * (policy - ref)).float().cpu()
            c, r = rewards.chunk(2)
            chosen += c.tolist()
            rejected += r.tolist()
    margins = torch.tensor(chosen) - torch.tensor(rejected)
    return {
        "reward_accuracy": float((margins > 0).float().mean()),
        "reward_margin": float(margins.mean()),
        "reward_chosen": sum(chosen) / len(chosen),
        "reward_rejected": sum(rejected) / len(rejected),
        "loss": float(-F.logsigmoid(margins).mean()),
        "pairs": len(chosen),
    }


def eval_run(run_dir: Path, data_file: str) -> dict[str, float]:
    from tunekit.errors import UserError

    raise UserError(f"{run_dir}: `tunekit eval` of a dpo run is not supported; its held-out figures are in eval.json")


def predict_run(run_dir: Path, data_file: str) -> list[dict[str, Any]]:
    from tunekit.errors import UserError

    raise UserError(f"{run_dir}: a dpo run is a causal LM; use `tunekit generate {run_dir} --data FILE`")


METHOD = Method("dpo", "Tune a causal LM directly on preference pairs with DPO (no reward model).", Config, check,
                setup, task=lambda config: "causal-lm", loss_units="DPO loss, nats", eval_run=eval_run,
                predict_run=predict_run)
