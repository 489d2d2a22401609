"""`agelens predict`: every file found is scored or named with its reason, never a crash; faces are
found in photos by YuNet where its model file is present."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agelens.flows.predict.scoring import Scorer, score, write
from agelens.tasks.core.errors import AgelensError, DataError
from agelens.tasks.model.backbones import build_model
from agelens.tasks.model.heads import Head
from agelens.tasks.model.inference import Runtime, prepare

CLASSES = tuple(f"{d}0s" for d in range(1, 7))
FAIRFACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "fairface"


def scorer(head="classes", temperature=1.0) -> Scorer:
    torch.manual_seed(0)
    runtime = Runtime.resolve("cpu", "fp32", "off")
    h = Head(head, CLASSES)
    model = prepare(build_model("convnext_narrow", h.outputs), runtime).eval()
    facts = {"classes": list(CLASSES), "image_size": 32, "temperature": temperature, "tta": True, "head": head}
    return Scorer(model, runtime, h, facts, "a test model", "d" * 64)


def face(path: Path, size=(60, 60), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)
    return path


def test_odd_files_are_named_with_their_reason_and_faces_scored(tmp_path):
    folder = tmp_path / "photos"
    (folder / "deeper").mkdir(parents=True)
    good = [face(folder / "a.jpg"), face(folder / "deeper" / "b.png", (90, 40), 1)]  # a landscape one too
    (folder / "notes.txt").write_text("not a photo")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (folder / ".hidden.jpg").write_bytes(b"")  # hidden files are not looked at
    rows, skipped = score([str(folder), str(tmp_path / "missing.jpg")], scorer(), detect=False, progress=False)
    assert [r["file"] for r in rows] == [str(p) for p in good]
    assert {Path(s["file"]).name: s["reason"] for s in skipped} == {
        "notes.txt": "not an image file", "empty.jpg": "an empty file (0 bytes)", "broken.jpg": "not a readable image",
        "missing.jpg": "no such file or folder"}
    for row in rows:
        probs = [row[f"prob_{c}"] for c in CLASSES]
        assert sum(probs) == pytest.approx(1, abs=1e-3) and row["decade"] == CLASSES[int(np.argmax(probs))]
        assert row["probability"] == max(probs) and 15 <= row["expected_age"] <= 65  # over decade midpoints
        assert row["model"] == "d" * 16 and row["temperature"] == 1.0


def test_temperature_and_the_ages_and_corn_heads_reach_every_output(tmp_path):
    files = [str(face(tmp_path / f"{i}.png", seed=i)) for i in range(3)]
    sharp, _ = score(files, scorer(temperature=1.0), detect=False, progress=False)
    soft, _ = score(files, scorer(temperature=50.0), detect=False, progress=False)
    for a, b in zip(sharp, soft):  # a high temperature flattens towards 1/6, never changes the ranking
        assert b["probability"] <= a["probability"] and abs(b["probability"] - 1 / 6) < abs(a["probability"] - 1 / 6)
        assert b["decade"] == a["decade"]
    ages, _ = score(files, scorer("ages"), detect=False, progress=False)
    assert all(0 <= r["expected_age"] <= 100 for r in ages)
    assert all(sum(r[f"prob_{c}"] for c in CLASSES) == pytest.approx(1, abs=1e-3) for r in ages)
    ranks, _ = score(files, scorer("corn"), detect=False, progress=False, explain=tmp_path / "why")
    for r in ranks:  # five rank outputs become six decades' probabilities, and an explanation per face
        probs = [r[f"prob_{c}"] for c in CLASSES]
        assert sum(probs) == pytest.approx(1, abs=1e-3) and r["decade"] == CLASSES[int(np.argmax(probs))]
        assert 15 <= r["expected_age"] <= 65 and Path(r["explanation"]).is_file()


def test_tables_are_written_as_asked_and_the_cli_says_what_is_missing(tmp_path, capsys):
    from agelens.flows.cli.main import main

    rows, _ = score([str(face(tmp_path / "a.png"))], scorer(), detect=False, progress=False)
    write(rows, tmp_path / "t.csv")
    write(rows, tmp_path / "t.parquet")
    import pandas as pd

    assert pd.read_csv(tmp_path / "t.csv")["decade"].tolist() == pd.read_parquet(tmp_path / "t.parquet")["decade"].tolist()
    with pytest.raises(AgelensError, match="write .csv or .parquet"):
        write(rows, tmp_path / "t.xlsx")
    assert main(["predict", str(tmp_path), "--models", str(tmp_path / "nothing"), "--no-detect"]) == 1
    assert "no champion model in" in capsys.readouterr().err


def yunet() -> Path:
    """YuNet's file, as predict obtains it (from the mirror the suite names); skips where it cannot be had."""
    from agelens.tasks.model.faces import face_model

    try:
        return face_model()
    except DataError as error:
        pytest.skip(f"no face detector here: {error}")


def test_faces_are_found_in_photos_and_cropped_to_the_framing(tmp_path):
    """A face pasted into a wide photo is found where it was put and cropped so that it sits where
    the training images had theirs; a blank photo has none."""
    model = yunet()
    face_pixels = np.asarray(Image.open(FAIRFACE / "images" / "train_10006.jpg").convert("RGB")) \
        if (FAIRFACE / "images" / "train_10006.jpg").is_file() else None
    if face_pixels is None:
        pytest.skip(f"no real face at {FAIRFACE}")
    photo = np.full((400, 900, 3), 200, np.uint8)
    photo[100:324, 500:724] = face_pixels
    Image.fromarray(photo).save(tmp_path / "wide.jpg")
    Image.fromarray(np.full((300, 300, 3), 128, np.uint8)).save(tmp_path / "blank.jpg")
    rows, skipped = score([str(tmp_path)], scorer(), face_model=str(model), progress=False)
    assert skipped == [{"file": str(tmp_path / "blank.jpg"), "reason": "no face found"}]
    [row] = rows
    assert 500 < row["x"] + row["w"] / 2 < 724 and 100 < row["y"] + row["h"] / 2 < 324
    assert 40 <= row["w"] <= 224 and 40 <= row["h"] <= 300
    assert row["detection_score"] >= 0.6 and row["crop"] == "framed"


def test_a_file_that_is_not_a_detector_is_one_clear_error(tmp_path):
    bogus = tmp_path / "yunet.onnx"
    bogus.write_bytes(b"not an onnx model")
    face(tmp_path / "a.png")
    with pytest.raises(DataError, match="OpenCV cannot load the face detector"):
        score([str(tmp_path / "a.png")], scorer(), face_model=str(bogus), progress=False)


def test_explain_writes_one_grad_cam_overlay_per_face(tmp_path):
    for folder in ("a", "b"):  # the same file name in two folders: two overlays
        (tmp_path / folder).mkdir()
        face(tmp_path / folder / "same.png", seed=len(folder))
    rows, _ = score([str(tmp_path / "a"), str(tmp_path / "b")], scorer(), detect=False, progress=False,
                    explain=tmp_path / "why")
    overlays = [Path(r["explanation"]) for r in rows]
    assert len(set(overlays)) == 2 and all(p.parent == tmp_path / "why" and p.stat().st_size > 1000 for p in overlays)
    picture = np.asarray(Image.open(overlays[0]))
    assert picture.shape[1] > picture.shape[0]  # face | overlay, side by side
