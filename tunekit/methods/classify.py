"""`tunekit classify`: a sequence-classification (or regression) head on an encoder, BERT style.

Single sentences or sentence pairs; padding per batch (never to a fixed length) and batches of
similar length, because GLUE sentences are short and padding them to 128 wastes most of the compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from tunekit.config import Recipe, Section
from tunekit.data.halves import SPLIT_HALF_HELP, SplitHalf, half_of
from tunekit.data.tables import Table, pick_column, read_table
from tunekit.errors import UserError
from tunekit.method import Method, Setup
from tunekit.train_section import CHECKPOINTS, TrainSection

TEXT_COLUMNS = ("sentence", "text", "sentence1", "premise", "question")
PAIR_COLUMNS = {"sentence1": "sentence2", "premise": "hypothesis", "question": "sentence"}


class ClassifyData(Section):
    train: str = Field(description="training file (jsonl/json/csv/tsv/parquet) or Hub dataset")
    eval: str | None = Field(None, description="evaluation file; eval.json is computed on it")
    text_column: str | None = Field(None, description=f"first text; default: the first of {', '.join(TEXT_COLUMNS)}")
    text_pair_column: str | None = Field(None, description="second text of a pair; default: sentence2 after sentence1")
    label_column: str = Field("label", description="label column: ints, strings, or floats for regression")
    train_limit: int | None = Field(None, gt=0, description="use the first N training rows")
    split_half: SplitHalf | None = Field(None, description=SPLIT_HALF_HELP + " (the text column's)")
    eval_limit: int | None = Field(None, gt=0, description="use the first N evaluation rows")
    max_length: int = Field(128, gt=0, description="truncate longer inputs (tokens)")


class ClassifyTask(Section):
    num_labels: int | None = Field(None, gt=0, description="classes; 1 = regression; default: from the data")
    labels: list[str] | None = Field(None, description="class names in id order (maps string labels, names int ones)")


@dataclass
class Examples:
    """Texts and label ids of one split, checked."""

    table: Table
    texts: list[str]
    pairs: list[str] | None
    labels: list[Any]


@dataclass
class Data:
    train: Examples
    eval: Examples | None
    label_names: list[str] | None  # None = regression


# `train:` defaults of `tunekit classify` (the user's values win)
TRAIN_DEFAULTS = {
    "learning_rate": 5e-5, "num_train_epochs": 3, "weight_decay": 0.01,
    "warmup_steps": 0.06,  # a float below 1 is a share of the steps
    "per_device_train_batch_size": 32, "per_device_eval_batch_size": 128,
    "train_sampling_strategy": "group_by_length", "logging_steps": 50, **CHECKPOINTS,
}


class Config(Recipe):
    """A classification recipe: an encoder, sentences (or pairs) with labels, the head's classes."""

    train_section = TrainSection(defaults=TRAIN_DEFAULTS)
    data: ClassifyData
    classify: ClassifyTask = ClassifyTask()


def check(config: Config) -> Data:
    """Read and validate the data (no model is loaded)."""
    train_table = read_table(config.data.train, "data.train")
    if config.data.split_half:
        text = pick_column(train_table, config.data.text_column, TEXT_COLUMNS, "data.text_column")
        train_table = half_of(train_table, config.data.split_half, text)
    train_table = train_table.head(config.data.train_limit)
    regression = config.classify.num_labels == 1
    train = examples(train_table, config)
    names = None if regression else label_names(train.labels, config)
    train.labels = encode_labels(train, names)
    evaluation = None
    if config.data.eval:
        eval_table = read_table(config.data.eval, "data.eval").head(config.data.eval_limit)
        evaluation = examples(eval_table, config)
        evaluation.labels = encode_labels(evaluation, names)
    return Data(train, evaluation, names)


def examples(table: Table, config: Config, with_labels: bool = True) -> Examples:
    text = pick_column(table, config.data.text_column, TEXT_COLUMNS, "data.text_column")
    pair = config.data.text_pair_column
    if pair is None and PAIR_COLUMNS.get(text) in table.columns:
        pair = PAIR_COLUMNS[text]
    columns = [text] + ([pair] if pair else []) + ([config.data.label_column] if with_labels else [])
    table.require(*columns, key="data")
    for column in [text] + ([pair] if pair else []):
        for i, row in enumerate(table.rows):
            if not isinstance(row[column], str):
                raise UserError(f"{table.where(i)}: {column!r} must be text, got {row[column]!r}")
    regression = config.classify.num_labels == 1
    values = table.column(config.data.label_column) if with_labels else []
    labels = [raw_label(table, i, value, regression) for i, value in enumerate(values)]
    return Examples(table, table.column(text), table.column(pair) if pair else None, labels)


def raw_label(table: Table, index: int, value: Any, regression: bool) -> Any:
    """An int, a string, or (regression) a float; anything else is an error naming the line."""
    if regression:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{table.where(index)}: label {value!r} is not a number (classify.num_labels: 1 means regression)") from None
    if isinstance(value, bool) or not isinstance(value, (int, str, float)):
        raise UserError(f"{table.where(index)}: label {value!r} must be an int or a string")
    if isinstance(value, float):
        if not value.is_integer():
            raise UserError(f"{table.where(index)}: label {value!r} is not a class id; for regression set classify.num_labels: 1")
        return int(value)
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise UserError(f"{table.where(index)}: empty label")
        return int(value) if value.lstrip("-").isdigit() else value
    return value


def label_names(labels: list[Any], config: Config) -> list[str]:
    """Class names in id order: from the recipe, else 0..max for int labels, else sorted strings."""
    if config.classify.labels:
        return list(config.classify.labels)
    if all(isinstance(v, int) for v in labels):
        count = config.classify.num_labels or max(labels) + 1
        return [str(i) for i in range(max(count, 2))]
    if any(isinstance(v, int) for v in labels):
        raise UserError(f"{config.data.train}: labels mix numbers and names; use one kind, or list classify.labels")
    return sorted(set(labels))


def encode_labels(split: Examples, names: list[str] | None) -> list[Any]:
    if names is None:
        return split.labels
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for i, value in enumerate(split.labels):
        if isinstance(value, int):
            if not 0 <= value < len(names):
                raise UserError(f"{split.table.where(i)}: label {value} out of range 0..{len(names) - 1} ({len(names)} classes)")
            ids.append(value)
        elif value in index:
            ids.append(index[value])
        else:
            raise UserError(f"{split.table.where(i)}: unknown label {value!r} (known: {', '.join(names)}); add it to classify.labels")
    return ids


def tokenize(tokenizer: Any, split: Examples, max_length: int) -> list[dict[str, Any]]:
    encoded = tokenizer(split.texts, split.pairs, truncation=True, max_length=max_length)
    rows = [{k: encoded[k][i] for k in encoded} for i in range(len(split.texts))]
    for row, label in zip(rows, split.labels):  # no labels when predicting
        row["labels"] = label
    return rows


def load_model(config: Config, names: list[str] | None) -> Any:
    from transformers import AutoModelForSequenceClassification

    from tunekit.models import load_for_training

    if names is None:
        extra = {"num_labels": 1, "problem_type": "regression"}
    else:
        extra = {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
    return load_for_training(AutoModelForSequenceClassification, config.model, config.peft, "SEQ_CLS",
                             heads=("classifier", "score"), **extra)


def setup(config: Config, data: Data, run: Any) -> Any:
    from transformers import DataCollatorWithPadding, Trainer

    from tunekit.models import load_tokenizer
    from tunekit.training import batch_info, once, trainer_fit, training_arguments

    args = training_arguments(config, run)
    tokenizer = load_tokenizer(config.model)
    train = once(args, "train", lambda: tokenize(tokenizer, data.train, config.data.max_length))
    model = load_model(config, data.label_names)

    def make_trainer(callbacks: list[Any]) -> Any:
        return Trainer(
            model=model, args=args, train_dataset=train, processing_class=tokenizer,
            eval_dataset=tokenize(tokenizer, data.eval, config.data.max_length) if data.eval else None,
            compute_metrics=trainer_metrics(data.label_names is None),
            data_collator=DataCollatorWithPadding(tokenizer), callbacks=callbacks,
        )

    info = {"train_data": config.data.train, "eval_data": config.data.eval, "train_rows": len(train),
            "eval_rows": len(data.eval.texts) if data.eval else 0, **batch_info(args)}
    return Setup(model, tokenizer, info, trainer_fit(make_trainer),
                 lambda trainer: evaluate_model(model, tokenizer, data.eval, config) if data.eval else {},
                 trained_model=lambda trainer: model)


def trainer_metrics(regression: bool) -> Any:
    """compute_metrics for evaluations during training (train.eval_strategy), same figures as eval.json."""
    from tunekit.runs.metrics import classification_metrics, regression_metrics

    def compute(prediction: Any) -> dict[str, float]:
        scorer = regression_metrics if regression else classification_metrics
        return scorer(prediction.predictions, prediction.label_ids)

    return compute


def evaluate_model(model: Any, tokenizer: Any, split: Examples, config: Config) -> dict[str, float]:
    from tunekit.runs.metrics import classification_metrics, regression_metrics

    logits = predict_logits(model, tokenizer, split, config)
    if model.config.num_labels == 1:
        return regression_metrics(logits, split.labels)
    return {"loss": cross_entropy(logits, split.labels), **classification_metrics(logits, split.labels)}


def cross_entropy(logits: Any, labels: list[int]) -> float:
    """The held-out loss: mean cross-entropy of the true labels (what training minimises)."""
    import torch
    import torch.nn.functional as F

    return F.cross_entropy(torch.from_numpy(logits).double(), torch.tensor(labels)).item()


def predict_logits(model: Any, tokenizer: Any, split: Examples, config: Config) -> Any:
    """Logits for every example, batched by length (then put back in file order)."""
    import numpy as np
    import torch
    from transformers import DataCollatorWithPadding

    features = [{k: v for k, v in f.items() if k != "labels"} for f in tokenize(tokenizer, split, config.data.max_length)]
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    collate = DataCollatorWithPadding(tokenizer)
    batch_size = config.args.per_device_eval_batch_size
    device = next(model.parameters()).device
    model.eval()
    outputs = np.zeros((len(features), model.config.num_labels), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate([features[i] for i in chunk]).items()}
            outputs[chunk] = model(**batch).logits.float().cpu().numpy()
    return outputs


# ---------------------------------------------------------------------------------------------
# Using a finished run: `tunekit eval` and `tunekit predict`


def eval_run(run_dir: Path, data_file: str) -> dict[str, float]:
    from tunekit.models import load_finished_run

    config, model, tokenizer = load_finished_run(run_dir, Config)
    split = examples(read_table(data_file, "--data"), config)
    names = None if model.config.num_labels == 1 else [model.config.id2label[i] for i in range(model.config.num_labels)]
    split.labels = encode_labels(split, names)
    return evaluate_model(model, tokenizer, split, config)


def predict_run(run_dir: Path, data_file: str) -> list[dict[str, Any]]:
    """One prediction per input row: the label and its probability (or the value, for regression)."""
    import torch

    from tunekit.models import load_finished_run

    config, model, tokenizer = load_finished_run(run_dir, Config)
    split = examples(read_table(data_file, "--data"), config, with_labels=False)
    logits = torch.from_numpy(predict_logits(model, tokenizer, split, config))
    if model.config.num_labels == 1:
        return [{"prediction": float(v)} for v in logits[:, 0]]
    probs = logits.softmax(-1)
    best = probs.argmax(-1)
    return [
        {"label": model.config.id2label[int(b)], "score": round(float(p[b]), 6)}
        for b, p in zip(best, probs)
    ]


METHOD = Method("classify", "Fine-tune an encoder with a classification (or regression) head, BERT style.",
                Config, check, setup, task=lambda config: "sequence-classification",
                loss_units="cross-entropy, nats; MSE if regression", eval_run=eval_run, predict_run=predict_run)
