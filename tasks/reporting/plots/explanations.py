"""Figures of maps over images: feature maps, explanations, faithfulness and randomisation curves."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from tasks.reporting.plots.base import TEXT, as_visible, image_row, overlay

CAM_NAMES = {"grad_cam": "Grad-CAM", "hirescam": "HiResCAM", "grad_cam_plus_plus": "Grad-CAM++",
             "xgrad_cam": "XGradCAM", "layer_cam": "LayerCAM", "score_cam": "ScoreCAM"}


def channel_grid(maps: np.ndarray, title: str) -> Figure:
    """First channels of one image's feature map (C, H, W) side by side."""
    fig = Figure(figsize=(1.6 * len(maps), 1.9))
    for k, (ax, channel) in enumerate(zip(np.atleast_1d(fig.subplots(1, len(maps))), maps)):
        ax.imshow(channel, cmap="viridis")
        ax.set_title(f"ch {k}", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9, **TEXT)
    return fig


def explanation_strip(image: np.ndarray, cam: np.ndarray, cam_method: str, guided: np.ndarray,
                      guided_cam: np.ndarray, title: str) -> Figure:
    """original | CAM overlay (Grad-CAM unless another method comes first) | guided backprop | guided Grad-CAM."""
    return image_row([(image, "original"), (overlay(image, cam), CAM_NAMES.get(cam_method, cam_method)),
                      (as_visible(guided), "guided backprop"), (as_visible(guided_cam), "guided Grad-CAM")], title)


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


def class_grid(images: dict[str, np.ndarray], heats: dict[str, np.ndarray], counts: dict[str, int], title: str) -> Figure:
    """Per class: the mean image with the mean map over it."""
    return image_row([(overlay(images[c], heats[c]), f"{c} (n={counts[c]})") for c in heats], title, width=2.4)


def method_grid(images: list[np.ndarray], maps: dict[str, np.ndarray], methods: list[str], captions: list[str],
                title: str) -> Figure:
    """One row per image: the image (captioned), then each method's map over it (named on top)."""
    fig = Figure(figsize=(2.0 * (len(methods) + 1), 2.1 * len(images)))
    axes = np.atleast_2d(fig.subplots(len(images), len(methods) + 1))
    for i, image in enumerate(images):
        axes[i, 0].imshow(image)
        axes[i, 0].set_title(captions[i], fontsize=6, **TEXT)
        for j, method in enumerate(methods, start=1):
            axes[i, j].imshow(overlay(image, maps[method][i]))
            if i == 0:
                axes[i, j].set_title(method, fontsize=8, **TEXT)
        for ax in axes[i]:
            ax.axis("off")
    fig.suptitle(title, fontsize=10, **TEXT)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.35 / len(images), wspace=0.03, hspace=0.12)
    return fig
