"""Stage: what the model looks at, per decade: the mean Grad-CAM over validation images of
each class (predicted-class maps), drawn over the class's mean face."""

from __future__ import annotations

import numpy as np

from tasks.plots import base, explanations
from tasks.arrays import batch_rows, batches, open_decoded
from tasks.attribution import cam_layer_of, cam_maps
from tasks.inference import load_trained, model_input, runtime_for
from tasks.picking import first_per_class
from tasks.stage import Job, logger


def mean_maps(model, array: np.ndarray, picked: dict[str, np.ndarray], cam_layer: str, runtime, batch_size: int
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """({class: mean Grad-CAM (H, W)}, {class: mean image (H, W, 3) uint8}), batch by batch."""
    heats, faces = {}, {}
    for label, rows in picked.items():
        heat, face = 0.0, 0.0
        for _, batch in batches(array, batch_rows(rows, batch_size), runtime.device):
            with runtime.autocast():  # the precision the model was trained in
                maps, _, _ = cam_maps(model, model_input(batch, runtime), cam_layer, ["grad_cam"])
            heat = heat + maps["grad_cam"].sum(0).cpu().numpy()
            face = face + batch.float().sum(0).cpu().numpy()
        heats[label] = heat / len(rows)
        faces[label] = (face / len(rows)).astype(np.uint8)
    return heats, faces


def run(job: Job) -> dict:
    log = logger()
    settings = job.settings
    index, array = open_decoded(job)
    runtime = runtime_for(job)
    model = load_trained(job, runtime)
    cam_layer = cam_layer_of(model, settings["cam_layer"])
    picked = first_per_class(index, "val", job.upstream["train"]["meta"]["classes"], settings["attention_images"])
    heats, faces = mean_maps(model, array, picked, cam_layer, runtime, settings["eval_batch_size"])
    counts = {c: len(r) for c, r in picked.items()}
    log.info("mean Grad-CAM on %s over %s val images per class", cam_layer, counts)
    with job.output() as out:
        base.save(explanations.class_grid(faces, heats, counts, f"Mean Grad-CAM per class on {cam_layer} (val images, "
                                                          "predicted class) over the mean face"), out.path("attention.png"))
        np.savez_compressed(out.path("attention.npz"), **{f"heat_{c}": h for c, h in heats.items()},
                            **{f"face_{c}": f for c, f in faces.items()})
        out.add("attention", "attention.png")
        out.add("maps", "attention.npz")
        return out.finish({"cam_layer": cam_layer, "images_per_class": counts})
