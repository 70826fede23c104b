"""`tunekit qa`: extractive question answering (SQuAD style) with a span head on an encoder, BERT style.

A question and its context go in as one pair, question first; contexts longer than the window are
cut into overlapping windows (only the context is truncated), and a window that does not hold the
whole answer is trained to point at the CLS token. At prediction time each question's answer is the
best-scoring span over all of its windows, mapped back to characters of the context.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from tunekit.config import Recipe, Section
from tunekit.data.tables import Splits, Table, read_table
from tunekit.errors import UserError
from tunekit.method import Method, Setup
from tunekit.train_section import CHECKPOINTS, TrainSection


class QAData(Section):
    train: str = Field(description="training file: official SQuAD JSON, or jsonl/csv/parquet with question, context, answers")
    eval: str | None = Field(None, description="evaluation file (same formats); eval.json holds exact_match and f1 on it")
    id_column: str = Field("id", description="question id column (flat files); default: the row's line number")
    question_column: str = Field("question", description="question column (flat files)")
    context_column: str = Field("context", description="context column (flat files)")
    answers_column: str = Field(
        "answers", description='answers column (flat files): {"text": [...], "answer_start": [...]}, or that as JSON text')
    train_limit: int | None = Field(None, gt=0, description="use the first N training questions (file order)")
    eval_limit: int | None = Field(None, gt=0, description="use the first N evaluation questions (file order)")
    max_length: int = Field(384, gt=0, description="window length in tokens (question + context + special tokens)")
    doc_stride: int = Field(128, gt=0, description="tokens of context shared by two consecutive windows")
    max_question_length: int = Field(64, gt=0, description="longer questions are cut to this many tokens")

    @model_validator(mode="after")
    def _room_for_context(self) -> QAData:
        room = self.max_length - self.max_question_length - 3  # [CLS] question [SEP] context [SEP]
        if room <= self.doc_stride:
            raise ValueError(
                f"doc_stride ({self.doc_stride}) must be below the context room of a window "
                f"({room} = max_length - max_question_length - 3); lower data.doc_stride or raise data.max_length")
        return self


class QATask(Section):
    n_best: int = Field(20, gt=0, description="start and end candidates per window considered for the best span")
    max_answer_length: int = Field(30, gt=0, description="longest answer span, in tokens")
    unanswerable: bool | None = Field(
        None, description="predict the empty answer when the null (CLS) score beats the best span; "
                          "default: on when the training data has unanswerable questions (SQuAD v2)")


# `train:` defaults of `tunekit qa` (the user's values win)
TRAIN_DEFAULTS = {
    "learning_rate": 5e-5, "num_train_epochs": 2, "weight_decay": 0.01,
    "warmup_steps": 0.1,  # a float below 1 is a share of the steps
    "per_device_train_batch_size": 16, "per_device_eval_batch_size": 64,
    "train_sampling_strategy": "group_by_length",  # windows of short contexts pad less together
    "logging_steps": 50, **CHECKPOINTS,
}


class Config(Recipe):
    """An extractive-QA recipe: an encoder, SQuAD-style questions, how contexts are windowed and answers picked."""

    train_section = TrainSection(defaults=TRAIN_DEFAULTS)
    data: QAData
    qa: QATask = QATask()


@dataclass
class Examples:
    """The questions of one split, checked: answers are (text, character start) pairs, [] = unanswerable."""

    table: Table
    ids: list[str]
    questions: list[str]
    contexts: list[str]
    answers: list[list[tuple[str, int]]] | None  # None when predicting


def check(config: Config) -> Splits[Examples]:
    """Read and validate the data (no model is loaded); settle qa.unanswerable from the training data."""
    train = examples(read_table(config.data.train, "data.train").head(config.data.train_limit), config)
    evaluation = None
    if config.data.eval:
        evaluation = examples(read_table(config.data.eval, "data.eval").head(config.data.eval_limit), config)
    if config.qa.unanswerable is None:
        config.qa.unanswerable = any(not answers for answers in train.answers)
    return Splits(train, evaluation)


def examples(table: Table, config: Config, with_answers: bool = True) -> Examples:
    data = config.data
    columns = [data.question_column, data.context_column] + ([data.answers_column] if with_answers else [])
    table.require(*columns, key="data")
    ids, questions, contexts, answers = [], [], [], []
    seen: set[str] = set()
    for i, row in enumerate(table.rows):
        qid = str(row[data.id_column]) if row.get(data.id_column) is not None else str(table.line(i))
        if qid in seen:
            raise UserError(f"{table.where(i)}: duplicate question id {qid!r}; ids must be unique (predictions are keyed by id)")
        seen.add(qid)
        question, context = row[data.question_column], row[data.context_column]
        if not isinstance(question, str) or not question.strip():
            raise UserError(f"{table.where(i)}: empty question (column {data.question_column!r})")
        if not isinstance(context, str) or not context.strip():
            raise UserError(f"{table.where(i)}: empty context (column {data.context_column!r})")
        ids.append(qid)
        questions.append(question.strip())  # some SQuAD questions start with runs of spaces
        contexts.append(context)
        if with_answers:
            impossible = row.get("is_impossible") is True
            answers.append([] if impossible else gold_answers(row[data.answers_column], table.where(i), data.answers_column, context))
    return Examples(table, ids, questions, contexts, answers if with_answers else None)


def gold_answers(value: Any, where: str, column: str, context: str) -> list[tuple[str, int]]:
    """The answers of one row, each checked against the context at its answer_start."""
    if isinstance(value, str):  # a CSV cell holds the answers as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise UserError(f"{where}: {column!r} is not JSON; expected {{\"text\": [...], \"answer_start\": [...]}}") from None
    if not isinstance(value, dict) or "text" not in value or "answer_start" not in value:
        raise UserError(f"{where}: {column!r} must be {{\"text\": [...], \"answer_start\": [...]}}, got {value!r}")
    texts, starts = value["text"], value["answer_start"]
    texts = texts if isinstance(texts, list) else [texts]
    starts = starts if isinstance(starts, list) else [starts]
    if len(texts) != len(starts):
        raise UserError(f"{where}: {len(texts)} answer texts but {len(starts)} answer_start values")
    for text, start in zip(texts, starts):
        if not isinstance(text, str) or not text:
            raise UserError(f"{where}: answer text {text!r} must be non-empty text (an unanswerable question has no answers)")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise UserError(f"{where}: answer_start {start!r} must be a character offset (an int >= 0)")
        if context[start : start + len(text)] != text:
            raise UserError(f"{where}: answer {text!r} not found at answer_start {start}")
    return list(zip(texts, starts))


# ---------------------------------------------------------------------------------------------
# Windows: question + a slice of the context, with offsets back to the context's characters


@dataclass
class Windows:
    """The tokenised windows of a split: model inputs, the question each belongs to, and for every
    token its (start, end) characters in the context, or None outside the context."""

    inputs: list[dict[str, Any]]
    example: list[int]
    offsets: list[list[tuple[int, int] | None]]


def make_windows(tokenizer: Any, split: Examples, config: Config) -> Windows:
    data = config.data
    encoded = tokenizer(
        trim_questions(tokenizer, split.questions, data.max_question_length), split.contexts,
        truncation="only_second", max_length=data.max_length, stride=data.doc_stride,
        return_overflowing_tokens=True, return_offsets_mapping=True,
    )
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    inputs, offsets = [], []
    for w in range(len(encoded["input_ids"])):
        inputs.append({k: encoded[k][w] for k in keys})
        sequence = encoded.sequence_ids(w)
        offsets.append([tuple(o) if s == 1 else None for o, s in zip(encoded["offset_mapping"][w], sequence)])
    return Windows(inputs, list(encoded["overflow_to_sample_mapping"]), offsets)


def trim_questions(tokenizer: Any, questions: list[str], max_tokens: int) -> list[str]:
    """Cut questions to `max_tokens` tokens, so that every window keeps room for the context."""
    encoded = tokenizer(questions, add_special_tokens=False, truncation=True, max_length=max_tokens,
                        return_offsets_mapping=True)
    return [q[: spans[-1][1]] if spans else q for q, spans in zip(questions, encoded["offset_mapping"])]


def answer_tokens(offsets: list[tuple[int, int] | None], answer: tuple[str, int] | None, cls: int) -> tuple[int, int]:
    """First and last token of the answer in this window, or (cls, cls) when the window does not
    hold the whole answer (or there is none)."""
    context = [i for i, o in enumerate(offsets) if o is not None]
    if answer is None or not context:
        return cls, cls
    text, char_start = answer
    char_end = char_start + len(text)
    first, last = context[0], context[-1]
    if offsets[first][0] > char_start or offsets[last][1] < char_end:
        return cls, cls
    start = next(i for i in context if offsets[i][1] > char_start)
    end = next(i for i in reversed(context) if offsets[i][0] < char_end)
    return start, end


def cls_index(tokenizer: Any, inputs: dict[str, Any]) -> int:
    """Where a window's CLS token is: the target of windows without the answer, and the null score."""
    ids = inputs["input_ids"]
    return ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0


def train_features(tokenizer: Any, split: Examples, config: Config) -> list[dict[str, Any]]:
    """Windows with start/end positions of the first gold answer (SQuAD train has one per question)."""
    windows = make_windows(tokenizer, split, config)
    rows = []
    for inputs, example, offsets in zip(windows.inputs, windows.example, windows.offsets):
        answers = split.answers[example]
        start, end = answer_tokens(offsets, answers[0] if answers else None, cls_index(tokenizer, inputs))
        rows.append({**inputs, "start_positions": start, "end_positions": end})
    return rows


# ---------------------------------------------------------------------------------------------
# Model, training


def load_model(config: Config) -> Any:
    from transformers import AutoModelForQuestionAnswering

    from tunekit.models import apply_peft, load_pretrained

    model = load_pretrained(AutoModelForQuestionAnswering, config.model)
    return apply_peft(model, config.peft, "QUESTION_ANS", modules_to_save=["qa_outputs"])  # the new head, in full


def setup(config: Config, data: Splits[Examples], run: Any) -> Any:
    from transformers import DataCollatorWithPadding, Trainer

    from tunekit.models import load_tokenizer
    from tunekit.training import batch_info, trainer_fit, training_arguments

    args = training_arguments(config, run)
    tokenizer = load_tokenizer(config.model)
    train = train_features(tokenizer, data.train, config)
    model = load_model(config)

    def make_trainer(callbacks: list[Any]) -> Any:
        return Trainer(
            model=model, args=args, train_dataset=train, processing_class=tokenizer,
            eval_dataset=train_features(tokenizer, data.eval, config) if data.eval else None,  # eval_loss only
            data_collator=DataCollatorWithPadding(tokenizer), callbacks=callbacks,
        )

    info = {"train_data": config.data.train, "eval_data": config.data.eval, "train_rows": len(data.train.ids),
            "train_windows": len(train), "eval_rows": len(data.eval.ids) if data.eval else 0, **batch_info(args)}
    return Setup(model, tokenizer, info, trainer_fit(make_trainer),
                 lambda trainer: evaluate_model(model, tokenizer, data.eval, config) if data.eval else {},
                 trained_model=lambda trainer: model)


# ---------------------------------------------------------------------------------------------
# Prediction: logits per window, then the best span per question


def evaluate_model(model: Any, tokenizer: Any, split: Examples, config: Config) -> dict[str, float]:
    from tunekit.runs.metrics import squad_metrics

    predictions = predict_answers(model, tokenizer, split, config)
    return squad_metrics(predictions, {qid: [text for text, _ in answers] for qid, answers in zip(split.ids, split.answers)})


def predict_answers(model: Any, tokenizer: Any, split: Examples, config: Config) -> dict[str, str]:
    windows = make_windows(tokenizer, split, config)
    starts, ends = window_logits(model, tokenizer, windows.inputs, config.args.per_device_eval_batch_size)
    cls = [cls_index(tokenizer, inputs) for inputs in windows.inputs]
    return best_answers(split, windows, starts, ends, cls, config.qa)


def window_logits(model: Any, tokenizer: Any, inputs: list[dict[str, Any]], batch_size: int) -> tuple[list, list]:
    """Start and end logits of every window (unpadded), batched by length."""
    import torch
    from transformers import DataCollatorWithPadding

    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]["input_ids"]))
    collate = DataCollatorWithPadding(tokenizer)
    device = next(model.parameters()).device
    starts: list[Any] = [None] * len(inputs)
    ends: list[Any] = [None] * len(inputs)
    model.eval()
    with torch.inference_mode():
        for first in range(0, len(order), batch_size):
            chunk = order[first : first + batch_size]
            batch = {k: v.to(device) for k, v in collate([inputs[i] for i in chunk]).items()}
            out = model(**batch)
            for row, i in enumerate(chunk):
                length = len(inputs[i]["input_ids"])
                starts[i] = out.start_logits[row, :length].float().cpu().numpy()
                ends[i] = out.end_logits[row, :length].float().cpu().numpy()
    return starts, ends


def best_answers(split: Examples, windows: Windows, starts: list, ends: list, cls: list[int], task: QATask) -> dict[str, str]:
    """For each question, the best span over all its windows: from the top-n start and end logits,
    end >= start, at most max_answer_length tokens, inside the context; the empty answer when
    unanswerable questions are on and the null score (CLS start + end, lowest over windows) wins."""
    import numpy as np

    by_example: dict[int, list[int]] = defaultdict(list)
    for w, example in enumerate(windows.example):
        by_example[example].append(w)
    answers = {}
    for example, qid in enumerate(split.ids):
        best_score, best_text, null_score = -np.inf, "", np.inf
        for w in by_example[example]:
            offsets, start_logits, end_logits = windows.offsets[w], starts[w], ends[w]
            null_score = min(null_score, float(start_logits[cls[w]] + end_logits[cls[w]]))
            for s in np.argsort(start_logits)[::-1][: task.n_best]:
                for e in np.argsort(end_logits)[::-1][: task.n_best]:
                    if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > task.max_answer_length:
                        continue
                    score = float(start_logits[s] + end_logits[e])
                    if score > best_score:
                        best_score, best_text = score, split.contexts[example][offsets[s][0] : offsets[e][1]]
        answers[qid] = "" if task.unanswerable and null_score > best_score else best_text
    return answers


# ---------------------------------------------------------------------------------------------
# Using a finished run: `tunekit eval` and `tunekit predict`


def eval_run(run_dir: Path, data_file: str) -> dict[str, float]:
    """exact_match and f1 (0-100) of a finished run on a QA file with answers."""
    from tunekit.models import load_finished_run

    config, model, tokenizer = load_finished_run(run_dir, Config)
    split = examples(read_table(data_file, "--data"), config)
    return evaluate_model(model, tokenizer, split, config)


def predict_run(run_dir: Path, data_file: str) -> dict[str, str]:
    """{question id: answer}, the input format of the official SQuAD evaluation script."""
    from tunekit.models import load_finished_run

    config, model, tokenizer = load_finished_run(run_dir, Config)
    split = examples(read_table(data_file, "--data"), config, with_answers=False)
    return predict_answers(model, tokenizer, split, config)


METHOD = Method("qa", "Fine-tune an encoder for extractive question answering (SQuAD style spans).", Config, check,
                setup, task=lambda config: "question-answering", loss_units="start/end cross-entropy, nats",
                eval_run=eval_run, predict_run=predict_run)
