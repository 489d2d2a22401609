"""A small, deterministic stand-in for CACD: drawn faces that visibly age.

The metadata file has the exact schema of `celebrity2000_meta.mat` (MATLAB v5):
struct `celebrityImageData` (age, identity, year, feature, rank, lfw, birth, name)
and struct `celebrityData` (name, identity, birth, rank, lfw), with the real file's
dtypes. Each identity is photographed over several years, so one person spans ages
and often two decades, which is what makes an identity-disjoint split matter.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from agelens.tasks.core.errors import DataError
from agelens.tasks.core.stage import write_json

IMAGE_SIZE = 250
YEARS = tuple(range(2004, 2014))
FIRST = ("Ada", "Ben", "Cora", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea",
         "Max", "Nia", "Oto", "Pia", "Quin", "Rosa", "Sam", "Tess", "Uma", "Vik", "Wren", "Yara")
LAST = ("Abbot", "Brook", "Crane", "Dale", "Ember", "Frost", "Grove", "Hale", "Irving", "Jett",
        "Knox", "Lark", "Moss", "North", "Oak", "Pike", "Quill", "Reed", "Stone", "Thorne")
HAIR = ((35, 25, 20), (70, 45, 25), (120, 80, 40), (200, 160, 90), (140, 60, 30), (20, 20, 25))
SKIN = ((250, 220, 190), (235, 195, 160), (200, 150, 110), (160, 110, 80), (110, 75, 55))


@dataclass(frozen=True)
class DemoSpec:
    identities: int = 156
    images_per_identity: int = 10
    seed: int = 0


def plan_demo(spec: DemoSpec) -> list[dict]:
    """One row per image: identity, name, birth, year, age, file name (pure, seeded)."""
    rng = np.random.default_rng(spec.seed)
    rows = []
    for identity in range(1, spec.identities + 1):
        first = FIRST[(identity - 1) % len(FIRST)]
        last = LAST[((identity - 1) // len(FIRST)) % len(LAST)]
        suffix = "" if identity <= len(FIRST) * len(LAST) else str(identity)
        name = f"{first}_{last}{suffix}"
        # Identities cycle through the decades 10s..60s; photos span up to ten years
        # around a central age, kept within CACD's 14..69 so no decade is empty.
        decade = 10 * (1 + (identity - 1) % 6)
        centre = rng.uniform(max(14, decade), decade + 9.99)
        birth = int(round(YEARS[0] + 4.5 - centre))
        years = [y for y in YEARS if 14 <= y - birth <= 69]
        years = np.sort(rng.choice(years, size=spec.images_per_identity, replace=True))
        for number, year in enumerate(years, start=1):
            age = int(year) - birth
            rows.append({
                "identity": identity, "name": name, "birth": birth, "year": int(year), "age": age,
                "rank": identity, "lfw": int(identity % 7 == 0),
                "file": f"{age}_{name}_{number:04d}.jpg",
            })
    return rows


def draw_face(age: int, identity: int, rng: np.random.Generator) -> Image.Image:
    """A 250x250 face whose hair greys, skin lines and shape change with age."""
    person = np.random.default_rng(10_000 + identity)  # fixed traits of the person
    skin = np.array(SKIN[person.integers(len(SKIN))], float)
    hair = np.array(HAIR[person.integers(len(HAIR))], float)
    grey = float(np.clip((age - 28) / 30, 0, 1))
    hair = hair * (1 - grey) + np.array([215, 215, 215]) * grey
    skin = skin * (1 - 0.15 * max(0.0, (age - 40) / 25))
    background = rng.integers(60, 230, size=3)

    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(int(c) for c in background))
    d = ImageDraw.Draw(img)
    cx, cy = 125 + rng.normal(0, 6), 135 + rng.normal(0, 6)
    young = max(0.0, (25 - age) / 12)  # rounder, smaller faces when young
    half_w = 52 + 6 * person.random() + 6 * min(1.0, max(0.0, (age - 30) / 30)) - 4 * young
    half_h = 70 + 6 * person.random() - 8 * young
    sag = 6 * max(0.0, (age - 45) / 20)
    tuple_skin = tuple(int(c) for c in skin)
    tuple_hair = tuple(int(c) for c in hair)
    # Hair behind, face, then a hairline that recedes with age.
    d.ellipse([cx - half_w - 10, cy - half_h - 18, cx + half_w + 10, cy + half_h * 0.4], tuple_hair)
    d.ellipse([cx - half_w, cy - half_h, cx + half_w, cy + half_h + sag], tuple_skin)
    recede = 18 * max(0.0, (age - 35) / 30) * (identity % 2)
    d.chord([cx - half_w - 4, cy - half_h - 16, cx + half_w + 4, cy - half_h + 44 - recede],
            180, 360, tuple_hair)

    line = tuple(int(c * 0.55) for c in skin)
    eye_y = cy - 8
    eye_r = 7 + 3 * young
    for side in (-1, 1):
        ex = cx + side * half_w * 0.42
        d.ellipse([ex - eye_r, eye_y - eye_r * 0.6, ex + eye_r, eye_y + eye_r * 0.6], (250, 250, 250))
        d.ellipse([ex - 3.5, eye_y - 3.5, ex + 3.5, eye_y + 3.5], (40, 30, 30))
        if age >= 38:  # crow's feet
            for k in range(1 + (age - 38) // 8):
                d.line([ex + side * (eye_r + 3), eye_y - 4 + 4 * k,
                        ex + side * (eye_r + 12), eye_y - 8 + 6 * k], line, width=2)
        if age >= 45:  # bags under the eyes
            d.arc([ex - eye_r, eye_y, ex + eye_r, eye_y + 12], 10, 170, line, width=2)
        d.line([ex - 12, eye_y - 14, ex + 12, eye_y - 15], tuple_hair, width=4)  # brows
    # Forehead lines: one more every six years after 24.
    for k in range(max(0, (age - 24) // 6)):
        y = cy - half_h * 0.55 + 7 * k - recede * 0.3
        d.arc([cx - half_w * 0.55, y, cx + half_w * 0.55, y + 14], 200, 340, line, width=2)
    d.line([cx, eye_y + 5, cx - 6, cy + 24, cx + 4, cy + 26], line, width=2)  # nose
    mouth_y = cy + 42 + sag * 0.5
    droop = 5 * max(0.0, (age - 40) / 22)
    d.arc([cx - 20, mouth_y - 10 + droop, cx + 20, mouth_y + 10 - droop], 20, 160,
          (150, 60, 60), width=3)
    if age >= 33:  # nasolabial folds
        for side in (-1, 1):
            d.line([cx + side * 14, cy + 22, cx + side * 26, mouth_y + 6], line, width=2)

    img = img.rotate(float(rng.normal(0, 6)), resample=Image.BILINEAR, fillcolor=tuple(int(c) for c in background))
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 1.0))))
    pixels = np.asarray(img, dtype=np.float32)
    pixels = pixels * rng.uniform(0.8, 1.15) + rng.normal(0, 6, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _column(values, dtype) -> np.ndarray:
    return np.asarray(values, dtype=dtype).reshape(-1, 1)


def _cell(strings) -> np.ndarray:
    cell = np.empty((len(strings), 1), dtype=object)
    for i, text in enumerate(strings):
        cell[i, 0] = np.array([text])
    return cell


def metadata_structs(rows: list[dict]) -> dict:
    """The two MATLAB structs, with the field order and dtypes of the real CACD file."""
    images = np.empty((1, 1), dtype=[(f, object) for f in
                                      ("age", "identity", "year", "feature", "rank", "lfw", "birth", "name")])
    images[0, 0] = (
        _column([r["age"] for r in rows], np.uint8),
        _column([r["identity"] for r in rows], np.uint16),
        _column([r["year"] for r in rows], np.uint16),
        np.zeros((0, 0), dtype=np.uint8),
        _column([r["rank"] for r in rows], np.uint8),
        _column([r["lfw"] for r in rows], np.uint8),
        _column([r["birth"] for r in rows], np.uint16),
        _cell([r["file"] for r in rows]),
    )
    people = {r["identity"]: r for r in rows}
    order = sorted(people)
    celebs = np.empty((1, 1), dtype=[(f, object) for f in ("name", "identity", "birth", "rank", "lfw")])
    celebs[0, 0] = (
        _cell([people[i]["name"] for i in order]),
        _column(order, np.int32),
        _column([people[i]["birth"] for i in order], np.int32),
        _column([people[i]["rank"] for i in order], np.int32),
        _column([people[i]["lfw"] for i in order], np.int32),
    )
    return {"celebrityData": celebs, "celebrityImageData": images}


def write_demo(root: Path, spec: DemoSpec) -> dict:
    """Write `<root>/celebrity2000_meta.mat` and `<root>/CACD2000/*.jpg`; return counts."""
    import scipy.io  # only where the demo is drawn: a cached run checks DemoSpec alone

    from concurrent.futures import ThreadPoolExecutor

    rows = plan_demo(spec)
    images_dir = root / "CACD2000"
    images_dir.mkdir(parents=True, exist_ok=True)
    # One random stream per image, so the faces are the same however many threads draw them.
    streams = np.random.SeedSequence(spec.seed + 1).spawn(len(rows))

    def draw(k: int) -> None:
        row = rows[k]
        draw_face(row["age"], row["identity"], np.random.default_rng(streams[k])).save(images_dir / row["file"],
                                                                                        quality=90)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(draw, range(len(rows))))
    scipy.io.savemat(root / "celebrity2000_meta.mat", metadata_structs(rows), format="5",
                     oned_as="column", do_compression=True)
    decades = np.bincount([min(r["age"], 100) // 10 for r in rows], minlength=11)
    return {"images": len(rows), "identities": spec.identities,
            "per_decade": {f"{10 * d}s": int(n) for d, n in enumerate(decades) if n}}


def make_demo(root: Path, spec: DemoSpec, stamp: dict, stamp_name: str) -> dict:
    """Generate the demo dataset into `root`, replacing only an earlier demo (marked by its
    stamp file); built in a temporary folder and renamed, so it appears whole."""
    if root.exists() and not (root / stamp_name).exists():
        raise DataError(f"{root} exists and was not made by agelens; move it away or pass --data")
    tmp = root.with_name(f"{root.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        summary = write_demo(tmp, spec)
        write_json(tmp / stamp_name, {**stamp, "summary": summary})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return summary
