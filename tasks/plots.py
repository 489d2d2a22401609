"""Every figure the pipeline draws, with matplotlib's object API (`Figure`, never pyplot, whose
global state is not thread-safe) and user strings shown as text (never parsed as math)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

TEXT = {"parse_math": False}  # a '$' in a file name stays a '$'


def save(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
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


def training_curves(history: list[dict]) -> Figure:
    fig = Figure(figsize=(10, 4))
    loss_ax, acc_ax = fig.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    for ax, metric, title in ((loss_ax, "loss", "Loss"), (acc_ax, "acc", "Accuracy")):
        for split in ("train", "val"):
            ax.plot(epochs, [row[f"{split}_{metric}"] for row in history], marker="o", label=split)
        for row in history:
            if row["kept"]:
                ax.axvline(row["epoch"], color="grey", linestyle="--", linewidth=1, label=f"kept (epoch {row['epoch']})")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    return fig


def confusion_heatmap(normalised: np.ndarray, classes: list[str], title: str) -> Figure:
    """As the reference: actual on x, predicted on y, each actual column summing to 1."""
    import seaborn as sns

    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.subplots()
    sns.heatmap(normalised.T, annot=True, fmt=".2f", cmap="Blues", vmin=0, vmax=1, ax=ax,
                xticklabels=False, yticklabels=False)
    _class_ticks(ax, classes)
    ax.set_xlabel("actual")
    ax.set_ylabel("predicted")
    ax.set_title(title, **TEXT)
    fig.tight_layout()
    return fig


def _class_ticks(ax, classes: list[str]) -> None:
    ticks = np.arange(len(classes)) + 0.5
    ax.set_xticks(ticks, [str(c) for c in classes], **TEXT)
    ax.set_yticks(ticks, [str(c) for c in classes], rotation=0, **TEXT)


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


def channel_grid(maps: np.ndarray, title: str) -> Figure:
    """First channels of one image's feature map (C, H, W) side by side."""
    fig = Figure(figsize=(1.6 * len(maps), 1.9))
    for k, (ax, channel) in enumerate(zip(np.atleast_1d(fig.subplots(1, len(maps))), maps)):
        ax.imshow(channel, cmap="viridis")
        ax.set_title(f"ch {k}", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9, **TEXT)
    return fig


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Heat map (H, W in [0, 1]) over an RGB uint8 image, as pytorch-grad-cam's show_cam_on_image."""
    colours = matplotlib.colormaps["jet"](heat)[..., :3]
    return np.clip(0.5 * colours + 0.5 * image / 255.0, 0, 1)


def as_visible(gradient: np.ndarray) -> np.ndarray:
    """Gradient (H, W, 3) scaled for display the usual way: centred at grey, +-3 std."""
    g = gradient - gradient.mean()
    g = g / (3 * g.std() + 1e-12)
    return np.clip(g * 0.5 + 0.5, 0, 1)


def image_row(panels: list[tuple[np.ndarray, str]], title: str, width: float = 2.75) -> Figure:
    """Pictures side by side, each with a caption; `title` above them."""
    fig = Figure(figsize=(width * len(panels), 3.2))
    for ax, (picture, caption) in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels):
        ax.imshow(picture)
        ax.set_title(caption, fontsize=9, **TEXT)
        ax.axis("off")
    fig.suptitle(title, fontsize=10, **TEXT)
    fig.tight_layout()
    return fig


def explanation_strip(image: np.ndarray, cam: np.ndarray, guided: np.ndarray, guided_cam: np.ndarray,
                      title: str) -> Figure:
    """original | Grad-CAM overlay | guided backprop | guided Grad-CAM."""
    return image_row([(image, "original"), (overlay(image, cam), "Grad-CAM"),
                      (as_visible(guided), "guided backprop"), (as_visible(guided_cam), "guided Grad-CAM")], title)


def curve_panels(panels: dict[str, dict[str, np.ndarray]], xlabel: str, ylabel: str, title: str,
                 xticks: list[str] | None = None) -> Figure:
    """One panel per key of `panels`, one line per method: {panel: {method: y values}}."""
    fig = Figure(figsize=(5.2 * len(panels), 4))
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


def learning_curve(points: list[dict]) -> Figure:
    """Val accuracy against the number of training images, one point per run."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    points = sorted(points, key=lambda p: p["train_images"])
    ax.plot([p["train_images"] for p in points], [p["val_accuracy"] for p in points], marker="o")
    ax.set_xscale("log" if len(points) > 1 and points[-1]["train_images"] > 10 * points[0]["train_images"] else "linear")
    ax.set_xlabel("training images")
    ax.set_ylabel("val accuracy")
    ax.set_title("Learning curve (runs with otherwise equal settings)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
