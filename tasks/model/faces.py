"""Faces in arbitrary photos, for `agelens predict`: which files are images, reading them (EXIF
orientation applied, 16-bit scaled), finding faces with OpenCV's YuNet detector
(`cv2.FaceDetectorYN`), and cropping each face with a margin, as the training faces are framed.

YuNet's model is one ONNX file (face_detection_yunet_2023mar.onnx, about 230 KB, MIT licence, from
the OpenCV Zoo: https://github.com/opencv/opencv_zoo/tree/main/models/face_detection_yunet, sha256
below). Nothing is downloaded at run time: agelens looks for it at `--face-model PATH`, then
`$AGELENS_FACE_MODEL`, then `tasks/model/assets/`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from agelens.tasks.core.errors import DataError
from agelens.tasks.data.decoding import _as_rgb
from agelens.tasks.data.sources import IMAGE_SUFFIXES

YUNET_FILE = "face_detection_yunet_2023mar.onnx"
YUNET_SHA256 = "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4"
YUNET_SOURCE = "https://github.com/opencv/opencv_zoo/tree/main/models/face_detection_yunet"
ASSETS = Path(__file__).resolve().parent / "assets"
DETECT_SIZE = 640  # the longest side a photo is detected at
MARGIN = 0.4  # of the face box's larger side, added on each side (CACD and FairFace crops show the whole head)
MIN_SCORE = 0.6


def find_images(paths: list[str]) -> tuple[list[Path], list[dict]]:
    """(image files, in order; [{file, reason}] for the paths that are not), folders searched recursively."""
    files, skipped = [], []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            for found in sorted(p for p in path.rglob("*") if not p.is_dir()):
                if found.name.startswith("."):
                    continue
                (files if found.suffix.lower() in IMAGE_SUFFIXES else skipped).append(
                    found if found.suffix.lower() in IMAGE_SUFFIXES else {"file": str(found), "reason": "not an image file"})
        elif path.exists():
            files.append(path)
        else:
            skipped.append({"file": str(path), "reason": "no such file or folder"})
    return files, skipped


def check_file(path: Path) -> None:
    """DataError with the reason when `path` cannot hold a picture: not a regular file, or empty."""
    if not path.is_file():
        raise DataError("not a regular file")
    if path.stat().st_size == 0:
        raise DataError("an empty file (0 bytes)")


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3) as the photo is meant to be seen; DataError with the reason otherwise."""
    check_file(path)
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return np.asarray(_as_rgb(image), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"not a readable image ({type(error).__name__})") from None


def face_model(given: str | None = None) -> Path:
    """The YuNet model file, checked; one clear error where it is not."""
    candidates = [Path(given).expanduser()] if given else []
    if os.environ.get("AGELENS_FACE_MODEL"):
        candidates.append(Path(os.environ["AGELENS_FACE_MODEL"]).expanduser())
    candidates.append(ASSETS / YUNET_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(f"no face detector model: agelens predict finds faces with YuNet ({YUNET_FILE}, MIT licence, from "
                    f"{YUNET_SOURCE}, sha256 {YUNET_SHA256[:16]}...); put it at {ASSETS / YUNET_FILE} or pass "
                    "--face-model PATH, or pass --no-detect when every image is one face already")


@dataclass(frozen=True)
class Face:
    box: tuple[int, int, int, int]  # x, y, width, height in the photo
    score: float


class Detector:
    """cv2.FaceDetectorYN on the photo (shrunk to DETECT_SIZE on its longest side); boxes in the photo's pixels."""

    def __init__(self, model: Path, min_score: float = MIN_SCORE):
        import cv2

        if model.parent == ASSETS and hashlib.sha256(model.read_bytes()).hexdigest() != YUNET_SHA256:
            raise DataError(f"{model} is not YuNet's {YUNET_FILE} (its sha256 is not {YUNET_SHA256[:16]}...)")
        try:
            self.net = cv2.FaceDetectorYN.create(str(model), "", (DETECT_SIZE, DETECT_SIZE), min_score, 0.3, 50)
        except cv2.error as error:
            raise DataError(f"OpenCV cannot load the face detector {model}: {str(error).strip().splitlines()[-1]}") from None

    def __call__(self, rgb: np.ndarray) -> list[Face]:
        import cv2

        height, width = rgb.shape[:2]
        # Large photos are shrunk to DETECT_SIZE; small ones are not enlarged: YuNet misses faces
        # that fill an enlarged frame (271 of 300 FairFace crops letterboxed to 640 px, 300 at their size).
        scale = min(1.0, DETECT_SIZE / max(height, width))
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        if scale < 1:
            bgr = cv2.resize(bgr, (max(1, round(width * scale)), max(1, round(height * scale))),
                             interpolation=cv2.INTER_AREA)
        self.net.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, found = self.net.detect(bgr)
        faces = []
        for row in (found if found is not None else []):
            x, y, w, h = (float(v) / scale for v in row[:4])
            x0, y0 = max(0, int(round(x))), max(0, int(round(y)))
            x1, y1 = min(width, int(round(x + w))), min(height, int(round(y + h)))
            if x1 > x0 and y1 > y0:
                faces.append(Face((x0, y0, x1 - x0, y1 - y0), float(row[-1])))
        return sorted(faces, key=lambda f: -f.score)


def crop(rgb: np.ndarray, box: tuple[int, int, int, int], size: int, margin: float = MARGIN) -> np.ndarray:
    """A square around the face, `margin` of its larger side added on every side (edges padded by
    repeating the border), resized to `size`."""
    x, y, w, h = box
    side = max(w, h) * (1 + 2 * margin)
    cx, cy = x + w / 2, y + h / 2
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    right, bottom = left + int(round(side)), top + int(round(side))
    height, width = rgb.shape[:2]
    pad = max(0, -left, -top, right - width, bottom - height)
    padded = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), mode="edge") if pad else rgb
    square = padded[top + pad:bottom + pad, left + pad:right + pad]
    return resize(square, size)


def resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """As decoding does for training: bilinear to size x size."""
    image = Image.fromarray(rgb)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR, reducing_gap=None)
    return np.asarray(image, dtype=np.uint8)
