"""Stage: project the learned features (not the logits) to 2-D with PCA and t-SNE."""

from __future__ import annotations

import numpy as np
import torch
from prefect import get_run_logger, task
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from tasks import plots
from tasks.decode import open_images
from tasks.evaluate import load_trained
from tasks.models import last_linear_name
from tasks.stage import StageKey, task_output, write_json
from tasks.train import Runtime, normalise, to_float

BATCH = 64  # inference only: the size changes speed, not the features


@torch.no_grad()
def penultimate_features(model: torch.nn.Module, images: np.ndarray, runtime: Runtime, batch_size: int) -> np.ndarray:
    """The input of the classifier's last Linear (768-d for ConvNeXt-Tiny), batched."""
    head = model.get_submodule(last_linear_name(model))
    captured = []
    handle = head.register_forward_pre_hook(lambda m, inputs: captured.append(inputs[0].float().cpu()))
    try:
        model.eval()
        for start in range(0, len(images), batch_size):
            with runtime.autocast():
                model(normalise(to_float(images[start:start + batch_size], runtime)))
    finally:
        handle.remove()
    return torch.cat(captured).flatten(1).numpy()


def project(features: np.ndarray, seed: int, perplexity: float) -> tuple[dict[str, np.ndarray], list[float]]:
    """2-D PCA and t-SNE coordinates (t-SNE's perplexity capped below the sample size), and
    the variance share of the two principal components."""
    pca = PCA(n_components=2, random_state=seed).fit(features)
    perplexity = min(perplexity, max(1.0, (len(features) - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)
    return {"pca": pca.transform(features), "tsne": tsne}, [float(v) for v in pca.explained_variance_ratio_]


@task(name="embed", cache_key_fn=StageKey("embed", ("tasks.embed", "tasks.plots")), persist_result=True,
      result_serializer="json")
def embed_features(decoded: dict, trained: dict, tsne_perplexity: float, seed: int, device: str, out: str) -> dict:
    log = get_run_logger()
    index, images = open_images(decoded)
    classes = trained["classes"]
    runtime = Runtime.resolve(device, trained["settings"]["precision"], trained["settings"]["channels_last"])
    model = load_trained(trained, runtime)
    keep = index["split"].isin(["train", "val"]).to_numpy()
    features = penultimate_features(model, images[keep], runtime, BATCH)
    coords, variance = project(features, seed, tsne_perplexity)
    table = index.loc[keep, ["path", "split", "label"]].reset_index(drop=True)
    for method, xy in coords.items():
        table[f"{method}_x"], table[f"{method}_y"] = xy[:, 0], xy[:, 1]
    log.info("projected %d feature vectors of dimension %d", *features.shape)
    with task_output() as out_dir:
        table.to_parquet(out_dir.path("coordinates.parquet"), index=False)
        np.save(out_dir.path("features.npy"), features.astype(np.float32))
        for method, title in (("pca", "PCA"), ("tsne", "t-SNE")):
            plots.save(plots.embedding_scatter(coords[method], table["label"].tolist(), classes,
                                               f"{title} of penultimate features ({features.shape[1]}-d), train + val"),
                       out_dir.path(f"{method}.png"))
        summary = {"images": int(len(table)), "feature_dim": int(features.shape[1]), "pca_explained_variance": variance}
        write_json(out_dir.path("summary.json"), summary)
        files = {"coordinates": "coordinates.parquet", "features": "features.npy", "pca": "pca.png", "tsne": "tsne.png"}
        return {"summary": summary, "outputs": {k: out_dir.handle(v) for k, v in files.items()}}
