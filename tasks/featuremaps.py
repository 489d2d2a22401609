"""Stage: feature maps of chosen layers for a few validation images per class."""

from __future__ import annotations

from agelens.tasks.core.stage import Job, Stage, Summary, logger


class FeatureMapsSummary(Summary):
    layers: list[str]
    classes: list[str]
    files: int
    images_per_class: dict[str, int]


STAGE = Stage("featuremaps", FeatureMapsSummary, needs=("decode", "train"), uses=("device", "eval_batch_size"),
              reads=("feature_layers", "feature_images", "feature_channels"), outputs=("feature_maps",))


def run(job: Job) -> dict:
    import torch

    from agelens.tasks.attribution.layers import feature_layers_of, layer_outputs
    from agelens.tasks.data.arrays import open_decoded
    from agelens.tasks.data.picking import first_per_class
    from agelens.tasks.model.inference import load_trained, model_input, runtime_for
    from agelens.tasks.reporting.plots import grids

    log = logger()
    settings = job.settings
    index, array = open_decoded(job)
    runtime = runtime_for(job).exact()
    model = load_trained(job, runtime)
    layers = feature_layers_of(model, settings["feature_layers"])
    channels = settings["feature_channels"]
    picked = first_per_class(index, "val", job.context["classes"], settings["feature_images"])
    files = []
    with job.output() as out:
        for label, rows in picked.items():
            outputs = layer_outputs(model, model_input(torch.from_numpy(array[rows]), runtime), layers)
            for spec, maps in outputs.items():
                for k, row in enumerate(rows):
                    name = f"feature_maps/{label}/{spec}/feature_map_{k}.png"
                    title = f"{label} · {spec} · {index.loc[row, 'path']} (first {min(channels, maps.shape[1])} channels)"
                    grids.save(grids.channel_grid(maps[k, :channels], title), out.path(name))
                    files.append(name)
        out.add("feature_maps", "feature_maps")
        log.info("drew %d feature-map grids for layers %s", len(files), ", ".join(layers))
        return out.finish(FeatureMapsSummary(layers=layers, classes=list(picked), files=len(files),
                                             images_per_class={c: len(r) for c, r in picked.items()}))


def describe(s: FeatureMapsSummary) -> str:
    return f"{s.files} grids of layers {', '.join(s.layers)}"
