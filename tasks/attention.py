"""Stage: what the model looks at, per decade: the mean Grad-CAM over validation images of
each class (predicted-class maps), drawn over the class's mean face."""

from __future__ import annotations

from agelens.tasks.core.stage import Job, Stage, Summary, logger


class AttentionSummary(Summary):
    cam_layer: str
    images_per_class: dict[str, int]


STAGE = Stage("attention", AttentionSummary, needs=("decode", "train"), reads=("cam_layer", "attention_images"),
              uses=("device", "eval_batch_size"), outputs=("attention", "maps"))


def run(job: Job) -> dict:
    import numpy as np

    from agelens.tasks.attribution.cams import mean_maps
    from agelens.tasks.attribution.layers import cam_layer_of
    from agelens.tasks.data.arrays import open_decoded
    from agelens.tasks.data.picking import first_per_class
    from agelens.tasks.model.inference import load_trained, runtime_for
    from agelens.tasks.reporting.plots import grids

    log = logger()
    settings = job.settings
    index, array = open_decoded(job)
    runtime = runtime_for(job)
    model = load_trained(job, runtime)
    cam_layer = cam_layer_of(model, settings["cam_layer"], job.context["image_size"])
    picked = first_per_class(index, "val", job.context["classes"], settings["attention_images"])
    heats, faces = mean_maps(model, array, picked, cam_layer, runtime, settings["eval_batch_size"])
    counts = {c: len(r) for c, r in picked.items()}
    log.info("mean Grad-CAM on %s over %s val images per class", cam_layer, counts)
    with job.output() as out:
        grids.save(grids.class_grid(faces, heats, counts, f"Mean Grad-CAM per class on {cam_layer} (val images, "
                                                          "predicted class) over the mean face"), out.path("attention.png"))
        np.savez_compressed(out.path("attention.npz"), **{f"heat_{c}": h for c, h in heats.items()},
                            **{f"face_{c}": f for c, f in faces.items()})
        out.add("attention", "attention.png")
        out.add("maps", "attention.npz")
        return out.finish(AttentionSummary(cam_layer=cam_layer, images_per_class=counts))


def describe(s: AttentionSummary) -> str:
    return f"mean Grad-CAM on {s.cam_layer} per class"


def report_section(view) -> list[str]:
    from agelens.tasks.reporting.markdown import image

    return ["## What the model looks at, per class", image(view.path("attention"), "mean Grad-CAM per class", 720)]
