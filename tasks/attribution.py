"""Attribution for any torchvision classifier: CAM methods behind one interface, guided
backpropagation, and the layers they read (defaults per model family, layouts from the
model's structure).

Written here rather than taken from pytorch-grad-cam or Captum: pytorch-grad-cam computes one
method per forward/backward pass and its guided backprop replaces modules (ReLU only); Captum's
guided backprop breaks on in-place ReLUs and does not gate GELU. The tests check every CAM
method against pytorch-grad-cam and guided backprop against Captum.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ConvNeXt, EfficientNet, ResNet, SwinTransformer, VisionTransformer
from torchvision.ops.misc import Permute

from tasks.errors import DataError

# Activations whose output is positive exactly where their input is positive.
GATED = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Hardswish)

# family: (CAM layer, feature-map layers). ViT's last block only feeds the class token
# forward, so its CAM reads the tokens entering that block's attention (ln_1), as
# pytorch-grad-cam recommends.
FAMILY_LAYERS = {
    "convnext": ("features.-1", ("features.0", "features.5", "features.-1")),
    "resnet": ("layer4", ("layer1", "layer3", "layer4")),
    "efficientnet": ("features.-1", ("features.1", "features.4", "features.-1")),
    "vit": ("encoder.layers.-1.ln_1", ("conv_proj", "encoder.layers.0", "encoder.layers.-1.ln_1")),
    "swin": ("features.-1", ("features.0", "features.3", "features.-1")),
}
FAMILIES = {ConvNeXt: "convnext", ResNet: "resnet", EfficientNet: "efficientnet", VisionTransformer: "vit",
            SwinTransformer: "swin"}


def family(model: nn.Module) -> str | None:
    return next((name for cls, name in FAMILIES.items() if isinstance(model, cls)), None)


def cam_layer_of(model: nn.Module, setting: str) -> str:
    """`setting`, or for 'auto' the family's last stage."""
    if setting != "auto":
        return setting
    known = family(model)
    if known is None:
        raise DataError(f"no default CAM layer for {type(model).__name__}: pass --cam-layer")
    return FAMILY_LAYERS[known][0]


def feature_layers_of(model: nn.Module, setting: list[str]) -> list[str]:
    if list(setting) != ["auto"]:
        return list(setting)
    known = family(model)
    if known is None:
        raise DataError(f"no default feature-map layers for {type(model).__name__}: pass --feature-layers")
    return list(FAMILY_LAYERS[known][1])


def _child(module: nn.Module, part: str, spec: str, model: nn.Module) -> nn.Module:
    try:
        return module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
    except (AttributeError, IndexError, TypeError):
        raise DataError(f"layer {spec!r} not found in {type(model).__name__} (at {part!r})") from None


def resolve_layer(model: nn.Module, spec: str) -> nn.Module:
    """'features.-1' -> model.features[-1]; numeric parts index (negatives too), others are attributes."""
    module = model
    for part in spec.split("."):
        module = _child(module, part, spec, model)
        if not isinstance(module, nn.Module):
            raise DataError(f"layer {spec!r} of {type(model).__name__} is not a module")
    return module


def _layout_after(module: nn.Module, layout: str) -> str:
    """The layout a module hands on, given the one it receives: Permute modules switch it, a
    Sequential applies its children in order, any other module keeps it (a ConvNeXt block
    permutes inside and back)."""
    if isinstance(module, Permute):
        return {(0, 2, 3, 1): "nhwc", (0, 3, 1, 2): "nchw"}.get(tuple(module.dims), layout)
    if isinstance(module, nn.Sequential):
        for child in module:
            layout = _layout_after(child, layout)
    return layout


def layout(model: nn.Module, spec: str) -> str:
    """'nchw', 'nhwc' or 'tokens' (N, 1 + h*w, C): decided from the modules that run before the
    layer (the model's and every Sequential's children run in order), never from a shape."""
    if isinstance(model, VisionTransformer):
        return "tokens" if spec.split(".")[0] == "encoder" else "nchw"
    current, module = "nchw", model
    for part in spec.split("."):
        child = _child(module, part, spec, model)
        if module is model or isinstance(module, nn.Sequential):
            for sibling in module.children():
                if sibling is child:
                    break
                current = _layout_after(sibling, current)
        module = child
    return _layout_after(module, current)


def as_nchw(output, kind: str, spec: str) -> torch.Tensor:
    """A layer's output as (N, C, H, W), or one clear error."""
    if isinstance(output, torch.Tensor) and kind == "tokens" and output.dim() == 3:
        n, tokens, channels = output.shape
        side = math.isqrt(tokens - 1)
        if side * side == tokens - 1:  # drop the class token, lay the patches out as a grid
            return output[:, 1:].reshape(n, side, side, channels).permute(0, 3, 1, 2)
    if isinstance(output, torch.Tensor) and output.dim() == 4 and kind in ("nchw", "nhwc"):
        return output.permute(0, 3, 1, 2) if kind == "nhwc" else output
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    raise DataError(f"layer {spec!r} outputs {shape}, not an image-shaped map; pick a convolutional stage")


@contextmanager
def capture(module: nn.Module):
    """Record the module's output on each forward (hook removed afterwards)."""
    store: dict = {}
    handle = module.register_forward_hook(lambda m, i, o: store.__setitem__("output", o))
    try:
        yield store
    finally:
        handle.remove()


def check_layers(model: nn.Module, specs: list[str], image_size: int) -> list[str]:
    """Every problem with `specs` on this model at this input size (one dummy forward)."""
    problems, found = [], {}
    for spec in specs:
        try:
            found[spec] = (resolve_layer(model, spec), layout(model, spec))
        except DataError as error:
            problems.append(str(error))
    with ExitStack() as stack, torch.no_grad():
        stores = {spec: stack.enter_context(capture(module)) for spec, (module, _) in found.items()}
        model.eval()(torch.zeros(1, 3, image_size, image_size))
    for spec, store in stores.items():
        try:
            as_nchw(store.get("output"), found[spec][1], spec)
        except DataError as error:
            problems.append(str(error))
    return problems


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


def input_gradient(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(model(x).gather(1, targets.view(-1, 1)).sum(), x)
    return gradient.detach()
