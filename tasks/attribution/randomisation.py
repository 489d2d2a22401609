"""Model-parameter randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps").

Cascading: re-initialise the model from the top down, one stage at a time, and after each
step compare the maps with the trained model's. A method whose maps survive the model's
destruction (high rank correlation) does not explain what the model learnt. Re-initialisation
draws from a private `torch.Generator`, so concurrent stages never share random state.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from agelens.tasks.attribution.layers import family, resolve_layer

# Top-down groups of layers re-initialised together: the head, then each stage with the
# downsampling that enters it.
CASCADE = {
    "convnext": [["classifier"], ["features.7", "features.6"], ["features.5", "features.4"],
                 ["features.3", "features.2"], ["features.1", "features.0"]],
    "resnet": [["fc"], ["layer4"], ["layer3"], ["layer2"], ["layer1", "bn1", "conv1"]],
    "efficientnet": [["classifier"], ["features.8", "features.7"], ["features.6", "features.5"],
                     ["features.4", "features.3"], ["features.2", "features.1", "features.0"]],
    "swin": [["head", "norm"], ["features.7", "features.6"], ["features.5", "features.4"],
             ["features.3", "features.2"], ["features.1", "features.0"]],
}


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _blocks(model: nn.Module) -> list[str]:
    """Parameterised blocks in forward order: top-level children, with long Sequentials (and a
    ViT encoder's layers) opened up."""
    names = []
    for name, child in model.named_children():
        if not _has_parameters(child):
            continue
        if isinstance(child, nn.Sequential) and len(child) > 2:
            names += [f"{name}.{i}" for i in range(len(child))]
        elif isinstance(getattr(child, "layers", None), nn.Sequential):
            names += [f"{name}.layers.{i}" for i in range(len(child.layers))]
            names += [f"{name}.{n}" for n, c in child.named_children() if n != "layers" and _has_parameters(c)]
        else:
            names.append(name)
    return names


def cascade_steps(model: nn.Module) -> list[list[str]]:
    """Groups of layer specs to re-initialise, top down (cumulatively)."""
    known = family(model)
    if known in CASCADE:
        return CASCADE[known]
    return [[name] for name in reversed(_blocks(model))]


@torch.no_grad()
def reinitialise(model: nn.Module, specs: list[str], generator: torch.Generator) -> None:
    """Fresh initial values for every parameter under `specs`, drawn from `generator`:
    PyTorch's default for convolutions and linear layers, 1/0 for normalisations, ConvNeXt's
    1e-6 layer scale, N(0, 0.02) for any other parameter (embeddings, tokens)."""
    for spec in specs:
        for module in resolve_layer(model, spec).modules():
            for name, param in module.named_parameters(recurse=False):
                if isinstance(module, (nn.Conv2d, nn.Linear)) and name == "weight":
                    nn.init.kaiming_uniform_(param, a=math.sqrt(5), generator=generator)
                elif isinstance(module, (nn.Conv2d, nn.Linear)) and name == "bias":
                    fan_in = nn.init._calculate_fan_in_and_fan_out(module.weight)[0]
                    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                    nn.init.uniform_(param, -bound, bound, generator=generator)
                elif name == "layer_scale":
                    param.fill_(1e-6)
                elif isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)):
                    param.fill_(1.0 if name == "weight" else 0.0)
                else:
                    nn.init.normal_(param, 0.0, 0.02, generator=generator)
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
                module.reset_running_stats()


def cascade(model: nn.Module, seed: int):
    """Yield (step name, model with every group so far re-initialised), top down; the
    trained model is never modified."""
    randomised = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    for group in cascade_steps(model):
        reinitialise(randomised, group, generator)
        yield "+".join(group), randomised


def saliency(maps: np.ndarray) -> np.ndarray:
    """Per-pixel importance (N, H, W): |map| for CAMs, max |gradient| over channels for gradients."""
    return np.abs(maps).max(1) if maps.ndim == 4 else np.abs(maps)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks along each row, ties sharing their average rank (as scipy's rankdata, which is
    written here with torch's multithreaded sort because it runs dozens of times per stage)."""
    rows = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
    ordered, order = torch.sort(rows, dim=1, stable=True)
    ranks = torch.empty_like(rows)
    for i in range(len(rows)):
        _, group, sizes = torch.unique_consecutive(ordered[i], return_inverse=True, return_counts=True)
        ends = torch.cumsum(sizes, 0).double()
        ranks[i, order[i]] = (ends - (sizes.double() - 1) / 2)[group]
    return ranks.numpy()


def rank_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho per image between two stacks of maps (Pearson's r of average ranks, as
    scipy's spearmanr); NaN where a map is constant."""
    ranks_a = average_ranks(saliency(a).reshape(len(a), -1))
    ranks_b = average_ranks(saliency(b).reshape(len(b), -1))
    ranks_a -= ranks_a.mean(1, keepdims=True)
    ranks_b -= ranks_b.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ranks_a * ranks_b).sum(1) / np.sqrt((ranks_a ** 2).sum(1) * (ranks_b ** 2).sum(1))
