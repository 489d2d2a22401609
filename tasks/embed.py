"""Stage: project the learned features (not the logits) to 2-D with PCA and t-SNE."""

from __future__ import annotations

from agelens.tasks.core.stage import Job, Stage, Summary, logger


class EmbedSummary(Summary):
    images: int
    feature_dim: int
    pca_explained_variance: list[float]


STAGE = Stage("embed", EmbedSummary, needs=("decode", "train"), reads=("embed_images", "tsne_perplexity", "seed"),
              uses=("device", "eval_batch_size"), outputs=("coordinates", "features", "pca", "tsne"))


def run(job: Job) -> dict:
    import numpy as np

    from agelens.tasks.data.arrays import open_decoded
    from agelens.tasks.data.picking import stratified
    from agelens.tasks.model.inference import load_trained, penultimate_features, runtime_for
    from agelens.tasks.model.projection import project
    from agelens.tasks.reporting.plots import base, evaluation

    log = logger()
    settings = job.settings
    index, array = open_decoded(job)
    classes = job.context["classes"]
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
                                                   f"{title} of penultimate features ({features.shape[1]}-d), "
                                                   "train + val"), out.path(f"{method}.png"))
        for name, file in (("coordinates", "coordinates.parquet"), ("features", "features.npy"), ("pca", "pca.png"),
                           ("tsne", "tsne.png")):
            out.add(name, file)
        return out.finish(EmbedSummary(images=len(table), feature_dim=features.shape[1],
                                       pca_explained_variance=variance))


def describe(s: EmbedSummary) -> str:
    return f"{s.images} feature vectors of dimension {s.feature_dim}"


def report_section(view) -> list[str]:
    from agelens.tasks.reporting.markdown import image

    return ["## Embedding of penultimate features", image(view.path("pca"), "PCA"), image(view.path("tsne"), "t-SNE")]
