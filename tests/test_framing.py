"""Faces framed as the model saw them: predict crops a face found so that it sits where the training
images had theirs, takes a photo already framed so whole, and a face gets the same crop alone and
among others in a group photo."""

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from agelens.flows.predict.scoring import _faces, score
from agelens.tasks.core.errors import DataError
from agelens.tasks.model.faces import Framing, crop, resize
from tests.test_predict import FAIRFACE, scorer

def test_a_box_where_the_framing_puts_it_gives_back_the_training_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (120, 100, 3), dtype=np.uint8)
    framing = Framing(cx=0.5, cy=0.45, width=0.6, height=0.7)
    box = (20.0, 12.0, 60.0, 84.0)  # centre (50, 54) = (0.5, 0.45) of the image, size 0.6 x 0.7 of it
    np.testing.assert_array_equal(crop(image, box, 32, framing), resize(image, 32))
    # The same face in a larger photo: the crop is the face's own image, not its surroundings.
    photo = np.zeros((400, 500, 3), np.uint8)
    photo[200:320, 300:400] = image
    np.testing.assert_array_equal(crop(photo, (320.0, 212.0, 60.0, 84.0), 32, framing), resize(image, 32))


def test_a_photo_is_taken_whole_only_when_its_one_face_sits_as_in_training():
    framing = Framing(0.5, 0.5, 0.8, 0.9, low=(0.45, 0.45, 0.7, 0.8), high=(0.55, 0.55, 0.9, 1.0))
    assert framing.fits((10, 5, 80, 90), (100, 100, 3))
    assert not framing.fits((10, 5, 40, 45), (100, 100, 3))  # a small face in a larger scene
    assert not framing.fits((30, 5, 80, 90), (100, 100, 3))  # off centre
    assert not Framing(0.5, 0.5, 0.8, 0.9).fits((10, 5, 80, 90), (100, 100, 3))  # no measured range: always cropped


def real_faces(count: int) -> list[Path]:
    from agelens.tasks.model.faces import face_model

    try:
        face_model()
    except DataError as error:
        pytest.skip(f"no face detector here: {error}")
    if not (FAIRFACE / "labels.csv").is_file():
        pytest.skip(f"no real faces at {FAIRFACE}")
    labels = pd.read_csv(FAIRFACE / "labels.csv").sample(count, random_state=0)
    return [FAIRFACE / p for p in labels["path"]]


def measured(files: list[Path]) -> Framing:
    """The framing the framing stage would record for these images."""
    from agelens.tasks.framing import measure
    from agelens.tasks.model.faces import Detector, face_model

    boxes = np.array(measure(files, Detector(face_model())))
    return Framing(*np.median(boxes, 0), low=tuple(np.percentile(boxes, 2.5, 0)), high=tuple(np.percentile(boxes, 97.5, 0)))


def test_crops_framed_as_training_are_scored_as_training_scored_them(tmp_path):
    """Real face crops: where the face sits as in training, detection gives exactly what
    --no-detect gives (the photo decoded whole); the rest are cropped to the framing."""
    files = real_faces(60)
    model = scorer()
    model.facts["framing"] = dataclasses.asdict(measured(files[:40]))
    found, skipped = score([str(f) for f in files[40:]], model, progress=False)
    whole, _ = score([str(f) for f in files[40:]], model, detect=False, progress=False)
    assert skipped == [] and len(found) == 20
    taken_whole = [(a, b) for a, b in zip(found, whole) if a["crop"] == "whole"]
    assert len(taken_whole) >= 12, [r["crop"] for r in found]
    for a, b in taken_whole:
        assert a["file"] == b["file"] and a["decade"] == b["decade"] and a["prob_30s"] == b["prob_30s"]


def test_a_face_gets_the_same_decade_alone_and_in_a_group_photo(tmp_path):
    """Three real faces side by side, close together, and each alone at the same place of the same
    photo: cropped to the recorded framing, each face of the group is cropped to itself (its crop
    nearest its crop alone, never a neighbour's), numbered left to right, with its decade alone."""
    from agelens.tasks.model.faces import Detector, face_model

    files = real_faces(43)
    framing = measured(files[:40])
    faces = [np.asarray(Image.open(f).convert("RGB")) for f in files[40:]]
    side, gap = faces[0].shape[0], 8
    blank = np.full((2 * side, 3 * side + 2 * gap + side, 3), 128, np.uint8)
    group, alone = blank.copy(), []
    for k, face in enumerate(faces):
        left = side // 2 + k * (side + gap)
        group[side // 2:side // 2 + side, left:left + side] = face
        alone.append(blank.copy())
        alone[-1][side // 2:side // 2 + side, left:left + side] = face
    Image.fromarray(group).save(tmp_path / "group.png")
    for k, photo in enumerate(alone):
        Image.fromarray(photo).save(tmp_path / f"alone_{k}.png")
    detector = Detector(face_model())
    together, _ = _faces(tmp_path / "group.png", detector, 64, framing)
    apart = [_faces(tmp_path / f"alone_{k}.png", detector, 64, framing)[0] for k in range(3)]
    assert len(together) == 3 and [len(a) for a in apart] == [1, 1, 1]
    for k, [(crop_alone, _)] in enumerate(apart):
        distances = [np.abs(crop_alone.astype(int) - c.astype(int)).mean() for c, _ in together]
        assert int(np.argmin(distances)) == k, distances
    model = scorer()
    model.facts["framing"] = dataclasses.asdict(framing)
    scored, _ = score([str(tmp_path / "group.png")], model, progress=False)
    scored_apart, _ = score([str(tmp_path / f"alone_{k}.png") for k in range(3)], model, progress=False)
    assert [r["decade"] for r in scored] == [r["decade"] for r in scored_apart]
    assert [r["x"] for r in scored] == sorted(r["x"] for r in scored)
