"""`agelens predict` and the `predict` flow: a trained model applied to photos.

Every image file found (folders are searched recursively) is read as it is meant to be seen,
its faces found with YuNet (or, with `--no-detect`, taken whole, as the demo's faces and
pre-cropped sets are), each face cropped with a margin as the training faces are framed, and
scored in batches with the champion of a configuration (flows/registry/models.py) or a run's model:
decade, calibrated probability of every decade, expected age. Files that are not images, cannot
be read or hold no face are listed with the reason, never a crash.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agelens.tasks.core.errors import AgelensError, DataError

READERS = 2  # threads reading and detecting while the model scores


@dataclass
class Scorer:
    model: object
    runtime: object
    head: object
    facts: dict
    source: str  # what the model is, for people
    digest: str
    warning: str | None = None  # what was wrong with the champion, when another model stands in

    @property
    def classes(self) -> list[str]:
        return list(self.facts["classes"])


def load_scorer(out: str | Path, config: str | None = None, run: str | None = None, device: str = "auto") -> Scorer:
    """The champion of `config` (the only configuration when there is one), or a run's model."""
    from safetensors.torch import load_file

    from agelens.flows.pipeline.inputs import open_memo
    from agelens.flows.pipeline.runs import read_runs
    from agelens.flows.registry import models
    from agelens.tasks.core.stage import output_path, read_result
    from agelens.tasks.model.backbones import build_model
    from agelens.tasks.model.heads import Head
    from agelens.tasks.model.inference import Runtime, prepare

    out = Path(out).expanduser().resolve()
    warning = None
    if run:
        rows = [r for r in read_runs(out) if r["run_id"].startswith(run)]
        if len({r["run_id"] for r in rows}) != 1:
            raise AgelensError(f"--run {run!r} names {'no' if not rows else 'more than one'} recorded run in {out}")
        results = {s: read_result(out, s, rows[-1]["stages"].get(s, ""))
                   for s in ("train", "calibrate", "decode", "extract", "framing")}
        if results["framing"] is None:  # runs from before framing was measured crop with the default
            del results["framing"]
        missing = [s for s, r in results.items() if r is None]
        if missing:
            raise AgelensError(f"run {run} has no {', '.join(missing)} stage in {out} (not run that far, or removed by gc)")
        facts = {k: v for r in results.values() for k, v in r.get("meta", {}).items()}
        weights, source = output_path(out, results["train"], "model"), f"run {rows[-1]['run_id'][:8]}"
        digest = results["train"]["outputs"]["model"]["sha256"]
        with open_memo(out) as memo:
            found = memo.file(weights) if weights.is_file() else None
        if found != digest:
            raise AgelensError(f"the model of run {rows[-1]['run_id'][:8]} is damaged: {weights} "
                               + ("is missing" if found is None else "was changed after it was written"))
    else:
        found = models.configs(out)
        if config is None and len(found) != 1:
            raise AgelensError(f"no champion model in {out}: run the pipeline to its compare stage first" if not found else
                               f"{out} holds models of several configurations ({', '.join(found)}): pass --config ID "
                               "(see agelens models)")
        config = config or found[0]
        with open_memo(out) as memo:
            served = models.serving(out, config, memo.file)
        warning = served.warning
        champion = served.record
        if champion is None:
            raise AgelensError(f"configuration {config} has no verified champion in {out}: {warning or 'none recorded'} "
                               f"(see agelens models --out {out} --verify)")
        facts, digest = champion["facts"], champion["model_digest"]
        weights = models.weights_of(out, config, champion)
        source = (f"champion of configuration {config} (run {champion['run_id'][:8]})" if not served.warning else
                  f"best verified model of configuration {config} (run {champion['run_id'][:8]})")
    runtime = Runtime.resolve(device, facts["precision"], facts["channels_last"])
    model = build_model(facts["backbone"], facts["outputs"], image_size=facts["image_size"])
    try:
        model.load_state_dict(load_file(weights))
    except (OSError, RuntimeError, ValueError) as error:  # checked above; the file changed since
        raise AgelensError(f"cannot load the model {weights}: {str(error).splitlines()[0]}") from None
    return Scorer(prepare(model, runtime).eval(), runtime, Head(facts["head"], tuple(facts["classes"])), facts,
                  source, digest, warning)


def _faces(path: Path, detector, size: int, framing) -> tuple[list[tuple[np.ndarray, dict]], str | None]:
    """([(crop, where)], reason it has none). `where["crop"]`: "whole" (decoded as the decode stage
    decodes training images) or "framed" (cropped around the face found, to the model's framing)."""
    from agelens.tasks.data.decoding import decode_one
    from agelens.tasks.model.faces import check_file, crop, read_image

    def whole(where: dict):
        face = decode_one(path, size)
        return ([], "not a readable image") if face is None else ([(face, {**where, "crop": "whole"})], None)

    try:
        check_file(path)
    except DataError as error:
        return [], str(error)
    if detector is None:  # one face per file
        return whole({"x": None, "y": None, "w": None, "h": None, "detection_score": None})
    try:
        rgb = read_image(path)
    except DataError as error:
        return [], str(error)
    faces = detector(rgb)
    if not faces:
        return [], "no face found"
    found = [{**dict(zip("xywh", (int(round(v)) for v in f.box))), "detection_score": round(f.score, 4)} for f in faces]
    if len(faces) == 1 and framing.fits(faces[0].box, rgb.shape) and not _rotated(path):
        return whole(found[0])
    return [(crop(rgb, f.box, size, framing), {**where, "crop": "framed"}) for f, where in zip(faces, found)], None


def _rotated(path: Path) -> bool:
    """Whether the photo carries an EXIF rotation (decoding for training ignores it, predict does not)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.getexif().get(0x0112, 1) != 1
    except OSError:
        return False


def score(paths: list[str], scorer: Scorer, detect: bool = True, face_model: str | None = None, batch_size: int = 64,
          explain: Path | None = None, progress: bool = True) -> tuple[list[dict], list[dict]]:
    """(one row per face, [{file, reason}] for every file without one)."""
    import torch
    from tqdm.auto import tqdm

    from agelens.tasks.model.faces import Detector, Framing, face_model as locate, find_images
    from agelens.tasks.model.inference import predict

    files, skipped = find_images(paths)
    model_file = locate(face_model) if detect and files else None
    if model_file is not None:
        Detector(model_file)  # a model OpenCV cannot load is one error now, not one per file
    local = threading.local()  # one detector per reading thread: an OpenCV net is not safe to share

    def detector():
        if model_file is None:
            return None
        if not hasattr(local, "detector"):
            local.detector = Detector(model_file)
        return local.detector
    size, rows, pending = scorer.facts["image_size"], [], []
    framing = Framing.of(scorer.facts.get("framing"))

    def flush() -> None:
        if not pending:
            return
        crops = np.stack([c for c, _ in pending])
        probs = predict(scorer.model, crops, np.arange(len(crops)), scorer.runtime, batch_size,
                        scorer.facts["temperature"], scorer.facts["tta"])
        classes, ages = scorer.head.class_probs(probs), scorer.head.expected_age(probs)
        if explain is not None:
            _explain(scorer, crops, [w for _, w in pending], explain)
        for i, (_, where) in enumerate(pending):
            best = int(classes[i].argmax())
            rows.append({**where, "decade": scorer.classes[best], "probability": round(float(classes[i, best]), 4),
                         **{f"prob_{c}": round(float(p), 4) for c, p in zip(scorer.classes, classes[i])},
                         "expected_age": None if ages is None else round(float(ages[i]), 1)})
        pending.clear()

    with ThreadPoolExecutor(READERS) as pool, torch.no_grad():
        found = pool.map(lambda p: _faces(p, detector(), size, framing), files)
        for path, (faces, reason) in tqdm(zip(files, found), total=len(files), desc="predict", unit="img",
                                          disable=None if progress else True):
            if reason:
                skipped.append({"file": str(path), "reason": reason})
            for k, (face, where) in enumerate(faces):
                pending.append((face, {"file": str(path), "face": k, **where}))
                if len(pending) >= batch_size:
                    flush()
        flush()
    for row in rows:
        row.update(temperature=scorer.facts["temperature"], model=scorer.digest[:16])
    return rows, skipped


def _explain(scorer: Scorer, crops: np.ndarray, where: list[dict], folder: Path) -> None:
    """A Grad-CAM overlay per face: face | Grad-CAM over it."""
    import torch

    from agelens.tasks.attribution.cams import cam_maps
    from agelens.tasks.attribution.layers import cam_layer_of
    from agelens.tasks.model.inference import model_input
    from agelens.tasks.reporting.plots import grids
    from agelens.tasks.reporting.plots.base import overlay

    folder.mkdir(parents=True, exist_ok=True)
    layer = cam_layer_of(scorer.model, "auto", scorer.facts["image_size"])
    maps, _, _ = cam_maps(scorer.model, model_input(torch.from_numpy(crops), scorer.runtime), layer, ["grad_cam"])
    for crop, heat, w in zip(crops, maps["grad_cam"].cpu().numpy(), where):
        # The path's digest keeps photos of one name in different folders apart.
        name = f"{Path(w['file']).stem[:60]}-{hashlib.sha256(w['file'].encode()).hexdigest()[:8]}_face{w['face']}.png"
        grids.save(grids.picture_table([[(crop, "face"), (overlay(crop, heat), f"Grad-CAM on {layer}")]],
                                       f"{w['file']} (face {w['face']})"), folder / name)
        w["explanation"] = str(folder / name)


def write(rows: list[dict], target: Path) -> None:
    """CSV or Parquet, by the file's suffix; written atomically."""
    import pandas as pd

    from agelens.tasks.core.stage import atomic_write_bytes

    table = pd.DataFrame(rows)
    if target.suffix.lower() == ".parquet":
        tmp = target.with_name(f".{target.name}.partial")
        table.to_parquet(tmp, index=False)
        tmp.replace(target)
    elif target.suffix.lower() == ".csv":
        atomic_write_bytes(target, table.to_csv(index=False).encode())
    else:
        raise AgelensError(f"--out {target}: write .csv or .parquet")


def main_predict(args) -> int:
    """`agelens predict PATH...`"""
    scorer = load_scorer(args.models, args.config, args.run, args.device)
    if scorer.warning:
        print(f"agelens: warning: {scorer.warning}", file=sys.stderr)
    rows, skipped = score(args.paths, scorer, detect=not args.no_detect, face_model=args.face_model,
                          batch_size=args.batch_size, explain=Path(args.explain) if args.explain else None,
                          progress=not args.json)
    if args.out:
        write(rows, Path(args.out).expanduser())
    if args.json:
        print(json.dumps({"model": scorer.source, "faces": rows, "skipped": skipped}))
        return 0
    for row in rows:
        age = f", about {row['expected_age']:.0f}" if row["expected_age"] is not None else ""
        where = "" if row["detection_score"] is None else f" face {row['face']} at ({row['x']}, {row['y']})"
        print(f"{row['file']}{where}: {row['decade']} (p={row['probability']:.2f}{age})")
    for item in skipped:
        print(f"{item['file']}: skipped, {item['reason']}")
    print(f"{len(rows)} faces scored by the {scorer.source}; {len(skipped)} files skipped"
          + (f"; table: {args.out}" if args.out else ""))
    return 0
