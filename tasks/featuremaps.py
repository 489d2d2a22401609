"""Stage: feature maps of chosen layers for a few validation images per class."""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import torch

from tasks.plots import base, explanations
from tasks.arrays import open_decoded
from tasks.attribution import as_nchw, capture, feature_layers_of, layout, resolve_layer
from tasks.inference import load_trained, model_input, runtime_for
from tasks.picking import first_per_class
from tasks.stage import Job, logger


@torch.no_grad()
def layer_outputs(model, x: torch.Tensor, layers: list[str]) -> dict[str, np.ndarray]:
    """Each layer's output as (N, C, H, W) for the batch `x`."""
    with ExitStack() as stack:
        stores = {spec: stack.enter_context(capture(resolve_layer(model, spec))) for spec in layers}
        model(x)
    return {spec: as_nchw(stores[spec]["output"], layout(model, spec), spec).float().cpu().numpy() for spec in layers}


def run(job: Job) -> dict:
    log = logger()
    settings = job.settings
    index, array = open_decoded(job)
    runtime = runtime_for(job).exact()
    model = load_trained(job, runtime)
    layers = feature_layers_of(model, settings["feature_layers"])
    channels = settings["feature_channels"]
    picked = first_per_class(index, "val", job.upstream["train"]["meta"]["classes"], settings["feature_images"])
    files = []
    with job.output() as out:
        for label, rows in picked.items():
            outputs = layer_outputs(model, model_input(torch.from_numpy(array[rows]), runtime), layers)
            for spec, maps in outputs.items():
                for k, row in enumerate(rows):
                    name = f"feature_maps/{label}/{spec}/feature_map_{k}.png"
                    title = f"{label} · {spec} · {index.loc[row, 'path']} (first {min(channels, maps.shape[1])} channels)"
                    base.save(explanations.channel_grid(maps[k, :channels], title), out.path(name), dpi=80)
                    files.append(name)
        out.add("feature_maps", "feature_maps")
        log.info("drew %d feature-map grids for layers %s", len(files), ", ".join(layers))
        return out.finish({"layers": layers, "classes": list(picked), "files": len(files),
                           "images_per_class": {c: len(r) for c, r in picked.items()}})
