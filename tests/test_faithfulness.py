"""Deletion/insertion on a toy model whose answer is known, and the randomisation cascade."""

import contextlib

import numpy as np
import pytest
import torch
from torch import nn

from agelens.tasks.attribution.faithfulness import area, curves, random_saliency, ranks
from agelens.tasks.model.backbones import build_model
from agelens.tasks.attribution.randomisation import CASCADE, cascade, cascade_steps, rank_correlation, reinitialise

SIZE = 32


class TopLeftQuadrant(nn.Module):
    """Reads only the top-left quadrant: class 0's score is the fine texture (variance) there."""

    def forward(self, x):
        quadrant = x[:, 0, : SIZE // 2, : SIZE // 2]
        energy = ((quadrant - 0.5) ** 2).mean((1, 2))
        return torch.stack([40 * (energy - 0.1), -40 * (energy - 0.1)], 1)


def quadrant_images(n: int) -> torch.Tensor:
    x = torch.full((n, 3, SIZE, SIZE), 0.5)
    checker = (torch.arange(SIZE)[:, None] + torch.arange(SIZE)[None]) % 2
    x[:, 0, : SIZE // 2, : SIZE // 2] = checker[: SIZE // 2, : SIZE // 2].float()  # texture the blur removes
    return x + 0.01 * torch.rand(n, 3, SIZE, SIZE)


def quadrant_map(row: slice, col: slice, n: int) -> np.ndarray:
    saliency = np.zeros((n, SIZE, SIZE))
    saliency[:, row, col] = 1
    return saliency + 1e-3 * np.random.default_rng(0).random((n, SIZE, SIZE))


def test_deletion_and_insertion_rank_maps_by_what_the_model_reads():
    model, x = TopLeftQuadrant(), quadrant_images(3)
    half, rest = slice(0, SIZE // 2), slice(SIZE // 2, SIZE)
    maps = {"right": quadrant_map(half, half, 3), "wrong": quadrant_map(rest, rest, 3),
            "random": random_saliency((3, SIZE, SIZE), seed=0)}
    result = curves(model, x, maps, torch.zeros(3, dtype=torch.long), steps=8, autocast=contextlib.nullcontext,
                    batch_size=5)
    deletion = {m: area(c["deletion"]).mean() for m, c in result.items()}
    insertion = {m: area(c["insertion"]).mean() for m, c in result.items()}
    assert deletion["right"] < deletion["random"] < deletion["wrong"], deletion
    assert insertion["right"] > insertion["random"] > insertion["wrong"], insertion
    for c in result.values():  # shared ends: the original image and the fully replaced one
        np.testing.assert_allclose(c["deletion"][:, 0], c["insertion"][:, -1])
        np.testing.assert_allclose(c["deletion"][:, -1], c["insertion"][:, 0])
        assert c["deletion"].shape == (3, 9)
    # Removing the quadrant's top quarter of pixels (1/16 of the image) already lowers the score.
    assert (result["right"]["deletion"][:, 1] < result["wrong"]["deletion"][:, 1]).all()


def test_ranks_put_the_most_salient_pixel_first():
    saliency = np.array([[[0.1, 0.9], [0.5, 0.2]]])
    assert ranks(saliency).tolist() == [[[3, 0], [1, 2]]]
    assert area(np.array([[1.0, 1.0, 1.0]])) == pytest.approx(1.0)


def test_cascade_reinitialises_top_down_and_leaves_the_trained_model_alone():
    torch.manual_seed(0)
    model = build_model("convnext_narrow", 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert cascade_steps(model) == CASCADE["convnext"]
    touched = set()
    for step, (name, randomised) in enumerate(cascade(model, seed=0), start=1):
        changed = {k for k, v in randomised.state_dict().items() if not torch.equal(v, before[k])}
        assert touched <= changed  # cumulative
        touched = changed
        if step == 1:
            assert name == "classifier" and all(k.startswith("classifier") for k in changed)
    assert any(k.startswith("features.0") for k in touched)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # A private generator: the same seed gives the same weights, and the global RNG is untouched.
    a, b = build_model("convnext_narrow", 6), build_model("convnext_narrow", 6)
    state = torch.get_rng_state()
    reinitialise(a, ["features.7"], torch.Generator().manual_seed(5))
    reinitialise(b, ["features.7"], torch.Generator().manual_seed(5))
    assert torch.equal(a.features[7][0].block[3].weight, b.features[7][0].block[3].weight)
    assert torch.equal(torch.get_rng_state(), state)


def test_generic_cascade_for_a_vit_opens_the_encoder():
    from torchvision.models import VisionTransformer

    vit = VisionTransformer(image_size=32, patch_size=16, num_layers=3, num_heads=1, hidden_dim=8, mlp_dim=8)
    steps = [s[0] for s in cascade_steps(vit)]
    assert steps == ["heads", "encoder.ln", "encoder.layers.2", "encoder.layers.1", "encoder.layers.0", "conv_proj"]


def test_rank_correlation_of_identical_maps_is_one_and_constant_maps_undefined():
    maps = np.random.default_rng(0).random((2, 8, 8))
    np.testing.assert_allclose(rank_correlation(maps, maps), 1.0)
    assert np.isnan(rank_correlation(np.zeros((1, 8, 8)), maps[:1])).all()
    gradients = np.random.default_rng(1).normal(size=(2, 3, 8, 8))
    assert rank_correlation(gradients, -gradients).tolist() == pytest.approx([1.0, 1.0])  # magnitudes
