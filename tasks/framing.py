"""Stage: how the training images frame their faces, measured with the detector `agelens predict`
uses, so that predict crops new faces the same way (tasks/model/faces.py `crop`). The face box's
centre and size, as fractions of the image, are medians over a seeded sample of training images,
read as decode reads them."""

from __future__ import annotations

from agelens.tasks.core.stage import Job, Stage, Summary, logger

SAMPLE = 200  # training images looked at
MIN_FOUND = 0.5  # share of them with a face, below which the framing is not trusted


class FramingSummary(Summary):
    measured: bool
    why: str  # what the numbers are: measured on how many faces, or why the default stands
    images: int
    faces: int
    cx: float
    cy: float
    width: float
    height: float
    low: list[float] | None  # 2.5th percentiles of cx, cy, width, height
    high: list[float] | None  # 97.5th percentiles


STAGE = Stage("framing", FramingSummary, needs=("split",), reads=("seed",), inputs=("images", "face_detector"),
              outputs=("framing",))


def measure(paths: list, detector) -> list[tuple[float, float, float, float]]:
    """(cx, cy, width, height) of the most confident face of each image that has one, as fractions."""
    from agelens.tasks.data.decoding import read_rgb

    found = []
    for path in paths:
        rgb = read_rgb(path)
        faces = detector(rgb) if rgb is not None else []
        if faces:
            x, y, w, h = max(faces, key=lambda f: f.score).box
            height, width = rgb.shape[:2]
            found.append(((x + w / 2) / width, (y + h / 2) / height, w / width, h / height))
    return found


def run(job: Job) -> dict:
    import dataclasses
    from pathlib import Path

    import numpy as np
    import pandas as pd

    from agelens.tasks.core.stage import write_json
    from agelens.tasks.model.faces import DEFAULT_FRAMING, Detector

    log = logger()
    manifest = pd.read_parquet(job.path("split", "manifest"))
    train = manifest[manifest["split"] == "train"].sort_values("path")
    drawn = train.sample(min(SAMPLE, len(train)), random_state=job.settings["seed"])["path"].tolist()
    detector_file = job.inputs["face_detector"]
    found = []
    if detector_file["sha256"] != "none":
        root = Path(job.inputs["images"]["path"])
        found = measure([root / p for p in drawn], Detector(Path(detector_file["path"])))
    boxes = np.array(found).reshape(-1, 4)
    measured = len(found) >= max(1, MIN_FOUND * len(drawn))
    if measured:
        framing = {**dict(zip(("cx", "cy", "width", "height"), np.median(boxes, 0).round(4).tolist())),
                   "low": np.percentile(boxes, 2.5, 0).round(4).tolist(), "high": np.percentile(boxes, 97.5, 0).round(4).tolist()}
    else:
        framing = dataclasses.asdict(DEFAULT_FRAMING)
    if detector_file["sha256"] == "none":
        why = f"the default framing: no face detector to measure with ({detector_file['why']})"
    elif not measured:
        why = f"the default framing: faces found in only {len(found)} of {len(drawn)} training images"
    else:
        why = f"measured on the faces found in {len(found)} of {len(drawn)} training images"
    (log.info if measured else log.warning)("framing: %s", why)
    summary = FramingSummary(measured=measured, why=why, images=len(drawn), faces=len(found), **framing)
    with job.output() as out:
        write_json(out.path("framing.json"), framing)
        out.add("framing", "framing.json")
        return out.finish(summary, meta={"framing": framing})


def describe(s: FramingSummary) -> str:
    return (f"face box {s.width:.2f} x {s.height:.2f} of the image, centre ({s.cx:.2f}, {s.cy:.2f}): "
            + ("measured" if s.measured else "default") + f" ({s.faces} faces in {s.images} images)")


def report_section(view) -> list[str]:
    from agelens.tasks.reporting.markdown import escape

    s = view.summary
    return ["## Face framing", f"`agelens predict` crops each face it finds so that the face box is {s.width:.2f} of the "
            f"crop's width and {s.height:.2f} of its height, centred at ({s.cx:.2f}, {s.cy:.2f}), as in the training "
            f"images: {escape(s.why)}. A photo of one face that already sits within the training images' range is "
            "taken whole, as training took its images."]
