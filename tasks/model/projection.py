"""2-D projections of learned features (scikit-learn's PCA and t-SNE)."""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE


def project(features: np.ndarray, seed: int, perplexity: float) -> tuple[dict[str, np.ndarray], list[float]]:
    """2-D PCA and t-SNE coordinates (t-SNE's perplexity capped below the sample size), and
    the variance share of the two principal components."""
    pca = PCA(n_components=2, random_state=seed).fit(features)
    perplexity = min(perplexity, max(1.0, (len(features) - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)
    return {"pca": pca.transform(features), "tsne": tsne}, [float(v) for v in pca.explained_variance_ratio_]
