"""Curves of the explain stage: faithfulness (deletion, insertion) and cascading randomisation."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from agelens.tasks.reporting.plots.base import TEXT


def curve_panels(panels: dict[str, dict[str, np.ndarray]], xlabel: str, ylabel: str, title: str,
                 xticks: list[str] | None = None) -> Figure:
    """One panel per key of `panels`, one line per method: {panel: {method: y values}}."""
    fig = Figure(figsize=(max(7.5, 5.2 * len(panels)), 4.2))
    for ax, (panel, lines) in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels.items()):
        for method, values in lines.items():
            x = np.arange(len(values)) if xticks else np.linspace(0, 1, len(values))
            ax.plot(x, values, marker="o", markersize=3, label=method, linestyle="--" if method == "random" else "-")
        if xticks:
            ax.set_xticks(np.arange(len(xticks)), xticks, rotation=30, ha="right", fontsize=7, **TEXT)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(panel, **TEXT)
        ax.legend(fontsize=7)
    fig.suptitle(title, **TEXT)
    fig.tight_layout()
    return fig
