"""Grad-CAM and guided backprop against pytorch-grad-cam and Captum, and by hand."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from tasks.attribution import grad_cam, guided_backprop, input_gradient
from tasks.embed import penultimate_features
from tasks.explain import explain_batch, randomised_copy, rank_correlations
from tasks.models import build_model
from tasks.sources import DataError
from tasks.train import Runtime


@pytest.fixture(scope="module")
def convnext():
    """A narrow ConvNeXt whose residual branches matter, as after training (at initialisation
    their layer scale is 1e-6, so gradients would take the skip connections only)."""
    torch.manual_seed(0)
    model = build_model("convnext_narrow", 6).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "layer_scale"):
                module.layer_scale.fill_(0.5)
    return model


def pytorch_grad_cam(model, layer, x, targets, reshape=None):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        return cam(input_tensor=x, targets=None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets])


@pytest.mark.parametrize("targets", [None, [0, 3, 5]])
def test_grad_cam_equals_pytorch_grad_cam(convnext, targets):
    x = torch.rand(3, 3, 64, 64)
    for spec, layer in (("features.-1", convnext.features[-1]), ("features.5", convnext.features[5])):
        ours, _ = grad_cam(convnext, x, spec, None if targets is None else torch.tensor(targets))
        theirs = pytorch_grad_cam(convnext, layer, x, targets)
        assert ours.shape == (3, 64, 64)
        np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-4)


def test_grad_cam_on_a_resnet_and_on_a_channels_last_layer(convnext):
    torch.manual_seed(1)
    resnet = build_model("resnet18", 6).eval()
    x = torch.rand(2, 3, 64, 64)
    ours, _ = grad_cam(resnet, x, "layer4", torch.tensor([1, 2]))
    np.testing.assert_allclose(ours.numpy(), pytorch_grad_cam(resnet, resnet.layer4, x, [1, 2]), atol=1e-4)
    # The LayerNorm inside a ConvNeXt block hands on (N, H, W, C): recognised and permuted.
    layer = convnext.features[5][0].block[2]
    assert isinstance(layer, nn.LayerNorm)
    ours, _ = grad_cam(convnext, x, "features.5.0.block.2", torch.tensor([1, 2]))
    theirs = pytorch_grad_cam(convnext, layer, x, [1, 2], reshape=lambda t: t.permute(0, 3, 1, 2))
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-4)


def test_layers_that_cannot_give_a_cam_are_one_clear_error(convnext):
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(DataError, match=r"layer 'classifier.2' outputs \(1, 6\), not an image-shaped"):
        grad_cam(convnext, x, "classifier.2")
    with pytest.raises(DataError, match=r"layer 'features.99' not found in ConvNeXt"):
        grad_cam(convnext, x, "features.99")


class ReluNet(nn.Module):
    def __init__(self, activation=nn.ReLU):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), activation(), nn.Conv2d(8, 8, 3, padding=1),
                                  activation(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        return self.body(x)


def test_guided_backprop_equals_captum_on_a_relu_network():
    from captum.attr import GuidedBackprop

    torch.manual_seed(2)
    net = ReluNet().eval()
    x = torch.randn(3, 3, 16, 16)
    targets = torch.tensor([0, 1, 3])
    ours = guided_backprop(net, x, targets)
    theirs = GuidedBackprop(net).attribute(x.clone().requires_grad_(True), target=targets)
    assert ours.abs().sum() > 0
    torch.testing.assert_close(ours, theirs.detach(), atol=1e-5, rtol=0)
    assert not torch.allclose(ours, input_gradient(net, x, targets))


def test_gelu_gate_by_hand():
    """score = w2 . GELU(W1 x): unit 0 has a positive input and a positive gradient (passes,
    times GELU'(1)); unit 1 has a positive gradient but a negative input (blocked, although
    GELU's own derivative there is not zero)."""
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.GELU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -0.5]]))
        net[2].weight.copy_(torch.tensor([[2.0, 3.0]]))
    x = torch.tensor([[1.0, 1.0]])
    gelu_grad = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2))) + z * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    expected = torch.tensor([[2.0 * gelu_grad(1.0), 0.0]])
    torch.testing.assert_close(guided_backprop(net, x, torch.tensor([0])), expected)
    plain = input_gradient(net, x, torch.tensor([0]))
    torch.testing.assert_close(plain, torch.tensor([[2.0 * gelu_grad(1.0), -0.5 * 3.0 * gelu_grad(-0.5)]]))
    with torch.no_grad():
        net[2].weight.copy_(torch.tensor([[-2.0, 3.0]]))  # negative gradient at the positive unit: nothing passes
    assert torch.count_nonzero(guided_backprop(net, x, torch.tensor([0]))) == 0


def test_guided_backprop_leaves_the_model_unchanged_and_repeats(convnext):
    before = {k: v.clone() for k, v in convnext.state_dict().items()}
    modules_before = [type(m) for m in convnext.modules()]
    x = torch.rand(2, 3, 32, 32)
    targets = torch.tensor([1, 4])
    first = guided_backprop(convnext, x, targets)
    second = guided_backprop(convnext, x, targets)
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    assert all(not m._forward_hooks and not m._backward_hooks for m in convnext.modules())
    assert [type(m) for m in convnext.modules()] == modules_before
    assert all(torch.equal(before[k], v) for k, v in convnext.state_dict().items())
    plain = input_gradient(convnext, x, targets)
    assert (first - plain).abs().max() > 1e-3 * plain.abs().max()  # GELU gating changes the answer
    assert (first != 0).float().mean() > 0.01


def test_guided_grad_cam_is_the_product(convnext):
    x = torch.rand(2, 3, 64, 64)
    maps = explain_batch(convnext, x, "features.-1")
    np.testing.assert_allclose(maps["guided_grad_cam"], maps["guided_backprop"] * maps["grad_cam"][:, None], atol=1e-7)
    assert maps["grad_cam"].min() >= 0 and maps["grad_cam"].max() <= 1


def test_sanity_check_reinitialises_and_correlates(convnext):
    x = torch.rand(3, 3, 64, 64)
    randomised = randomised_copy(convnext, ["features.-1", "classifier.2"], seed=0)
    assert not torch.equal(randomised.classifier[2].weight, convnext.classifier[2].weight)
    assert torch.equal(randomised.features[0][0].weight, convnext.features[0][0].weight)
    maps = explain_batch(convnext, x, "features.-1")
    table = rank_correlations(maps, explain_batch(randomised, x, "features.-1", torch.as_tensor(maps["targets"])))
    assert set(table["method"]) == {"grad_cam", "guided_backprop", "guided_grad_cam"} and len(table) == 9
    assert table["spearman"].between(-1, 1).all()
    same = rank_correlations(maps, maps)
    np.testing.assert_allclose(same["spearman"], 1.0)


@pytest.mark.parametrize("backbone, dim", [("convnext_tiny", 768), ("convnext_narrow", 192), ("resnet18", 512)])
def test_embedding_is_the_penultimate_feature(backbone, dim):
    torch.manual_seed(0)
    model = build_model(backbone, 6).eval()
    images = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    runtime = Runtime.resolve("cpu", "fp32", "off")
    features = penultimate_features(model, images, runtime, batch_size=2)
    assert features.shape == (5, dim)
    head = model.fc if backbone == "resnet18" else model.classifier[2]
    from tasks.train import normalise, to_float

    with torch.no_grad():
        logits = model(normalise(to_float(images, runtime)))
    torch.testing.assert_close(head(torch.from_numpy(features)), logits, atol=1e-4, rtol=1e-4)
