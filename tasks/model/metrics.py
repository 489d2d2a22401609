"""Classification metrics of predicted decades (scikit-learn's), and the MAE in decades."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from tasks.data.labels import decade_values


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
