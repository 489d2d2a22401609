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
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agelens.tasks.core.errors import AgelensError, ConfigError, DataError

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
    if run is not None and not run.strip():
        raise ConfigError("--run '': name a run id or its first characters (see agelens runs), or leave --run out "
                          "for the champion")
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
        if config is not None:  # an id or its first characters, as --run and promote take
            named = [c for c in found if c.startswith(config)] if config else []
            if len(named) != 1:
                raise ConfigError(f"--config {config!r} names {'no' if not named else 'more than one'} configuration "
                                  f"in {out} ({', '.join(found) or 'none recorded'}; see agelens models)")
            config = named[0]
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


class Stopped(Exception):
    """Ctrl-C or SIGTERM while scoring: what was scored until then, of how many files."""

    def __init__(self, rows: list[dict], skipped: list[dict], files: int, signum: int):
        super().__init__(f"interrupted after {len(rows)} faces")
        self.rows, self.skipped, self.files, self.signum = rows, skipped, files, signum


def score(paths: list[str], scorer: Scorer, detect: bool = True, face_model: str | None = None, batch_size: int = 64,
          explain: Path | None = None, progress: bool = True, on_rows=None) -> tuple[list[dict], list[dict]]:
    """(one row per face, [{file, reason}] for every file without one). Photos are read a few
    batches ahead by READERS threads; `on_rows(rows)` sees each scored batch. Ctrl-C or SIGTERM
    (Interrupted) stops within a batch: Stopped carries what was scored."""
    import torch
    from tqdm.auto import tqdm

    from agelens.flows.service.interrupt import Interrupted, stop_on_signals
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
    stamp = {"temperature": scorer.facts["temperature"], "model": scorer.digest[:16]}

    def flush() -> None:
        if not pending:
            return
        crops = np.stack([c for c, _ in pending])
        probs = predict(scorer.model, crops, np.arange(len(crops)), scorer.runtime, batch_size, scorer.head,
                        scorer.facts["temperature"], scorer.facts["tta"])
        classes, ages = scorer.head.class_probs(probs), scorer.head.expected_age(probs)
        if explain is not None:
            _explain(scorer, crops, [w for _, w in pending], explain)
        scored = []
        for i, (_, where) in enumerate(pending):
            best = int(classes[i].argmax())
            scored.append({**where, "decade": scorer.classes[best], "probability": round(float(classes[i, best]), 4),
                           **{f"prob_{c}": round(float(p), 4) for c, p in zip(scorer.classes, classes[i])},
                           "expected_age": None if ages is None else round(float(ages[i]), 1), **stamp})
        rows.extend(scored)
        pending.clear()
        if on_rows:
            on_rows(scored)

    pool = ThreadPoolExecutor(READERS, thread_name_prefix="agelens-read")
    ahead: deque = deque()
    queue = iter(files)
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=None if progress else True)
    try:
        with torch.no_grad(), stop_on_signals():
            while True:
                while len(ahead) < 2 * batch_size and (path := next(queue, None)) is not None:
                    ahead.append((path, pool.submit(lambda p: _faces(p, detector(), size, framing), path)))
                if not ahead:
                    break
                path, future = ahead.popleft()
                faces, reason = future.result()
                if reason:
                    skipped.append({"file": str(path), "reason": reason})
                for k, (face, where) in enumerate(faces):
                    pending.append((face, {"file": str(path), "face": k, **where}))
                if len(pending) >= batch_size:
                    flush()
                bar.update()
            flush()
    except Interrupted as stop:
        raise Stopped(rows, skipped, len(files), stop.signum) from None
    finally:
        bar.close()
        pool.shutdown(wait=False, cancel_futures=True)
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
    with scorer.head.scored(scorer.model) as model:
        maps, _, _ = cam_maps(model, model_input(torch.from_numpy(crops), scorer.runtime), layer, ["grad_cam"])
    for crop, heat, w in zip(crops, maps["grad_cam"].cpu().numpy(), where):
        # The path's digest keeps photos of one name in different folders apart.
        digest = hashlib.sha256(w["file"].encode("utf-8", "surrogateescape")).hexdigest()[:8]
        name = f"{Path(w['file']).stem[:60]}-{digest}_face{w['face']}.png"
        grids.save(grids.picture_table([[(crop, "face"), (overlay(crop, heat), f"Grad-CAM on {layer}")]],
                                       f"{shown(w['file'])} (face {w['face']})"), folder / name)
        w["explanation"] = str(folder / name)


COLUMNS = ("file", "face", "x", "y", "w", "h", "detection_score", "crop", "decade", "probability")
TAIL = ("expected_age", "temperature", "model", "skipped")


def utf8(text: str) -> str:
    """A file name as UTF-8 text: bytes that are not UTF-8 written as backslash escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def shown(text: str) -> str:
    """A file name as one printable line: bytes that are not UTF-8 and control characters escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in utf8(text))


def table_of(rows: list[dict], skipped: list[dict], classes: list[str]) -> tuple[list[str], list[dict]]:
    """(columns, records): one record per face, then one per file without one (its reason under
    `skipped`); every column always there, so an empty table still has its header."""
    columns = [*COLUMNS, *(f"prob_{c}" for c in classes), *TAIL]
    return columns, [*rows, *({"file": s["file"], "skipped": s["reason"]} for s in skipped)]


def write(rows: list[dict], target: Path, skipped: list[dict] = (), classes: list[str] = ()) -> None:
    """CSV or Parquet, by the file's suffix; written atomically. A CSV holds every file name as
    its bytes; Parquet text must be UTF-8, so there other bytes are written as backslash escapes."""
    import csv
    import io

    from agelens.tasks.core.stage import atomic_write_bytes

    if not classes:
        classes = [k.removeprefix("prob_") for k in (rows[0] if rows else {}) if k.startswith("prob_")]
    columns, records = table_of(rows, list(skipped), list(classes))
    try:
        if target.suffix.lower() == ".parquet":
            import pandas as pd

            text = [{**r, "file": utf8(r["file"])} for r in records]
            tmp = target.with_name(f".{target.name}.partial")
            try:
                pd.DataFrame(text, columns=columns).to_parquet(tmp, index=False)
                tmp.replace(target)
            finally:
                tmp.unlink(missing_ok=True)
        elif target.suffix.lower() == ".csv":
            buffer = io.StringIO()
            table = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
            table.writeheader()
            table.writerows(records)
            atomic_write_bytes(target, buffer.getvalue().encode("utf-8", "surrogateescape"))
        else:
            raise ConfigError(f"--out {shown(str(target))}: write .csv or .parquet")
    except OSError as error:
        raise AgelensError(f"cannot write {shown(str(target))}: {error.strerror or type(error).__name__}") from None


def check_outputs(args) -> None:
    """Every place predict writes, and the device, checked before any work: one ConfigError each."""
    from agelens.flows.pipeline.settings import parse_settings

    parse_settings({"device": args.device})  # names --device when it is not a device
    if args.out:
        target = Path(args.out).expanduser()
        if target.suffix.lower() not in (".csv", ".parquet"):
            raise ConfigError(f"--out {shown(args.out)}: write .csv or .parquet")
        if target.is_dir():
            raise ConfigError(f"--out {shown(args.out)} is a folder; name a .csv or .parquet file")
        writable(target.resolve().parent, f"--out {shown(args.out)}")
    if args.explain:
        folder = Path(args.explain).expanduser()
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--explain {shown(args.explain)} is a file; name a folder for the overlays")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"--explain {shown(args.explain)}: cannot create it ({error.strerror})") from None
        writable(folder, f"--explain {shown(args.explain)}")


def writable(folder: Path, what: str) -> None:
    """ConfigError naming `what` unless a file can be created in `folder` (tried: permissions
    alone say nothing for root or for /proc)."""
    import uuid

    probe = folder / f".agelens-write-test-{uuid.uuid4().hex[:8]}"
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"{what}: cannot write into {shown(str(folder))} ({error.strerror or type(error).__name__})") \
            from None


def main_predict(args) -> int:
    """`agelens predict PATH...`: faces printed as they are scored (or JSON at the end); the
    table written at the end, or with what was scored when interrupted."""
    from tqdm.auto import tqdm

    check_outputs(args)
    scorer = load_scorer(args.models, args.config, args.run, args.device)
    if scorer.warning:
        print(f"agelens: warning: {scorer.warning}", file=sys.stderr)

    def say(rows: list[dict]) -> None:
        for row in rows:
            age = f", about {row['expected_age']:.0f}" if row["expected_age"] is not None else ""
            where = "" if row["detection_score"] is None else f" face {row['face']} at ({row['x']}, {row['y']})"
            tqdm.write(f"{shown(row['file'])}{where}: {row['decade']} (p={row['probability']:.2f}{age})", file=sys.stdout)

    out = Path(args.out).expanduser() if args.out else None
    try:
        rows, skipped = score(args.paths, scorer, detect=not args.no_detect, face_model=args.face_model,
                              batch_size=args.batch_size, explain=Path(args.explain) if args.explain else None,
                              progress=not args.json, on_rows=None if args.json else say)
    except Stopped as stop:
        if out:
            write(stop.rows, out, stop.skipped, scorer.classes)
        print(f"\nagelens: interrupted after scoring {len(stop.rows)} faces (of {stop.files} files)"
              + (f"; {shown(str(out))} holds them" if out else ""), file=sys.stderr, flush=True)
        if args.json:
            print(json.dumps({"model": scorer.source, "faces": stop.rows, "skipped": stop.skipped, "interrupted": True}))
        return 128 + stop.signum
    if out:
        write(rows, out, skipped, scorer.classes)
    if args.json:
        print(json.dumps({"model": scorer.source, "faces": rows, "skipped": skipped}))
    else:
        for item in skipped:
            print(f"{shown(item['file'])}: skipped, {item['reason']}")
        print(f"{len(rows)} faces scored by the {scorer.source}; {len(skipped)} files skipped"
              + (f"; table: {shown(str(out))}" if out else ""))
    if not rows:
        raise AgelensError("no face was scored: " + (f"{len(skipped)} files skipped, e.g. {shown(skipped[0]['file'])}: "
                                                     f"{skipped[0]['reason']}" if skipped else "no image file found"))
    return 0
