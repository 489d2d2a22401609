"""Grad-CAM, guided backpropagation and guided Grad-CAM, batched, for any torchvision CNN.

Written here rather than taken from pytorch-grad-cam or Captum: pytorch-grad-cam's guided
backprop replaces modules (and only ReLU), Captum's works by module backward hooks that
break on in-place ReLUs and do not gate GELU. The tests check these against both libraries.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from tasks.sources import DataError

# Activations whose output is positive exactly where their input is positive.
GATED = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Hardswish)


def resolve_layer(model: nn.Module, spec: str) -> nn.Module:
    """'features.-1' -> model.features[-1]; numeric parts index (negatives too), others are attributes."""
    module = model
    for part in spec.split("."):
        try:
            module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
        except (AttributeError, IndexError, TypeError):
            raise DataError(f"layer {spec!r} not found in {type(model).__name__} (at {part!r})") from None
    return module


def as_nchw(output, input_hw: tuple[int, int], spec: str) -> torch.Tensor:
    """The layer's output as (N, C, H, W), or one clear error.

    ConvNeXt's LayerNorm/Linear/GELU inside a block work on (N, H, W, C); such an output is
    recognised by its spatial axes having the input's aspect ratio at positions 1, 2
    rather than 2, 3, and is permuted.
    """
    if not isinstance(output, torch.Tensor) or output.dim() != 4:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise DataError(f"layer {spec!r} outputs {shape}, not an image-shaped (N, C, H, W) map; pick a conv stage")
    ratio = input_hw[0] / input_hw[1]
    n, a, b, c = output.shape
    if abs(b / c - ratio) > 1e-6 and abs(a / b - ratio) < 1e-6:
        return output.permute(0, 3, 1, 2)
    return output


@contextmanager
def capture(module: nn.Module):
    """Record the module's output on each forward (hook removed afterwards)."""
    store: dict = {}
    handle = module.register_forward_hook(lambda m, i, o: store.__setitem__("output", o))
    try:
        yield store
    finally:
        handle.remove()


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Each map to [0, 1]: (x - min) / (max - min), as pytorch-grad-cam's scale_cam_image."""
    flat = maps.flatten(1)
    flat = flat - flat.min(1, keepdim=True).values
    flat = flat / (1e-7 + flat.max(1, keepdim=True).values)
    return flat.view_as(maps)


def grad_cam(model: nn.Module, x: torch.Tensor, layer_spec: str, targets: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cams (N, H, W) in [0, 1] at the input's size, logits). `targets` None = predicted class."""
    layer = resolve_layer(model, layer_spec)
    with capture(layer) as store, torch.enable_grad():
        logits = model(x)
        raw = store["output"]
        activations = as_nchw(raw, tuple(x.shape[-2:]), layer_spec)
        chosen = logits.argmax(1) if targets is None else targets
        (raw_gradients,) = torch.autograd.grad(logits.gather(1, chosen.view(-1, 1)).sum(), raw)
        gradients = as_nchw(raw_gradients, tuple(x.shape[-2:]), layer_spec)
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cams = F.relu((weights * activations).sum(1)).detach()
    cams = normalise_maps(cams)
    cams = F.interpolate(cams[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return normalise_maps(cams), logits.detach()


class _PositiveGate(torch.autograd.Function):
    """Identity forward; backward passes only positive gradients where the activation was positive."""

    @staticmethod
    def forward(ctx, output):
        ctx.save_for_backward(output > 0)
        return output.clone()

    @staticmethod
    def backward(ctx, grad):
        (positive,) = ctx.saved_tensors
        return grad.clamp(min=0) * positive


def guided_backprop(model: nn.Module, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Guided backpropagation (Springenberg et al. 2014): d score / d input where, at every
    activation, only positive gradients at positive inputs pass. For ReLU this is the classic
    rule; for GELU the same gate is applied before GELU's own derivative, which is positive
    wherever the input is, so the GELU case reduces to ReLU's when GELU is replaced by ReLU.

    Hooks are removed afterwards; no module is replaced.
    """
    hooks = [m.register_forward_hook(lambda m, i, o: _PositiveGate.apply(o))
             for m in model.modules() if isinstance(m, GATED)]
    try:
        with torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            logits = model(x)
            chosen = logits.argmax(1) if targets is None else targets
            (gradient,) = torch.autograd.grad(logits.gather(1, chosen.view(-1, 1)).sum(), x)
    finally:
        for hook in hooks:
            hook.remove()
    return gradient.detach()


def guided_grad_cam(guided: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
    """Guided backprop (N, 3, H, W) times the upsampled Grad-CAM (N, H, W)."""
    return guided * cams[:, None]


def input_gradient(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(model(x).gather(1, targets.view(-1, 1)).sum(), x)
    return gradient.detach()
