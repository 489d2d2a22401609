"""Faithfulness of attribution maps: deletion and insertion curves (Petsiuk et al. 2018).

Deletion replaces the most salient pixels first, in steps, and records the probability of the
explained class; a faithful map makes it fall fast (low area under the curve). Insertion starts
from the image with every pixel replaced and puts the most salient back first; a faithful map
makes it rise fast (high area). Replaced pixels take the values of a strongly blurred copy of
the image rather than black, which keeps the perturbed images closer to natural ones. A map of
random values is scored in the same run as the baseline every method must beat.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms.functional import gaussian_blur

RANDOM = "random"


def blurred(x: torch.Tensor) -> torch.Tensor:
    """The replacement image: a Gaussian blur over about a tenth of the image."""
    sigma = max(1.0, x.shape[-1] / 20)
    kernel = int(2 * round(3 * sigma) + 1)
    return gaussian_blur(x, [kernel, kernel], [sigma, sigma])


def ranks(saliency: np.ndarray) -> np.ndarray:
    """(N, H, W) -> each pixel's rank, 0 = most salient (ties in raster order)."""
    flat = torch.from_numpy(np.ascontiguousarray(saliency.reshape(len(saliency), -1)))
    order = torch.argsort(-flat, dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(flat.shape[1]).expand_as(order).contiguous())
    return rank.reshape(saliency.shape).numpy()


@torch.no_grad()
def curves(model, x: torch.Tensor, saliencies: dict[str, np.ndarray], targets: torch.Tensor, steps: int,
           autocast, batch_size: int = 64) -> dict[str, dict[str, np.ndarray]]:
    """{method: {"deletion": (N, steps + 1), "insertion": (N, steps + 1)}}: the target class's
    probability after removing / inserting the top k/steps of pixels, k = 0..steps. Perturbed
    images are made and scored batch by batch, so memory does not grow with the image count."""
    n, pixels = len(x), x.shape[-1] * x.shape[-2]
    base = blurred(x)
    counts = torch.tensor([round(f * pixels) for f in np.linspace(0, 1, steps + 1)[1:-1]], device=x.device)

    def perturbed():
        yield torch.cat([x, base]), torch.cat([targets, targets])  # the ends every curve shares
        for saliency in saliencies.values():
            rank = torch.from_numpy(ranks(saliency)).to(x.device)
            for i in range(n):
                top = (rank[i][None] < counts[:, None, None])[:, None]  # (K, 1, H, W)
                classes = targets[i].repeat(len(counts))
                yield torch.where(top, base[i], x[i]), classes  # deletion
                yield torch.where(top, x[i], base[i]), classes  # insertion

    probs = _scores(model, perturbed(), autocast, batch_size)
    original, removed, probs = probs[:n], probs[n:2 * n], probs[2 * n:].reshape(len(saliencies), n, 2, -1)
    result = {}
    for m, method in enumerate(saliencies):
        result[method] = {
            "deletion": np.column_stack([original, probs[m, :, 0], removed]),
            "insertion": np.column_stack([removed, probs[m, :, 1], original]),
        }
    return result


def _scores(model, chunks, autocast, batch_size: int) -> np.ndarray:
    """Softmax probability of the given class for every image of a stream of (images, classes)."""
    out, images, classes, held = [], [], [], 0

    def flush():
        with autocast():
            logits = model(torch.cat(images))
        out.append(torch.softmax(logits.float(), 1).gather(1, torch.cat(classes)[:, None])[:, 0].cpu())
        images.clear(), classes.clear()

    for chunk, chunk_classes in chunks:
        images.append(chunk), classes.append(chunk_classes)
        held += len(chunk)
        if held >= batch_size:
            flush()
            held = 0
    if images:
        flush()
    return torch.cat(out).numpy()


def area(curve: np.ndarray) -> np.ndarray:
    """Area under each row of curves sampled at equal steps over [0, 1]."""
    return np.trapezoid(curve, np.linspace(0, 1, curve.shape[-1]), axis=-1)


def random_saliency(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(shape)
