"""Metrics computed locally (no network): GLUE-style classification and regression metrics."""

from __future__ import annotations

import math

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
