"""Models: any torchvision classifier by name, its last Linear resized for our classes."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torch import nn

from agelens.tasks.core.errors import DataError

PRETRAINED = "IMAGENET1K_V1"  # the reference's weights


def last_linear_name(model: nn.Module) -> str:
    """Dotted name of the final classifier layer (fc, classifier.2, head, ...)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise DataError(f"{type(model).__name__} has no Linear layer to use as the classifier")
    return names[-1]


def replace_last_linear(model: nn.Module, num_classes: int) -> nn.Module:
    name = last_linear_name(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(old.in_features, num_classes))
    return model


def pretrained_weights(backbone: str):
    """torchvision's weights enum entry for the reference's ImageNet weights."""
    try:
        enum = torchvision.models.get_model_weights(backbone)
    except (KeyError, ValueError) as error:
        raise DataError(f"torchvision has no ImageNet weights for {backbone!r}: pass --weights none or --weights PATH") from error
    return getattr(enum, PRETRAINED, enum.DEFAULT)


def pretrained_file(backbone: str) -> Path:
    """Where torch's hub cache keeps the ImageNet weights of `backbone`."""
    url = pretrained_weights(backbone).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def ensure_pretrained(backbone: str) -> Path:
    """The local ImageNet weights file, downloading it when missing; one clear error offline."""
    target = pretrained_file(backbone)
    if target.exists():
        return target
    try:
        torch.hub.load_state_dict_from_url(pretrained_weights(backbone).url, progress=False, check_hash=True)
    except Exception as error:  # URLError, socket errors, HTTP errors: all mean "not available"
        raise DataError(
            f"ImageNet weights for {backbone} are not cached and cannot be downloaded ({type(error).__name__}): "
            f"expected {target} (under $TORCH_HOME/hub/checkpoints/); put the file there or pass "
            f"--weights PATH to a local .pth/.safetensors state dict, or --weights none"
        ) from error
    return target


def weights_format(path: Path) -> str:
    """'safetensors' or 'torch' from the file's first bytes, or one clear error for anything else."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100 << 20:
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save's zip, or a legacy pickle
        return "torch"
    try:
        head.decode("utf-8")
        looks = "it looks like text"
    except UnicodeDecodeError:
        looks = f"it starts with bytes {head[:8].hex(' ')}"
    raise DataError(f"weights file {path} is not a PyTorch state dict (.pth/.pt, as torch.save writes) nor a "
                    f".safetensors file: {looks}")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"weights file not found: {path}")
    kind = weights_format(path)
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise DataError(f"cannot read weights file {path}: {error}") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path} is not a state dict (a mapping of names to tensors)")
    return state


def _load_strict(model: nn.Module, state: dict, source: Path, backbone: str) -> None:
    _load_strict_keys(model.state_dict(), state, source, backbone)
    model.load_state_dict(state)


def _load_strict_keys(own: dict, state: dict, source: Path, backbone: str) -> None:
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {label} (e.g. {', '.join(v[:3])})" for label, v in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("keys of another shape", wrong)) if v]
        raise DataError(f"weights file {source} does not fit {backbone}: " + "; ".join(parts))


def convnext_narrow(**kwargs) -> nn.Module:
    """ConvNeXt-Tiny's layout (same `features[i]` indices) at an eighth of its width and a
    third of its depth: for CPU demos and tests, where ConvNeXt-Tiny trains at ~2 images/s."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    blocks = [CNBlockConfig(24, 48, 1), CNBlockConfig(48, 96, 1), CNBlockConfig(96, 192, 3), CNBlockConfig(192, None, 1)]
    return ConvNeXt(blocks, stochastic_depth_prob=0.0, **kwargs)


def resnet10(**kwargs) -> nn.Module:
    """ResNet-18 with one residual block per stage instead of two: twice its speed, for real faces
    from scratch on a CPU, where it learns more within ten minutes than ResNet-18 (README)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], **kwargs)


LOCAL_MODELS = {"convnext_narrow": convnext_narrow, "resnet10": resnet10}


def _instantiate(backbone: str, image_size: int | None) -> nn.Module:
    if backbone in LOCAL_MODELS:
        return LOCAL_MODELS[backbone]()
    if backbone not in torchvision.models.list_models(module=torchvision.models):
        raise DataError(f"unknown backbone {backbone!r}: not a torchvision classifier (e.g. convnext_tiny, resnet18, "
                        "efficientnet_b0, vit_b_16, swin_t) nor one of agelens's own: "
                        + ", ".join(LOCAL_MODELS))
    # A ViT's position embeddings are sized for one input size.
    extra = {"image_size": image_size} if backbone.startswith("vit_") and image_size else {}
    return torchvision.models.get_model(backbone, weights=None, **extra)


def check_weights(backbone: str, path: Path, image_size: int) -> None:
    """The weights file fits `backbone` apart from its classifier (sized once the classes are known)."""
    model = _instantiate(backbone, image_size)
    state = read_state_dict(path)
    head = last_linear_name(model)
    body = {k: v for k, v in model.state_dict().items() if not k.startswith(head + ".")}
    _load_strict_keys(body, {k: v for k, v in state.items() if not k.startswith(head + ".")}, path, backbone)


def size_problem(backbone: str, image_size: int) -> str | None:
    """Why `backbone` cannot run at `image_size`, or None."""
    if backbone.startswith("vit_"):
        patch = int(backbone.rsplit("_", 1)[-1])
        if image_size % patch:
            return (f"{backbone} needs an image size that is a multiple of its patch size {patch} "
                    f"(e.g. {max(patch, image_size // patch * patch)} or {(image_size // patch + 1) * patch})")
    smallest = minimum_image_size(backbone, image_size)
    if smallest is not None:
        return f"{image_size} is too small for {backbone}: it needs at least {smallest}"
    return None


def minimum_image_size(backbone: str, image_size: int) -> int | None:
    """None when `backbone` runs at `image_size`; else the smallest size it runs at (found by
    trying: the limit comes from strides and kernel sizes, which differ per family)."""
    shared = None if backbone.startswith("vit_") else _instantiate(backbone, None).eval()

    def runs(size: int) -> bool:
        try:
            model = shared or _instantiate(backbone, size).eval()
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size))
            return True
        except (RuntimeError, ValueError, AssertionError):
            return False

    if runs(image_size):
        return None
    low, high = image_size, 1024
    while low + 1 < high:
        middle = (low + high) // 2
        low, high = (middle, high) if not runs(middle) else (low, middle)
    return high


def build_model(backbone: str, num_classes: int, weights: str | None = None, image_size: int | None = None) -> nn.Module:
    """`backbone` with `num_classes` outputs. `weights`: None, 'imagenet' or a state-dict path.

    A local file may hold either the backbone's own head (e.g. ImageNet's 1000 classes) or
    a head already sized for `num_classes` (a model this pipeline trained).
    """
    model = _instantiate(backbone, image_size)
    if weights in (None, "none"):
        return replace_last_linear(model, num_classes)
    source = ensure_pretrained(backbone) if weights == "imagenet" else Path(weights)
    state = read_state_dict(source)
    head = last_linear_name(model)
    trained_head = state.get(f"{head}.weight")
    if trained_head is not None and trained_head.shape[0] == num_classes != model.get_submodule(head).out_features:
        replace_last_linear(model, num_classes)
        _load_strict(model, state, source, backbone)
        return model
    _load_strict(model, state, source, backbone)
    return replace_last_linear(model, num_classes)
