"""Stage: feature maps of chosen layers for a few validation images per class."""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import pandas as pd
import torch
from prefect import get_run_logger, task

from tasks import plots
from tasks.attribution import as_nchw, capture, resolve_layer
from tasks.decode import open_images
from tasks.evaluate import load_trained
from tasks.stage import StageKey, task_output, write_json
from tasks.train import Runtime, normalise, to_float


def pick_per_class(index: pd.DataFrame, split: str, classes: list[str], per_class: int) -> dict[str, np.ndarray]:
    """Rows of the first `per_class` images (by path) of each class in `split`."""
    rows = index[index["split"] == split].sort_values("path")
    return {c: rows.loc[rows["label"] == c, "row"].to_numpy()[:per_class] for c in classes
            if (rows["label"] == c).any()}


@torch.no_grad()
def layer_outputs(model, x: torch.Tensor, layers: list[str]) -> dict[str, np.ndarray]:
    """Each layer's output (N, C, H, W) for the batch `x`."""
    with ExitStack() as stack:
        stores = {spec: stack.enter_context(capture(resolve_layer(model, spec))) for spec in layers}
        model(x)
    return {spec: as_nchw(stores[spec]["output"], tuple(x.shape[-2:]), spec).float().cpu().numpy() for spec in layers}


@task(name="featuremaps", cache_key_fn=StageKey("featuremaps", ("tasks.featuremaps", "tasks.attribution", "tasks.plots")),
      persist_result=True, result_serializer="json")
def feature_maps(decoded: dict, trained: dict, layers: list[str], images_per_class: int, channels: int,
                 device: str, out: str) -> dict:
    log = get_run_logger()
    index, images = open_images(decoded)
    runtime = Runtime.resolve(device, "fp32", trained["settings"]["channels_last"])
    model = load_trained(trained, runtime)
    for spec in layers:
        resolve_layer(model, spec)  # a wrong name fails before any work
    picked = pick_per_class(index, "val", trained["classes"], images_per_class)
    files = []
    with task_output() as out_dir:
        for label, rows in picked.items():
            outputs = layer_outputs(model, normalise(to_float(images[rows], runtime)), layers)
            for spec, maps in outputs.items():
                for k, row in enumerate(rows):
                    name = f"feature_maps/{label}/{spec}/feature_map_{k}.png"
                    title = f"{label} · {spec} · {index.loc[row, 'path']} (first {min(channels, maps.shape[1])} channels)"
                    plots.save(plots.channel_grid(maps[k, :channels], title), out_dir.path(name), dpi=80)
                    files.append(name)
        summary = {"layers": layers, "classes": list(picked), "images_per_class": {c: len(r) for c, r in picked.items()},
                   "files": len(files)}
        write_json(out_dir.path("summary.json"), summary)
        log.info("drew %d feature-map grids for layers %s", len(files), ", ".join(layers))
        return {"summary": summary, "outputs": {"feature_maps": out_dir.final_path("feature_maps"),
                                                "summary": out_dir.handle("summary.json")}}
