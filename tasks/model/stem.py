"""A ResNet's stem with its ReLU after the max pool instead of before: the same function (a
maximum commutes with ReLU, and the gradient reaches the same pixels), with the ReLU and its
backward on a quarter of the pixels. Part of the stem's memory-bound work in CPU training
(bench/train_throughput.py); the state dict is unchanged."""

from __future__ import annotations

from torch import nn
from torchvision.models import ResNet


def relu_after_stem_pool(model: nn.Module) -> nn.Module:
    """`model`, rewired in place when it is a torchvision ResNet whose stem is conv, BN, ReLU, max pool."""
    if isinstance(model, ResNet) and isinstance(model.relu, nn.ReLU) and isinstance(model.maxpool, nn.MaxPool2d):
        model.maxpool = nn.Sequential(model.maxpool, nn.ReLU(inplace=True))
        model.relu = nn.Identity()
    return model
