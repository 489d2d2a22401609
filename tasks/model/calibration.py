"""How far to trust the model's probabilities: one temperature fitted on validation (Guo et al.
2017, "On Calibration of Modern Neural Networks"), the expected calibration error (ECE) and the
reliability diagram's bins."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize_scalar

BINS = 15  # Guo et al.'s


def class_log_probs(logits: np.ndarray, head, temperature: float) -> np.ndarray:
    """log P(class) at temperature T, through the head (years summed into decades)."""
    logits = torch.from_numpy(np.asarray(logits))
    if head.kind != "ages":
        return head.log_probabilities(logits, temperature).double().numpy()
    return np.log(np.clip(head.class_probs(head.probabilities(logits, temperature).numpy()), 1e-12, None))


def nll(logits: np.ndarray, labels: np.ndarray, head, temperature: float) -> float:
    return float(-class_log_probs(logits, head, temperature)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, head) -> float:
    """The T > 0 that minimises the validation NLL of the classes (searched on log T in [1/20, 20])."""
    found = minimize_scalar(lambda log_t: nll(logits, labels, head, float(np.exp(log_t))),
                            bounds=(np.log(0.05), np.log(20.0)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per confidence bin: the mean confidence, the accuracy and the share of images."""
    confidence, predicted = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    rows = []
    for b in range(bins):
        inside = which == b
        if inside.any():
            rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "confidence": float(confidence[inside].mean()),
                         "accuracy": float((predicted[inside] == labels[inside]).mean()), "share": float(inside.mean())})
    return rows


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: the share-weighted gap between confidence and accuracy."""
    return float(sum(r["share"] * abs(r["accuracy"] - r["confidence"]) for r in reliability(probs, labels, bins)))
