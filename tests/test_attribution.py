"""CAM methods against pytorch-grad-cam, guided backprop against Captum and by hand, layouts
from the model's structure, one small model of each family."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import SwinTransformer, VisionTransformer

from agelens.tasks.attribution.cams import GRADIENT_CAMS, cam_maps, guided_backprop
from agelens.tasks.attribution.layers import as_nchw, cam_layer_of, check_layers, feature_layers_of, layout, resolve_layer
from agelens.tasks.core.errors import DataError
from agelens.tasks.attribution.evidence import adjacent_classes, explain_batch
from agelens.tasks.attribution.layers import layer_outputs
from agelens.tasks.model.inference import Runtime, model_input, penultimate_features
from agelens.tasks.model.backbones import build_model

ALL = [*GRADIENT_CAMS, "score_cam"]


def input_gradient(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain gradient of the target scores, which guided backprop must differ from."""
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(model(x).gather(1, targets.view(-1, 1)).sum(), x)
    return gradient.detach()


def narrow_convnext(seed: int) -> nn.Module:
    """A narrow ConvNeXt whose residual branches matter, as after training (at initialisation
    their layer scale is 1e-6, so gradients would take the skip connections only)."""
    torch.manual_seed(seed)
    model = build_model("convnext_narrow", 6).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "layer_scale"):
                module.layer_scale.fill_(0.5)
    return model


@pytest.fixture(scope="module")
def convnext():
    return narrow_convnext(0)


def small_family_models() -> dict[str, nn.Module]:
    """One small model of each family agelens names a default layer for."""
    torch.manual_seed(3)
    vit = VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                            num_classes=6)
    nn.init.normal_(vit.heads.head.weight, std=0.5)  # torchvision starts a ViT head at zero: no gradient at all
    return {
        "convnext": build_model("convnext_narrow", 6),
        "resnet": build_model("resnet18", 6),
        "efficientnet": build_model("efficientnet_b0", 6),
        "vit": vit,
        "swin": SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                window_size=[2, 2], num_classes=6),
    }


PYTORCH_GRAD_CAM = {"grad_cam": "GradCAM", "hirescam": "HiResCAM", "grad_cam_plus_plus": "GradCAMPlusPlus",
                    "xgrad_cam": "XGradCAM", "layer_cam": "LayerCAM", "score_cam": "ScoreCAM"}


def reference(method, model, layer, x, targets, reshape=None):
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = getattr(pytorch_grad_cam, PYTORCH_GRAD_CAM[method])
    with cls(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        return cam(input_tensor=x, targets=None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets])


# Score-CAM costs a forward pass per channel: once, with targets (the others cover targets=None).
@pytest.mark.parametrize("method, targets", [(m, t) for t in (None, [0, 3]) for m in ALL
                                             if not (m == "score_cam" and t is None)])
def test_every_cam_method_equals_pytorch_grad_cam(convnext, method, targets):
    """In float64: in float32, sums of near-cancelling terms (HiResCAM's on a barely trained
    model) differ in their last bits between numpy's order and torch's, which min-max scaling
    magnifies; in float64 both are exact, so this compares the formulas."""
    model = copy.deepcopy(convnext).double()
    size = 32 if method == "score_cam" else 64
    x = torch.rand(2, 3, size, size, dtype=torch.float64)
    for spec in ("features.-1", "features.5"):
        ours, _, _ = cam_maps(model, x, spec, [method], None if targets is None else torch.tensor(targets))
        theirs = reference(method, model, resolve_layer(model, spec), x, targets)
        assert ours[method].shape == x.shape[:1] + x.shape[2:]
        np.testing.assert_allclose(ours[method].numpy(), theirs, atol=1e-4, err_msg=f"{method} on {spec}")


def test_all_gradient_methods_come_from_one_pass(convnext, monkeypatch):
    import agelens.tasks.attribution.cams as attribution

    calls = []
    real = attribution.activations_and_gradients
    monkeypatch.setattr(attribution, "activations_and_gradients", lambda *a, **k: calls.append(1) or real(*a, **k))
    maps, _, _ = cam_maps(convnext, torch.rand(2, 3, 64, 64), "features.-1", list(GRADIENT_CAMS))
    assert len(calls) == 1 and set(maps) == set(GRADIENT_CAMS)


@pytest.mark.parametrize("size, layer, side", [(32, "features.3", 4), (64, "features.5", 4), (224, "features.-1", 7)])
def test_the_automatic_cam_layer_keeps_a_usable_resolution(convnext, size, layer, side):
    """At 32 px ConvNeXt's last stage is 1x1 and at 64 px 2x2: every CAM method then draws the same
    blob. The automatic choice goes back a stage at a time until the map has 4 cells a side."""
    from agelens.tasks.attribution.layers import map_sides

    assert cam_layer_of(convnext, "auto", size) == layer
    assert map_sides(convnext, [layer], size)[layer] == side
    assert cam_layer_of(convnext, "features.-1", size) == "features.-1"  # a layer given by name is kept
    if size == 32:
        maps = explain_batch(convnext, torch.rand(3, 3, 32, 32), layer, ["grad_cam", "layer_cam"])["maps"]
        assert not np.allclose(maps["grad_cam"], maps["layer_cam"], atol=1e-3)  # methods can differ again


def test_preflight_names_the_cam_layer_and_warns_when_it_is_coarse():
    from agelens.flows.service.preflight import check_model_settings
    from agelens.flows.pipeline.settings import RunSettings

    notes = check_model_settings(RunSettings(backbone="convnext_narrow", image_size=64), {"explain"})
    assert notes == ["CAM layer features.5 (chosen for 64 px): a 4x4 map"]
    notes = check_model_settings(RunSettings(backbone="convnext_narrow", image_size=64, cam_layer="features.-1"),
                                 {"explain"})
    assert notes[0].startswith("CAM layer features.-1 (given by --cam-layer; at 64 px): a 2x2 map, coarser than 4x4")


@pytest.mark.parametrize("name", ["convnext", "resnet", "efficientnet", "vit", "swin"])
def test_each_family_is_explained_with_its_default_layer(name):
    model = small_family_models()[name].eval()
    x = torch.rand(2, 3, 64, 64)
    spec = cam_layer_of(model, "auto")
    kind = layout(model, spec)
    assert kind == {"vit": "tokens", "swin": "nhwc"}.get(name, "nchw")
    maps = explain_batch(model, x, spec, ["grad_cam", "layer_cam"])["maps"]
    assert maps["grad_cam"].shape == (2, 64, 64) and maps["guided_backprop"].shape == (2, 3, 64, 64)
    assert 0 < maps["grad_cam"].max() <= 1 and maps["grad_cam"].min() >= 0
    reshape = {"vit": lambda t: as_nchw(t, "tokens", spec), "swin": lambda t: t.permute(0, 3, 1, 2)}.get(name)
    theirs = reference("grad_cam", model, resolve_layer(model, spec), x, None, reshape)
    np.testing.assert_allclose(maps["grad_cam"], theirs, atol=1e-4)
    features = penultimate_features(model, np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8),
                                    np.arange(3), Runtime.resolve("cpu", "fp32", "off"), batch_size=2)
    assert features.shape[0] == 3 and features.ndim == 2
    layers = feature_layers_of(model, ["auto"])
    assert check_layers(model, [spec, *layers], 64) == []
    for layer, grid in layer_outputs(model, x, layers).items():  # the feature-map stage's view
        assert grid.ndim == 4 and grid.shape[0] == 2 and min(grid.shape[2:]) >= 1, (layer, grid.shape)


def test_layout_comes_from_the_modules_even_when_the_shape_is_square():
    """convnext_narrow at 96 px: the LayerNorm inside a block of stage 1 outputs (N, 24, 24, 24)
    in (N, H, W, C) order: a shape cannot tell, the Permute before it does."""
    model = narrow_convnext(1)
    spec = "features.1.0.block.2"
    assert [layout(model, f"features.1.0.block.{i}") for i in range(7)] == \
        ["nchw", "nhwc", "nhwc", "nhwc", "nhwc", "nhwc", "nchw"]
    assert layout(model, "features.1.0") == "nchw" and layout(model, "features.-1") == "nchw"
    x = torch.rand(2, 3, 96, 96)
    ours, _, _ = cam_maps(model, x, spec, ["grad_cam"], torch.tensor([1, 2]))
    theirs = reference("grad_cam", model, resolve_layer(model, spec), x, [1, 2], reshape=lambda t: t.permute(0, 3, 1, 2))
    np.testing.assert_allclose(ours["grad_cam"].numpy(), theirs, atol=1e-4)
    swin = small_family_models()["swin"]
    assert layout(swin, "features.0.0") == "nchw" and layout(swin, "features.0") == "nhwc"
    assert layout(swin, "norm") == "nhwc"


def test_layers_that_cannot_give_a_map_are_named(convnext):
    problems = check_layers(convnext, ["classifier.2", "features.99", "features.5"], 32)
    assert len(problems) == 2
    assert any("layer 'features.99' not found in ConvNeXt" in p for p in problems)
    assert any("layer 'classifier.2' outputs (1, 6), not an image-shaped map" in p for p in problems)
    with pytest.raises(DataError, match="no default CAM layer for ReluNet"):
        cam_layer_of(ReluNet(), "auto")


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


def test_guided_grad_cam_is_guided_backprop_times_the_first_cam(convnext):
    maps = explain_batch(convnext, torch.rand(2, 3, 64, 64), "features.-1", ["layer_cam", "grad_cam"])["maps"]
    np.testing.assert_allclose(maps["guided_grad_cam"], maps["guided_backprop"] * maps["layer_cam"][:, None], atol=1e-7)


def test_the_random_logit_test_explains_the_neighbouring_decade():
    assert adjacent_classes(np.array([0, 2, 5]), 6).tolist() == [1, 3, 4]


@pytest.mark.parametrize("backbone, dim", [("convnext_tiny", 768), ("convnext_narrow", 192), ("resnet18", 512)])
def test_embedding_is_the_penultimate_feature(backbone, dim):
    torch.manual_seed(0)
    model = build_model(backbone, 6).eval()
    images = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    runtime = Runtime.resolve("cpu", "fp32", "off")
    rows = np.array([4, 0, 3, 1, 2])  # any order: features come back in the order asked for
    features = penultimate_features(model, images, rows, runtime, batch_size=2)
    assert features.shape == (5, dim)
    head = model.fc if backbone == "resnet18" else model.classifier[2]
    with torch.no_grad():
        logits = model(model_input(torch.from_numpy(images[rows]), runtime))
    torch.testing.assert_close(head(torch.from_numpy(features)), logits, atol=1e-4, rtol=1e-4)
