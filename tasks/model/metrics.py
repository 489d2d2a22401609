"""Classification metrics of predicted decades (scikit-learn's), and the MAE in decades."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from agelens.tasks.data.labels import decade_values


def classification_metrics(actual: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/support, MAE in decades, and the
    confusion matrix normalised per actual class (rows = actual)."""
    labels = np.arange(len(classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        actual, predicted, labels=labels, zero_division=0)
    decades = decade_values(classes)
    mae = None if decades is None else float(np.abs(np.array(decades)[actual] - np.array(decades)[predicted]).mean() / 10)
    return {
        "images": int(len(actual)),
        "accuracy": float(accuracy_score(actual, predicted)),
        "macro_f1": float(f1_score(actual, predicted, labels=labels, average="macro", zero_division=0)),
        "mae_decades": mae,
        "per_class": {c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for c, p, r, f, s in zip(classes, precision, recall, f1, support)},
        "confusion": confusion_matrix(actual, predicted, labels=labels, normalize="true").tolist(),
        "confusion_counts": confusion_matrix(actual, predicted, labels=labels).tolist(),
    }


RESAMPLES = 1000  # bootstrap resamples for the 95% intervals


def _macro_f1(counts: np.ndarray) -> np.ndarray:
    """Macro-F1 from confusion counts (..., C, C) (rows actual), absent classes scoring 0 as in sklearn."""
    true_pos = np.diagonal(counts, axis1=-2, axis2=-1)
    predicted, actual = counts.sum(-2), counts.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(predicted + actual > 0, 2 * true_pos / (predicted + actual), 0.0)
    return f1.mean(-1)


def interval(values: np.ndarray) -> list[float]:
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def split_metrics(actual: np.ndarray, probs: np.ndarray, classes: list[str], ages: np.ndarray | None = None,
                  expected: np.ndarray | None = None, seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """Everything reported of one split, each headline number with a 95% bootstrap interval (images
    resampled with replacement): accuracy, macro-F1, within-one-decade accuracy, and where ages
    are known the MAE in years and CS5 (the share within 5 years); per-class precision/recall."""
    predicted = probs.argmax(1)
    found = classification_metrics(actual, predicted, classes)
    n, k = len(actual), len(classes)
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    correct = predicted == actual
    found["accuracy_ci"] = interval(correct[draws].mean(1))
    codes = actual * k + predicted
    counts = np.stack([np.bincount(codes[d], minlength=k * k) for d in draws]).reshape(resamples, k, k)
    found["macro_f1_ci"] = interval(_macro_f1(counts))
    decades = decade_values(classes)
    if decades is not None:
        near = np.abs(np.array(decades)[predicted] - np.array(decades)[actual]) <= 10
        found["within_one"], found["within_one_ci"] = float(near.mean()), interval(near[draws].mean(1))
    else:
        found["within_one"] = found["within_one_ci"] = None
    if ages is not None and expected is not None:
        error = np.abs(expected - ages)
        found["mae_years"], found["mae_years_ci"] = float(error.mean()), interval(error[draws].mean(1))
        found["cs5"], found["cs5_ci"] = float((error <= 5).mean()), interval((error <= 5)[draws].mean(1))
    else:
        found["mae_years"] = found["mae_years_ci"] = found["cs5"] = found["cs5_ci"] = None
    return found
