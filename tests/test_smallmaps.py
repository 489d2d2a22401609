"""Small-map convolutions compute what nn.Conv2d computes, forward and backward, and change no keys."""

import copy

import pytest
import torch
from torch import nn

from agelens.tasks.model.backbones import build_model
from agelens.tasks.model.smallmaps import AmxConv2d, NCHWConv2d, SmallMapConv2d, for_small_maps, small_map_convs


def test_only_convs_on_small_maps_are_chosen():
    model = build_model("resnet10", 6, image_size=64)  # layer4 runs on 2x2 maps, layer3 on 4x4
    chosen = small_map_convs(model, 64)
    assert sorted(chosen) == ["layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0"]
    assert sorted(small_map_convs(model, 64, 16)) == sorted(chosen + ["layer3.0.conv1", "layer3.0.conv2",
                                                                      "layer3.0.downsample.0"])
    assert model.training
    assert small_map_convs(model, 224) == []  # 7x7 maps


@pytest.mark.parametrize("kind", [SmallMapConv2d, AmxConv2d])
@pytest.mark.parametrize("stride,size,bias,kernel", [(1, 2, False, 3), (2, 5, True, 3), (1, 3, True, 3), (2, 4, False, 1),
                                                     (1, 5, True, 3), (2, 9, False, 3), (1, 7, False, 3)])
def test_gradients_match_conv2d_in_fp32_and_bf16(kind, stride, size, bias, kernel):
    """On 2x2-3x3 output maps all three products by matrix multiply, on 4x4-5x5 (AmxConv2d) the
    weight gradient only, on 7x7 none: each agrees with nn.Conv2d."""
    torch.manual_seed(0)
    plain = nn.Conv2d(16, 24, kernel, stride=stride, padding=kernel // 2, bias=bias)
    small = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    small.__class__ = kind
    x = torch.randn(4, 16, size, size).contiguous(memory_format=torch.channels_last)
    for autocast, tolerance in ((False, 1e-5), (True, 3e-2)):
        grads = []
        for conv in (plain, small):
            conv.zero_grad()
            xi = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = conv(xi)
            (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            grads.append((out.float(), xi.grad, conv.weight.grad, conv.bias.grad if bias else None))
        for mine, theirs in zip(grads[1], grads[0]):
            if theirs is not None:
                scale = theirs.abs().max()
                assert (mine - theirs).abs().max() <= tolerance * scale, (autocast, (mine - theirs).abs().max(), scale)


def test_a_model_trains_alike_and_keeps_its_keys():
    torch.manual_seed(0)
    plain = build_model("resnet10", 6, image_size=64)
    fast = for_small_maps(copy.deepcopy(plain), 64)
    assert isinstance(fast.layer4[0].conv2, SmallMapConv2d) and type(fast.layer3[0].conv2) is NCHWConv2d
    assert type(fast.layer2[0].conv2) is nn.Conv2d
    amx = for_small_maps(copy.deepcopy(plain), 80, amx_bf16=True)  # maps up to 5x5: layer3 and layer4
    assert {name for name, m in amx.named_modules() if type(m) is AmxConv2d} == {
        f"layer{i}.0.{conv}" for i in (3, 4) for conv in ("conv1", "conv2", "downsample.0")}
    fast = fast.to(memory_format=torch.channels_last)  # as training runs it: layer3 converts to NCHW
    assert fast.state_dict().keys() == plain.state_dict().keys()
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 6, (8,))
    for model in (plain, fast):
        nn.functional.cross_entropy(model(x), y).backward()
    for (name, mine), theirs in zip(fast.named_parameters(), plain.parameters()):
        assert torch.allclose(mine.grad, theirs.grad, rtol=1e-3, atol=1e-5), name
    build_model("resnet10", 6, image_size=64).load_state_dict(fast.state_dict())
