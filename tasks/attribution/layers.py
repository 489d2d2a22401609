"""The layers attribution reads, in any torchvision classifier: defaults per model family,
dotted lookup (negative indices count from the end), and each layer's layout (NCHW, NHWC or
ViT tokens), decided from the modules that run before it, never guessed from a shape."""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager

import numpy as np
import torch
from torch import nn
from torchvision.models import ConvNeXt, EfficientNet, ResNet, SwinTransformer, VisionTransformer
from torchvision.ops.misc import Permute

from agelens.tasks.core.errors import DataError

# family: (CAM layers, deepest first, feature-map layers). The deepest CAM layer is the
# family's last stage (the reference's); the others are the stages before it, at twice the
# resolution each, for small images. ViT's last block only feeds the class token forward, so
# its CAM reads the tokens entering that block's attention (ln_1), as pytorch-grad-cam recommends.
FAMILY_LAYERS = {
    "convnext": (("features.-1", "features.5", "features.3"), ("features.0", "features.5", "features.-1")),
    "resnet": (("layer4", "layer3", "layer2"), ("layer1", "layer3", "layer4")),
    "efficientnet": (("features.-1", "features.5", "features.3"), ("features.1", "features.4", "features.-1")),
    "vit": (("encoder.layers.-1.ln_1",), ("conv_proj", "encoder.layers.0", "encoder.layers.-1.ln_1")),
    "swin": (("features.-1", "features.5", "features.3"), ("features.0", "features.3", "features.-1")),
}
FAMILIES = {ConvNeXt: "convnext", ResNet: "resnet", EfficientNet: "efficientnet", VisionTransformer: "vit",
            SwinTransformer: "swin"}
# With fewer cells a side, an upsampled CAM is one blob that every method draws alike, the
# randomisation tests have nothing to rank, and guided Grad-CAM is flat.
MIN_CAM_SIDE = 4


def family(model: nn.Module) -> str | None:
    return next((name for cls, name in FAMILIES.items() if isinstance(model, cls)), None)


@torch.no_grad()
def map_sides(model: nn.Module, specs: list[str], image_size: int) -> dict[str, int]:
    """The smaller side of each layer's map at this input size (one dummy forward)."""
    with ExitStack() as stack:
        stores = {spec: stack.enter_context(capture(resolve_layer(model, spec))) for spec in specs}
        model.eval()(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    return {spec: min(as_nchw(store["output"], layout(model, spec), spec).shape[-2:]) for spec, store in stores.items()}


def cam_layer_of(model: nn.Module, setting: str, image_size: int | None = None) -> str:
    """`setting`, or for 'auto' the family's deepest stage whose map has at least
    MIN_CAM_SIDE cells a side at `image_size` (the last stage when none has)."""
    if setting != "auto":
        return setting
    known = family(model)
    if known is None:
        raise DataError(f"no default CAM layer for {type(model).__name__}: pass --cam-layer")
    candidates = FAMILY_LAYERS[known][0]
    if image_size is None or len(candidates) == 1:
        return candidates[0]
    sides = map_sides(model, list(candidates), image_size)
    return next((c for c in candidates if sides[c] >= MIN_CAM_SIDE), max(candidates, key=sides.get))


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


@torch.no_grad()
def layer_outputs(model, x: torch.Tensor, layers: list[str]) -> dict[str, np.ndarray]:
    """Each layer's output as (N, C, H, W) for the batch `x`."""
    with ExitStack() as stack:
        stores = {spec: stack.enter_context(capture(resolve_layer(model, spec))) for spec in layers}
        model(x)
    return {spec: as_nchw(stores[spec]["output"], layout(model, spec), spec).float().cpu().numpy() for spec in layers}
