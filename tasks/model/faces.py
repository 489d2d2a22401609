"""Faces in arbitrary photos, for `agelens predict` and the framing stage: which files are images,
reading them (EXIF orientation applied, 16-bit scaled), finding faces with OpenCV's YuNet detector
(`cv2.FaceDetectorYN`), and cropping each face as the training faces were framed (tasks/framing.py).

YuNet's model is one ONNX file from the OpenCV Zoo (MIT licence), obtained on first use into the
user's cache and checked against its sha256 (tasks/core/downloads.py); `--face-model PATH` or
`$AGELENS_FACE_MODEL` name a local copy, `$AGELENS_MODELS_URL` a mirror.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from agelens.tasks.core.downloads import YUNET, locate
from agelens.tasks.core.errors import DataError
from agelens.tasks.data.decoding import _as_rgb
from agelens.tasks.data.sources import IMAGE_SUFFIXES

DETECT_SIZE = 640  # the longest side a photo is detected at
MAX_SIDE = 2048  # larger JPEGs are decoded reduced
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
    if path.is_symlink() and not path.exists():
        raise DataError("a symbolic link to nothing (or to itself)")
    if not path.is_file():
        raise DataError("not a regular file")
    if path.stat().st_size == 0:
        raise DataError("an empty file (0 bytes)")


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3) as the photo is meant to be seen; DataError with the reason otherwise.
    A JPEG larger than MAX_SIDE is decoded reduced (JPEG's draft mode): faces are found at
    DETECT_SIZE and cropped to a model's input, far fewer pixels than a 12000 px photo holds."""
    check_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # large photos are expected here
            with Image.open(path) as image:
                if image.format == "JPEG" and max(image.size) > MAX_SIDE:
                    image.draft("RGB", (MAX_SIDE, MAX_SIDE))
                image = ImageOps.exif_transpose(image)
                return np.asarray(_as_rgb(image), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"not a readable image ({type(error).__name__})") from None


def face_model(given: str | None = None, fetch: bool = True) -> Path:
    """YuNet's model file: `given`, `$AGELENS_FACE_MODEL`, the cache, or downloaded into it."""
    return locate(YUNET, given, fetch)


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x, y, width, height in the photo's pixels (may reach past its edges)
    score: float
    eyes: tuple[float, float, float, float]  # right eye x, y, left eye x, y (YuNet's first landmarks)


@dataclass(frozen=True)
class Framing:
    """Where the face's box sits in the images a model was trained on, as fractions of the image's
    width and height: its centre and its size (medians over a sample, tasks/framing.py), and the
    range (2.5th to 97.5th percentile, in the same order) that the training images spanned."""

    cx: float
    cy: float
    width: float
    height: float
    low: tuple[float, float, float, float] | None = None
    high: tuple[float, float, float, float] | None = None

    @classmethod
    def of(cls, facts: dict | None) -> "Framing":
        if not facts:
            return DEFAULT_FRAMING
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in facts.items()})

    def fits(self, box: tuple[float, float, float, float], shape: tuple[int, ...]) -> bool:
        """Whether a face with this box already sits in its photo as the training faces sat in theirs
        (within their measured range): such a photo is taken whole, as training took its images,
        instead of adding the detector's jitter by cropping it again."""
        if self.low is None or self.high is None:
            return False
        x, y, w, h = box
        height, width = shape[:2]
        where = ((x + w / 2) / width, (y + h / 2) / height, w / width, h / height)
        return all(lo <= v <= hi for v, lo, hi in zip(where, self.low, self.high))


# For models whose framing was not measured (the detector was unavailable in training, or found
# too few faces): the framing of real face crops, medians over 300 FairFace crops.
DEFAULT_FRAMING = Framing(cx=0.50, cy=0.49, width=0.79, height=0.97)


class Detector:
    """cv2.FaceDetectorYN on the photo (shrunk to DETECT_SIZE on its longest side); boxes in the photo's pixels."""

    def __init__(self, model: Path, min_score: float = MIN_SCORE):
        import cv2

        # OpenCV 5 warns on every net that its new graph engine ignores the preferred target.
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        try:
            self.net = cv2.FaceDetectorYN.create(str(model), "", (DETECT_SIZE, DETECT_SIZE), min_score, 0.3, 50)
        except cv2.error as error:
            raise DataError(f"OpenCV cannot load the face detector {model}: {str(error).strip().splitlines()[-1]}") from None

    def __call__(self, rgb: np.ndarray) -> list[Face]:
        """The faces found, left to right."""
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
        faces = [Face(tuple(float(v) / scale for v in row[:4]), float(row[-1]), tuple(float(v) / scale for v in row[4:8]))
                 for row in (found if found is not None else []) if row[2] > 0 and row[3] > 0]
        return sorted(faces, key=lambda f: (f.box[0], f.box[1]))


def crop(rgb: np.ndarray, box: tuple[float, float, float, float], size: int, framing: Framing) -> np.ndarray:
    """The part of the photo that puts the face where `framing` says training images had it (edges
    padded by repeating the border), resized to `size` as decoding resizes training images."""
    x, y, w, h = box
    crop_w, crop_h = w / framing.width, h / framing.height
    left = int(round(x + w / 2 - framing.cx * crop_w))
    top = int(round(y + h / 2 - framing.cy * crop_h))
    right, bottom = left + max(1, int(round(crop_w))), top + max(1, int(round(crop_h)))
    height, width = rgb.shape[:2]
    pad = max(0, -left, -top, right - width, bottom - height)
    padded = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), mode="edge") if pad else rgb
    return resize(padded[top + pad:bottom + pad, left + pad:right + pad], size)


def resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """As decoding does for training: bilinear to size x size."""
    image = Image.fromarray(rgb)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR, reducing_gap=None)
    return np.asarray(image, dtype=np.uint8)
