"""CAM methods behind one interface, guided backpropagation and guided Grad-CAM, for any
torchvision classifier (the layer they read comes from tasks/attribution/layers.py).

Written here rather than taken from pytorch-grad-cam or Captum: pytorch-grad-cam computes one
method per forward/backward pass and its guided backprop replaces modules (ReLU only); Captum's
guided backprop breaks on in-place ReLUs and does not gate GELU. The tests check every CAM
method against pytorch-grad-cam and guided backprop against Captum.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agelens.tasks.attribution.layers import as_nchw, capture, layout, resolve_layer
from agelens.tasks.core.errors import DataError
from agelens.tasks.data.arrays import batch_rows, batches
from agelens.tasks.model.inference import model_input

# Activations whose output is positive exactly where their input is positive.
GATED = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Hardswish)

# CAM methods: each combines the layer's activations A and the gradients G of the target
# score (both (N, C, h, w)) into a raw map (N, h, w), as pytorch-grad-cam defines them.
def _grad_cam(a, g):
    return (g.mean((2, 3), keepdim=True) * a).sum(1)


def _hirescam(a, g):
    return (g * a).sum(1)


def _grad_cam_plus_plus(a, g):
    g2 = g * g
    alpha = g2 / (2 * g2 + a.sum((2, 3), keepdim=True) * g2 * g + 1e-6)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    return ((F.relu(g) * alpha).sum((2, 3), keepdim=True) * a).sum(1)


def _xgrad_cam(a, g):
    return ((g * a / (a.sum((2, 3), keepdim=True) + 1e-7)).sum((2, 3), keepdim=True) * a).sum(1)


def _layer_cam(a, g):
    return (F.relu(g) * a).sum(1)


GRADIENT_CAMS = {"grad_cam": _grad_cam, "hirescam": _hirescam, "grad_cam_plus_plus": _grad_cam_plus_plus,
                 "xgrad_cam": _xgrad_cam, "layer_cam": _layer_cam}
CAM_METHODS = (*GRADIENT_CAMS, "score_cam")


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Each map to [0, 1]: (x - min) / (max - min), as pytorch-grad-cam's scale_cam_image."""
    flat = maps.flatten(1)
    flat = flat - flat.min(1, keepdim=True).values
    flat = flat / (1e-7 + flat.max(1, keepdim=True).values)
    return flat.view_as(maps)


def _full_precision(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 (autocast) to fp32; fp32 and fp64 stay as they are."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def to_input_size(raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ReLU, scale to [0, 1], upsample bilinearly to the input, scale again (pytorch-grad-cam's order)."""
    scaled = normalise_maps(F.relu(_full_precision(raw)))
    return normalise_maps(F.interpolate(scaled[:, None], size=size, mode="bilinear", align_corners=False)[:, 0])


def activations_and_gradients(model: nn.Module, x: torch.Tensor, layer_spec: str, targets: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward and backward pass: (activations, gradients of the target scores, both
    (N, C, h, w), logits, targets). `targets` None = the predicted classes."""
    layer, kind = resolve_layer(model, layer_spec), layout(model, layer_spec)
    with capture(layer) as store, torch.enable_grad():
        logits = model(x)
        raw = store["output"]
        chosen = logits.argmax(1) if targets is None else targets
        (raw_gradients,) = torch.autograd.grad(logits.gather(1, chosen.view(-1, 1)).sum(), raw)
    activations = _full_precision(as_nchw(raw.detach(), kind, layer_spec))
    gradients = _full_precision(as_nchw(raw_gradients, kind, layer_spec))
    return activations, gradients, _full_precision(logits.detach()), chosen.detach()


@torch.no_grad()
def score_cam_weights(model: nn.Module, x: torch.Tensor, activations: torch.Tensor, targets: torch.Tensor,
                      batch_size: int = 16) -> torch.Tensor:
    """ScoreCAM's channel weights: the softmax over channels of the target score of the input
    masked by each upsampled, min-max scaled channel (one forward pass per channel)."""
    upsampled = F.interpolate(activations, size=x.shape[-2:], mode="bilinear", align_corners=True)
    flat = upsampled.flatten(2)
    lows, highs = flat.min(-1).values[..., None, None], flat.max(-1).values[..., None, None]
    masks = (upsampled - lows) / (highs - lows + 1e-8)
    scores = torch.empty(masks.shape[:2], device=x.device, dtype=activations.dtype)
    for i in range(len(x)):
        for start in range(0, masks.shape[1], batch_size):
            batch = x[i][None] * masks[i, start:start + batch_size, None]
            scores[i, start:start + batch_size] = _full_precision(model(batch))[:, targets[i]]
    return torch.softmax(scores, -1)


def cam_maps(model: nn.Module, x: torch.Tensor, layer_spec: str, methods: list[str],
             targets: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """({method: maps (N, H, W) in [0, 1]}, logits, targets) from one forward/backward pass
    (plus ScoreCAM's forward passes when asked for)."""
    activations, gradients, logits, targets = activations_and_gradients(model, x, layer_spec, targets)
    size = tuple(x.shape[-2:])
    maps = {}
    for method in methods:
        if method == "score_cam":
            weights = score_cam_weights(model, x, activations, targets)
            raw = (weights[:, :, None, None] * activations).sum(1)
        elif method in GRADIENT_CAMS:
            raw = GRADIENT_CAMS[method](activations, gradients)
        else:
            raise DataError(f"unknown CAM method {method!r}; choose from {', '.join(CAM_METHODS)}")
        maps[method] = to_input_size(raw, size)
    return maps, logits, targets


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
    return _full_precision(gradient.detach())


def guided_grad_cam(guided: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
    """Guided backprop (N, 3, H, W) times the upsampled Grad-CAM (N, H, W)."""
    return guided * cams[:, None]


def mean_maps(model, array: np.ndarray, picked: dict[str, np.ndarray], cam_layer: str, runtime, batch_size: int
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """({class: mean Grad-CAM (H, W)}, {class: mean image (H, W, 3) uint8}), batch by batch."""
    heats, faces = {}, {}
    for label, rows in picked.items():
        heat, face = 0.0, 0.0
        for _, batch in batches(array, batch_rows(rows, batch_size), runtime.device):
            with runtime.autocast():  # the precision the model was trained in
                maps, _, _ = cam_maps(model, model_input(batch, runtime), cam_layer, ["grad_cam"])
            heat = heat + maps["grad_cam"].sum(0).cpu().numpy()
            face = face + batch.float().sum(0).cpu().numpy()
        heats[label] = heat / len(rows)
        faces[label] = (face / len(rows)).astype(np.uint8)
    return heats, faces
