"""The training step's data path as it was before bench/train_throughput.py's "now" (2026-12-02):
the `before` loop must keep measuring that step, not borrow today's faster augmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agelens.tasks.model.inference import IMAGENET_MEAN, IMAGENET_STD
from agelens.tasks.model.training import BRIGHTNESS, CONTRAST, SATURATION, SCALE, erased_boxes


def augment_as_it_was(x: torch.Tensor, generator: torch.Generator, policy: str = "reference",
                      size: int | None = None) -> torch.Tensor:
    """tasks/model/training.py's augment() before its one-pass rewrite: the same draws and result,
    two or three passes over the batch per operation."""
    n = x.shape[0]
    draws = torch.rand(n, 10, generator=generator).to(x.device)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    flip = (draws[:, 0] < 0.5).view(n, 1, 1, 1)
    x = torch.where(flip, x.flip(3), x)
    if policy == "strong":
        scale = SCALE[0] + (SCALE[1] - SCALE[0]) * draws[:, 3]
        shift = (1 - scale)[:, None] * (2 * draws[:, 4:6] - 1)  # where the crop sits, in [-1, 1] units
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0] = theta[:, 1, 1] = scale
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    brightness = (1 + BRIGHTNESS * (2 * draws[:, 1] - 1)).view(n, 1, 1, 1)
    contrast = (1 + CONTRAST * (2 * draws[:, 2] - 1)).view(n, 1, 1, 1)
    x = (x * brightness).clamp_(0, 1)
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    x = ((x - grey.mean(dim=(2, 3), keepdim=True)) * contrast + grey.mean(dim=(2, 3), keepdim=True)).clamp_(0, 1)
    if policy == "strong":
        saturation = (1 + SATURATION * (2 * draws[:, 6] - 1)).view(n, 1, 1, 1)
        grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
        x = ((x - grey) * saturation + grey).clamp_(0, 1)
        x = torch.where(erased_boxes(draws, generator, *x.shape[-2:]), torch.full_like(x, 0.5), x)
    return x


def normalise_as_it_was(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
