"""`tunekit reward`: a reward model learns to score the preferred response of each pair higher, on
TRL's RewardTrainer (pairwise Bradley-Terry loss, -log sigmoid(r_chosen - r_rejected)).

The model is a sequence-classification head with one output: on a causal LM it reads the last token
(the EOS that tunekit appends), on an encoder such as MiniLM the [CLS] pooler. tunekit tokenizes
the pairs itself, the same way `score_texts` does at scoring time: the end of a long text is kept
(the final assistant turn of a dialogue), and an encoder, which has no EOS, gets its own [CLS] ...
[SEP] instead of the EOS that RewardTrainer would append as text. eval.json reports pairwise
accuracy (the share of held-out pairs whose chosen response scores higher) and the mean margin.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tunekit.config import Recipe, load_run_config
from tunekit.data.preference import PreferenceData, Preferences, full_text, load_preferences, longer_wins
from tunekit.errors import UserError
from tunekit.jsontypes import Metrics
from tunekit.method import Method, Setup
from tunekit.rl.reward_scores import encode, score_ids, score_texts
from tunekit.train_section import CHECKPOINTS, TrainSection

RESERVED = {
    "chat_template_path": "use model.chat_template",
    "eos_token": "tunekit appends the tokenizer's own EOS (none for encoders)",
}


def arguments() -> type:
    from trl import RewardConfig

    return RewardConfig


# `train:` defaults of `tunekit reward` (the user's values win)
TRAIN_DEFAULTS = {
    "learning_rate": 5e-5, "num_train_epochs": 1, "weight_decay": 0.01, "warmup_steps": 0.05,
    "per_device_train_batch_size": 16, "per_device_eval_batch_size": 64,
    "logging_steps": 10, **CHECKPOINTS,
}


class Config(Recipe):
    """A reward-model recipe: a model with a one-output head and preference pairs."""

    train_section = TrainSection(arguments=arguments, defaults=TRAIN_DEFAULTS, reserved=RESERVED,
                                 from_data=("max_length",))
    data: PreferenceData


def check(config: Config) -> Preferences:
    """Read and validate the preference pairs (no model is loaded)."""
    return load_preferences(config.data, config.source)


# ---------------------------------------------------------------------------------------------
# Tokenizing (the same way tunekit.rl.reward_scores scores at PPO time)


def encode_pairs(tokenizer: Any, pairs: Any, max_length: int) -> list[dict[str, list[int]]]:
    """RewardTrainer's pre-tokenized layout: chosen_ids / rejected_ids (it adds nothing to these)."""
    return [
        {"chosen_ids": encode(tokenizer, full_text(tokenizer, p.prompt, p.chosen), max_length),
         "rejected_ids": encode(tokenizer, full_text(tokenizer, p.prompt, p.rejected), max_length)}
        for p in pairs.pairs
    ]


def pair_metrics(model: Any, tokenizer: Any, pairs: Any, max_length: int, batch_size: int) -> dict[str, float]:
    """Pairwise accuracy (chosen scores strictly higher), mean margin and Bradley-Terry loss, with
    the trivial "the longer response wins" baseline beside them."""
    encoded = encode_pairs(tokenizer, pairs, max_length)
    ids = [e["chosen_ids"] for e in encoded] + [e["rejected_ids"] for e in encoded]
    scores = score_ids(model, tokenizer.pad_token_id, ids, batch_size)
    n = len(encoded)
    margins = [c - r for c, r in zip(scores[:n], scores[n:])]
    return {
        "accuracy": sum(m > 0 for m in margins) / n,
        "margin": sum(margins) / n,
        "loss": sum(softplus(-m) for m in margins) / n,
        "reward_chosen": sum(scores[:n]) / n,
        "reward_rejected": sum(scores[n:]) / n,
        "pairs": n,
        "baseline_longer_wins": longer_wins(pairs),
    }


def softplus(x: float) -> float:
    """log(1 + e^x) without overflow: -log sigmoid(m) = softplus(-m)."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


# ---------------------------------------------------------------------------------------------
# Training


def load_model_and_tokenizer(config: Config, conversational: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification

    from tunekit.data.chat import ensure_chat_template
    from tunekit.models import load_for_training, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    if conversational and tokenizer.eos_token is not None:  # a causal LM renders conversations with its template
        ensure_chat_template(tokenizer, config.model.chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.truncation_side = "left"  # saved with the model: whoever scores with it keeps the end too
    model = load_for_training(AutoModelForSequenceClassification, config.model, config.peft, "SEQ_CLS",
                              heads=("classifier", "score"), num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id  # the causal-LM head finds the last token by it
    return model, tokenizer


def setup(config: Config, data: Preferences, run: Any) -> Any:
    from datasets import Dataset
    from trl import RewardTrainer

    from tunekit.training import batch_info, trainer_fit, training_arguments

    args = training_arguments(config, run)
    model, tokenizer = load_model_and_tokenizer(config, data.train.pairs[0].conversational)
    train = Dataset.from_list(encode_pairs(tokenizer, data.train, args.max_length))
    held_out = Dataset.from_list(encode_pairs(tokenizer, data.eval, args.max_length)) if data.eval else None

    def make_trainer(callbacks: list[Any]) -> Any:
        return RewardTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                             processing_class=tokenizer, callbacks=callbacks)

    def evaluate(trainer: Any) -> Metrics:
        if not data.eval:
            return {}
        return pair_metrics(trainer.model, tokenizer, data.eval, args.max_length, args.per_device_eval_batch_size)

    info = {"train_data": config.data.train,
            "eval_data": config.data.eval or (f"last {config.data.eval_size} rows" if data.eval else None),
            "train_rows": len(train), "eval_rows": len(held_out) if held_out is not None else 0, **batch_info(args),
            "data_format": data.train.kind}
    return Setup(model, tokenizer, info, trainer_fit(make_trainer), evaluate)


# ---------------------------------------------------------------------------------------------
# Using a finished run: `tunekit eval` (pairs) and `tunekit predict` (a reward per row)

PREDICT_TEXT_COLUMNS = ("text", "sentence", "response", "completion")


def run_config(run_dir: Path) -> Config:
    return load_run_config(Config, run_dir)


def load_run(run_dir: Path) -> tuple[Any, Any]:
    """A reward run's model (`model/` or `adapter/` on its base) and tokenizer."""
    from transformers import AutoModelForSequenceClassification

    from tunekit.models import load_run_model

    return load_run_model(run_dir, AutoModelForSequenceClassification)


def eval_run(run_dir: Path, data_file: str) -> dict[str, float]:
    """Pairwise accuracy and margin of a reward run on another preference file (same layout options)."""
    from tunekit.data.preference import detect_format, read_pairs
    from tunekit.data.tables import read_table

    config = run_config(run_dir)
    table = read_table(data_file, "--data")
    pairs = read_pairs(table, detect_format(table, config.data.format), config.data, None)
    model, tokenizer = load_run(run_dir)
    return pair_metrics(model, tokenizer, pairs, config.args.max_length, config.args.per_device_eval_batch_size)


def predict_run(run_dir: Path, data_file: str) -> list[dict[str, Any]]:
    """A `reward` for every row: a conversation (`messages`), a `prompt` with a response
    (`completion` or `response`), or a text column alone (text, sentence)."""
    from tunekit.data.masking import check_messages
    from tunekit.data.tables import pick_column, read_table

    config = run_config(run_dir)
    table = read_table(data_file, "--data")
    model, tokenizer = load_run(run_dir)
    texts = []
    for i, row in enumerate(table.rows):
        if "messages" in table.columns:
            texts.append(full_text(tokenizer, [], check_messages(row.get("messages"), table.where(i))))
            continue
        column = pick_column(table, None, PREDICT_TEXT_COLUMNS, "--data (a text column)")
        response = row.get(column)
        if not isinstance(response, (str, list)):
            raise UserError(f"{table.where(i)}: {column!r} is missing or not text")
        texts.append(full_text(tokenizer, row.get("prompt") or ([] if isinstance(response, list) else ""), response))
    scores = score_texts(model, tokenizer, texts, config.args.per_device_eval_batch_size, config.args.max_length)
    return [{"reward": round(score, 6)} for score in scores]


METHOD = Method("reward", "Train a reward model on preference pairs (chosen scores above rejected: Bradley-Terry loss).",
                Config, check, setup, task=lambda config: "sequence-classification",
                loss_units="−log σ(chosen − rejected), nats", eval_run=eval_run, predict_run=predict_run)
