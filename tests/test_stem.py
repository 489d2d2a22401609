"""The rewired stem computes what the plain one computes, forward and backward, under the same keys."""

import copy

import pytest
import torch
from torch import nn

from agelens.tasks.model.backbones import build_model
from agelens.tasks.model.stem import norm_after_stem_pool


def _signed_stem(model):
    """The stem's batch norm with scales of both signs (a negative one pools the minimum)."""
    with torch.no_grad():
        model.bn1.weight.copy_(torch.linspace(-1, 1, model.bn1.num_features))
        model.bn1.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("signs", ["positive", "both"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_training_steps_give_the_same_outputs_gradients_and_running_stats(signs, memory_format):
    torch.manual_seed(0)
    plain = build_model("resnet10", 6, image_size=64)
    plain = (_signed_stem(plain) if signs == "both" else plain).to(memory_format=memory_format)
    rewired = norm_after_stem_pool(copy.deepcopy(plain))
    assert isinstance(rewired.relu, nn.Identity) and isinstance(rewired.maxpool, nn.Identity)
    assert rewired.state_dict().keys() == plain.state_dict().keys()
    for step in range(2):  # the second step normalises with the first's running statistics in neither
        x = torch.randn(8, 3, 64, 64).contiguous(memory_format=memory_format)
        y = torch.randint(0, 6, (8,))
        outputs = []
        for model in (plain, rewired):
            model.zero_grad()
            out = model(x)
            nn.functional.cross_entropy(out, y).backward()
            outputs.append(out)
        assert torch.allclose(outputs[0], outputs[1], atol=1e-5), (outputs[0] - outputs[1]).abs().max()
        for (name, mine), theirs in zip(rewired.named_parameters(), plain.parameters()):
            scale = theirs.grad.abs().max()
            assert (mine.grad - theirs.grad).abs().max() <= 1e-5 * scale, name
        for (name, mine), theirs in zip(rewired.state_dict().items(), plain.state_dict().values()):
            assert torch.allclose(mine.double(), theirs.double(), rtol=1e-5, atol=1e-7), name
    assert int(rewired.bn1.num_batches_tracked) == 2
    plain.eval(), rewired.eval()
    x = torch.randn(4, 3, 64, 64)
    assert torch.allclose(plain(x), rewired(x), atol=1e-5)
    build_model("resnet10", 6, image_size=64).load_state_dict(rewired.state_dict())


def test_other_models_are_left_alone():
    model = build_model("convnext_narrow", 6)
    before = repr(model)
    assert repr(norm_after_stem_pool(model)) == before
