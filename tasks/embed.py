"""Stage: project the learned features (not the logits) to 2-D with PCA and t-SNE."""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from tasks.plots import base, evaluation
from tasks.arrays import open_decoded
from tasks.inference import load_trained, penultimate_features, runtime_for
from tasks.picking import stratified
from tasks.stage import Job, logger


def project(features: np.ndarray, seed: int, perplexity: float) -> tuple[dict[str, np.ndarray], list[float]]:
    """2-D PCA and t-SNE coordinates (t-SNE's perplexity capped below the sample size), and
    the variance share of the two principal components."""
    pca = PCA(n_components=2, random_state=seed).fit(features)
    perplexity = min(perplexity, max(1.0, (len(features) - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)
    return {"pca": pca.transform(features), "tsne": tsne}, [float(v) for v in pca.explained_variance_ratio_]


def run(job: Job) -> dict:
    log = logger()
    settings = job.settings
    index, array = open_decoded(job)
    classes = job.upstream["train"]["meta"]["classes"]
    runtime = runtime_for(job)
    model = load_trained(job, runtime)
    rows = stratified(index, ("train", "val"), settings["embed_images"], settings["seed"])
    features = penultimate_features(model, array, rows, runtime, settings["eval_batch_size"])
    coords, variance = project(features, settings["seed"], settings["tsne_perplexity"])
    table = index.loc[rows, ["path", "split", "label"]].reset_index(drop=True)
    for method, xy in coords.items():
        table[f"{method}_x"], table[f"{method}_y"] = xy[:, 0], xy[:, 1]
    log.info("projected %d feature vectors of dimension %d", *features.shape)
    with job.output() as out:
        table.to_parquet(out.path("coordinates.parquet"), index=False)
        np.save(out.path("features.npy"), features.astype(np.float32))
        for method, title in (("pca", "PCA"), ("tsne", "t-SNE")):
            base.save(evaluation.embedding_scatter(coords[method], table["label"].tolist(), classes,
                                               f"{title} of penultimate features ({features.shape[1]}-d), train + val"),
                       out.path(f"{method}.png"))
        for name, file in (("coordinates", "coordinates.parquet"), ("features", "features.npy"), ("pca", "pca.png"),
                           ("tsne", "tsne.png")):
            out.add(name, file)
        summary = {"images": int(len(table)), "feature_dim": int(features.shape[1]), "pca_explained_variance": variance}
        return out.finish(summary)
