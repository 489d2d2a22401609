"""Pictures side by side, composed directly with Pillow: feature maps, explanation strips, the CAM
methods per image, the mean map per class. A matplotlib figure costs about a second each (the
feature-map stage draws one per image, class and layer); a composed grid a few milliseconds.
Text is drawn as text, so file names show as they are."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from agelens.tasks.reporting.plots.base import as_visible, overlay

TILE = 112  # pixels per channel tile, at least (small maps are enlarged without smoothing)
GAP = 6


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _tile(channel: np.ndarray) -> Image.Image:
    """One channel scaled to [0, 1] (as imshow does) in viridis, enlarged to about TILE pixels."""
    low, high = float(channel.min()), float(channel.max())
    scaled = (channel - low) / (high - low) if high > low else np.zeros_like(channel, dtype=float)
    rgb = (matplotlib.colormaps["viridis"](scaled)[..., :3] * 255).astype(np.uint8)
    factor = max(1, int(np.ceil(TILE / max(channel.shape))))
    return Image.fromarray(rgb).resize((channel.shape[1] * factor, channel.shape[0] * factor), Image.NEAREST)


def channel_grid(maps: np.ndarray, title: str) -> Image.Image:
    """The channels of one image's feature map (C, H, W) side by side, each captioned, titled."""
    tiles = [_tile(np.asarray(channel, dtype=float)) for channel in maps]
    width = sum(t.width for t in tiles) + GAP * (len(tiles) + 1)
    font, small = _font(14), _font(12)
    lines = textwrap.wrap(title, max(20, width // 8)) or [""]
    top = GAP + 18 * len(lines)
    height = top + max(t.height for t in tiles) + 22
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((GAP, GAP + 18 * i), line, fill="black", font=font)
    x = GAP
    for k, tile in enumerate(tiles):
        canvas.paste(tile, (x, top))
        draw.text((x, top + tile.height + 4), f"ch {k}", fill="black", font=small)
        x += tile.width + GAP
    return canvas


CAM_NAMES = {"grad_cam": "Grad-CAM", "hirescam": "HiResCAM", "grad_cam_plus_plus": "Grad-CAM++",
             "xgrad_cam": "XGradCAM", "layer_cam": "LayerCAM", "score_cam": "ScoreCAM"}


def _picture(values: np.ndarray, size: int) -> Image.Image:
    """An RGB picture (uint8, or floats in [0, 1]) enlarged to `size` pixels on its longer side."""
    values = np.asarray(values)
    if values.dtype != np.uint8:
        values = (np.clip(values, 0, 1) * 255).round().astype(np.uint8)
    picture = Image.fromarray(values)
    scale = size / max(picture.size)
    return picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                          Image.BILINEAR if scale < 1 else Image.NEAREST)


def picture_table(rows: list[list[tuple[np.ndarray, str]]], title: str, size: int = 160) -> Image.Image:
    """Rows of captioned pictures under a title (captions under each picture)."""
    font, small = _font(14), _font(12)
    columns = max(len(row) for row in rows)
    width = columns * (size + GAP) + GAP
    lines = textwrap.wrap(title, max(20, width // 8)) or [""]
    caption_lines = [max(len(textwrap.wrap(c, size // 7) or [""]) for _, c in row) for row in rows]
    top = GAP + 18 * len(lines)
    height = top + sum(size + 6 + 15 * n + GAP for n in caption_lines)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((GAP, GAP + 18 * i), line, fill="black", font=font)
    y = top
    for row, n in zip(rows, caption_lines):
        for j, (values, caption) in enumerate(row):
            x = GAP + j * (size + GAP)
            canvas.paste(_picture(values, size), (x, y))
            for k, text in enumerate(textwrap.wrap(caption, size // 7) or [""]):
                draw.text((x, y + size + 4 + 15 * k), text, fill="black", font=small)
        y += size + 6 + 15 * n + GAP
    return canvas


def explanation_strip(image: np.ndarray, cam: np.ndarray, cam_method: str, guided: np.ndarray,
                      guided_cam: np.ndarray, title: str) -> Image.Image:
    """The reference's strip: original | CAM overlay (the first CAM method) | guided backprop | guided Grad-CAM."""
    return picture_table([[(image, "original"), (overlay(image, cam), CAM_NAMES.get(cam_method, cam_method)),
                           (as_visible(guided), "guided backprop"), (as_visible(guided_cam), "guided Grad-CAM")]],
                         title, size=200)


def class_grid(images: dict[str, np.ndarray], heats: dict[str, np.ndarray], counts: dict[str, int],
               title: str) -> Image.Image:
    """Per class: the mean image with the mean map over it."""
    return picture_table([[(overlay(images[c], heats[c]), f"{c} (n={counts[c]})") for c in heats]], title)


def method_grid(images: list[np.ndarray], maps: dict[str, np.ndarray], methods: list[str], captions: list[str],
                title: str) -> Image.Image:
    """One row per image: the image (captioned), then each method's map over it (named)."""
    return picture_table([[(image, captions[i])] + [(overlay(image, maps[m][i]), CAM_NAMES.get(m, m)) for m in methods]
                          for i, image in enumerate(images)], title, size=128)


def save(image: Image.Image, path: str | Path) -> Path:
    image.save(path, format="PNG", optimize=False)
    return Path(path)
