"""The rewired stem computes what the plain one computes, forward and backward, under the same keys."""

import copy

import torch
from torch import nn

from agelens.tasks.model.backbones import build_model
from agelens.tasks.model.stem import relu_after_stem_pool


def test_resnet_stem_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = build_model("resnet10", 6, image_size=64)
    rewired = relu_after_stem_pool(copy.deepcopy(plain))
    assert isinstance(rewired.relu, nn.Identity) and isinstance(rewired.maxpool[1], nn.ReLU)
    assert rewired.state_dict().keys() == plain.state_dict().keys()
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 6, (8,))
    outputs = []
    for model in (plain, rewired):
        out = model(x)
        nn.functional.cross_entropy(out, y).backward()
        outputs.append(out)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-6)
    for (name, mine), theirs in zip(rewired.named_parameters(), plain.parameters()):
        assert torch.allclose(mine.grad, theirs.grad, rtol=1e-4, atol=1e-7), name


def test_other_models_are_left_alone():
    model = build_model("convnext_narrow", 6)
    before = repr(model)
    assert repr(relu_after_stem_pool(model)) == before
