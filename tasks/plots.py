"""Reporting: every figure the pipeline draws (and nothing else draws)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and workers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402


def save(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def png_bytes(path: str | os.PathLike, max_width: int = 640) -> bytes:
    """A PNG downscaled to at most `max_width` pixels wide (for embedding in reports)."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.width > max_width:
            image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
        buffer = io.BytesIO()
        # A 128-colour palette keeps plots legible at a fraction of the size.
        image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def training_curves(history: pd.DataFrame):
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for column, label in (("train_loss", "train"), ("val_loss", "val")):
        loss_ax.plot(history["epoch"], history[column], marker="o", label=label)
    for column, label in (("train_acc", "train"), ("val_acc", "val")):
        acc_ax.plot(history["epoch"], history[column], marker="o", label=label)
    kept = history.loc[history["kept"], "epoch"]
    for ax, title in ((loss_ax, "Loss"), (acc_ax, "Accuracy")):
        for epoch in kept:
            ax.axvline(epoch, color="grey", linestyle="--", linewidth=1, label=f"kept (epoch {epoch})")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    return fig


def confusion_heatmap(normalised: np.ndarray, classes: list[str], title: str):
    """As the reference: actual on x, predicted on y, each actual column summing to 1."""
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    sns.heatmap(normalised.T, annot=True, fmt=".2f", cmap="Blues", vmin=0, vmax=1,
                xticklabels=classes, yticklabels=classes, ax=ax)
    ax.set_xlabel("actual")
    ax.set_ylabel("predicted")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def embedding_scatter(coords: np.ndarray, labels: list[str], classes: list[str], title: str):
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    palette = sns.color_palette("viridis", len(classes))
    labels = np.asarray(labels)
    for colour, name in zip(palette, classes):
        mask = labels == name
        ax.scatter(coords[mask, 0], coords[mask, 1], s=12, color=colour, label=name, alpha=0.8)
    ax.legend(title="decade", markerscale=2)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def channel_grid(maps: np.ndarray, title: str):
    """First channels of one image's feature map (C, H, W) side by side."""
    fig, axes = plt.subplots(1, len(maps), figsize=(1.6 * len(maps), 1.9))
    for ax, channel, k in zip(np.atleast_1d(axes), maps, range(len(maps))):
        ax.imshow(channel, cmap="viridis")
        ax.set_title(f"ch {k}", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return fig


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Heat map (H, W in [0, 1]) over an RGB uint8 image, as pytorch-grad-cam's show_cam_on_image."""
    colours = plt.get_cmap("jet")(heat)[..., :3]
    return np.clip(0.5 * colours + 0.5 * image / 255.0, 0, 1)


def as_visible(gradient: np.ndarray) -> np.ndarray:
    """Gradient (H, W, 3) scaled for display the usual way: centred at grey, +-3 std."""
    g = gradient - gradient.mean()
    g = g / (3 * g.std() + 1e-12)
    return np.clip(g * 0.5 + 0.5, 0, 1)


def explanation_strip(image: np.ndarray, cam: np.ndarray, guided: np.ndarray, guided_cam: np.ndarray, title: str):
    """original | Grad-CAM overlay | guided backprop | guided Grad-CAM."""
    panels = ((image, "original"), (overlay(image, cam), "Grad-CAM"),
              (as_visible(guided), "guided backprop"), (as_visible(guided_cam), "guided Grad-CAM"))
    fig, axes = plt.subplots(1, 4, figsize=(11, 3.2))
    for ax, (picture, name) in zip(axes, panels):
        ax.imshow(picture)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
