"""Metrics computed locally (no network): GLUE-style classification and regression metrics, SQuAD
exact match and F1, and a mean with its standard error."""

from __future__ import annotations

import collections
import math
import re
import string

import numpy as np


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, macro F1, binary F1 (two classes) and Matthews correlation from logits."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    predictions = np.asarray(logits).argmax(axis=-1)
    labels = np.asarray(labels)
    metrics = {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1_macro": float(f1_score(labels, predictions, average="macro", zero_division=0)),
        "matthews_correlation": float(matthews_corrcoef(labels, predictions)),
    }
    if np.asarray(logits).shape[-1] == 2:
        metrics["f1"] = float(f1_score(labels, predictions, average="binary", zero_division=0))
    else:
        metrics["f1"] = metrics["f1_macro"]
    return metrics


def regression_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation and mean squared error (STS-B style)."""
    from scipy.stats import pearsonr, spearmanr

    predictions = np.asarray(predictions).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    constant = np.allclose(predictions, predictions[0]) or np.allclose(labels, labels[0])
    return {
        "pearson": math.nan if constant else float(pearsonr(predictions, labels)[0]),
        "spearman": math.nan if constant else float(spearmanr(predictions, labels)[0]),
        "mse": float(np.mean((predictions - labels) ** 2)),
    }


# ---------------------------------------------------------------------------------------------
# SQuAD: exact match and token F1 after answer normalisation, the maximum over the gold answers
# (as the official v1.1 evaluation script defines them; an unanswerable question's gold is "").

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, then the articles a/an/the, then collapse white space."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact_match(prediction: str, golds: list[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer."""
    golds = golds or [""]
    return float(any(normalize_answer(prediction) == normalize_answer(gold) for gold in golds))


def squad_f1(prediction: str, golds: list[str]) -> float:
    """Best bag-of-tokens F1 against the gold answers; an empty answer scores 1 only against another."""
    return max(_token_f1(normalize_answer(prediction).split(), normalize_answer(g).split()) for g in golds or [""])


def _token_f1(predicted: list[str], gold: list[str]) -> float:
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: dict[str, str], golds: dict[str, list[str]]) -> dict[str, float]:
    """exact_match and f1 on the 0-100 scale over the questions of `golds` (a missing prediction is "")."""
    if not golds:
        return {"exact_match": 0.0, "f1": 0.0}
    em = sum(squad_exact_match(predictions.get(qid, ""), answers) for qid, answers in golds.items())
    f1 = sum(squad_f1(predictions.get(qid, ""), answers) for qid, answers in golds.items())
    return {"exact_match": 100 * em / len(golds), "f1": 100 * f1 / len(golds)}


def mean_and_se(values: list[float], ddof: int = 0) -> tuple[float, float]:
    """The mean and its standard error sqrt(sum((v - mean)^2) / (n - ddof) / n): with ddof 0,
    sqrt(p(1-p)/n) for 0/1 values; with ddof 1, the sample standard deviation over sqrt(n). 0 and 0
    for no values; a standard error of 0 where n - ddof is not positive."""
    n = len(values)
    mean = sum(values) / max(n, 1)
    if n - ddof <= 0:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - ddof) / n)
