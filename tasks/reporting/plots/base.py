"""Shared pieces of every figure: saving, text that stays text, images side by side."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

TEXT = {"parse_math": False}  # a '$' in a file name stays a '$'


def save(fig: Figure, path: str | os.PathLike, dpi: int = 110, tight: bool = True) -> Path:
    fig.savefig(path, dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    return Path(path)


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Heat map (H, W in [0, 1]) over an RGB uint8 image, as pytorch-grad-cam's show_cam_on_image."""
    colours = matplotlib.colormaps["jet"](heat)[..., :3]
    return np.clip(0.5 * colours + 0.5 * image / 255.0, 0, 1)


def as_visible(gradient: np.ndarray) -> np.ndarray:
    """Gradient (H, W, 3) scaled for display the usual way: centred at grey, +-3 std."""
    g = gradient - gradient.mean()
    g = g / (3 * g.std() + 1e-12)
    return np.clip(g * 0.5 + 0.5, 0, 1)


def class_ticks(ax, classes: list[str]) -> None:
    ticks = np.arange(len(classes)) + 0.5
    ax.set_xticks(ticks, [str(c) for c in classes], **TEXT)
    ax.set_yticks(ticks, [str(c) for c in classes], rotation=0, **TEXT)
