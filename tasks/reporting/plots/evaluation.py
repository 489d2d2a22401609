"""Figures of the evaluate and embed stages."""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from agelens.tasks.reporting.plots.base import TEXT, class_ticks


def confusion_heatmap(normalised: np.ndarray, classes: list[str], title: str) -> Figure:
    """As the reference: actual on x, predicted on y, each actual column summing to 1."""
    import seaborn as sns

    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.subplots()
    sns.heatmap(normalised.T, annot=True, fmt=".2f", cmap="Blues", vmin=0, vmax=1, ax=ax,
                xticklabels=False, yticklabels=False)
    class_ticks(ax, classes)
    ax.set_xlabel("actual")
    ax.set_ylabel("predicted")
    ax.set_title(title, **TEXT)
    fig.tight_layout()
    return fig


def embedding_scatter(coords: np.ndarray, labels: list[str], classes: list[str], title: str) -> Figure:
    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.subplots()
    palette = matplotlib.colormaps["viridis"](np.linspace(0, 1, len(classes)))
    labels = np.asarray(labels)
    for colour, name in zip(palette, classes):
        mask = labels == name
        ax.scatter(coords[mask, 0], coords[mask, 1], s=12, color=colour, label=str(name), alpha=0.8)
    legend = ax.legend(title="class", markerscale=2)
    for text in legend.get_texts():
        text.set_parse_math(False)
    ax.set_title(title, **TEXT)
    fig.tight_layout()
    return fig


def reliability_diagram(curves: dict[str, list[dict]], title: str) -> Figure:
    """Accuracy against confidence per bin, before and after calibration; the diagonal is perfect."""
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for name, style in (("before", dict(marker="o", alpha=0.6)), ("after", dict(marker="s"))):
        rows = curves[name]
        ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], label=f"{name} calibration", **style)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, **TEXT)
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig
