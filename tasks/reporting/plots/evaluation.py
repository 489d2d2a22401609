"""Figures of the evaluate and embed stages."""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from tasks.reporting.plots.base import TEXT, class_ticks


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
