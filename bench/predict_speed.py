"""How fast `agelens predict` scores photos, against the model alone.

agelens: `flows.predict.score` on image files: finding them, reading and decoding (threads),
         batching, the model with its test-time flip, calibrated probabilities, one row per face.
model alone: the same model and flip on the same images already decoded in memory
         (`tasks.model.inference.predict`): the ceiling for any tool.
Both on the demo's 250x250 JPEGs without detection (`--no-detect`; with `--detect` and
$AGELENS_FACE_MODEL set, YuNet runs too and is part of agelens' time). Target: >= 80%.

    .venv/bin/python bench/predict_speed.py [--backbone convnext_tiny --image-size 224] [--images 256] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.measure import machine, spread  # noqa: E402
from bench.train_throughput import ensure_images  # noqa: E402
from agelens.flows.predict.scoring import Scorer, score  # noqa: E402
from agelens.tasks.data.decoding import decode_one  # noqa: E402
from agelens.tasks.model.backbones import build_model  # noqa: E402
from agelens.tasks.model.heads import Head  # noqa: E402
from agelens.tasks.model.inference import Runtime, predict, prepare  # noqa: E402

CLASSES = tuple(f"{d}0s" for d in range(1, 7))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="convnext_tiny")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--detect", action="store_true", help="find faces with YuNet ($AGELENS_FACE_MODEL)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 32 images of 32 px, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.backbone, args.image_size, args.images, args.repeats = "convnext_narrow", 32, 32, 1
    torch.manual_seed(0)
    runtime = Runtime.resolve("auto", "auto", "auto")
    model = prepare(build_model(args.backbone, len(CLASSES), image_size=args.image_size), runtime).eval()
    facts = {"classes": list(CLASSES), "image_size": args.image_size, "temperature": 1.3, "tta": True}
    scorer = Scorer(model, runtime, Head("classes", CLASSES), facts, "an untrained model", "0" * 64)
    with tempfile.TemporaryDirectory() as tmp:
        files = ensure_images(Path(tmp), args.images)
        decoded = np.stack([decode_one(f, args.image_size) for f in files])
        rows = np.arange(len(files))
        warm = slice(0, args.batch_size)
        predict(model, decoded[warm], rows[warm], runtime, args.batch_size, scorer.head, 1.3, True)  # warm-up
        alone, ours = [], []
        for _ in range(args.repeats):
            began = time.perf_counter()
            with torch.no_grad():
                predict(model, decoded, rows, runtime, args.batch_size, scorer.head, 1.3, True)
            alone.append(len(files) / (time.perf_counter() - began))
            began = time.perf_counter()
            found, skipped = score([str(f) for f in files], scorer, detect=args.detect, batch_size=args.batch_size,
                                   progress=False)
            ours.append(len(found) / (time.perf_counter() - began))
            assert len(found) == len(files) and not skipped, skipped[:3]
    ratio = np.median(ours) / np.median(alone)
    print(f"machine: {machine()}; device {runtime.device}, torch {torch.__version__}")
    print(f"{args.backbone} at {args.image_size} px, {len(files)} images of 250x250 JPEG, batch {args.batch_size}, "
          f"test-time flip, detection {'on' if args.detect else 'off'}")
    print(f"model alone (decoded images in memory): {spread(alone, ' img/s', 1)}")
    print(f"agelens predict (files to rows):        {spread(ours, ' img/s', 1)}")
    print(f"ratio: {ratio:.2f} of the model alone (target >= 0.80: {'met' if ratio >= 0.8 else 'NOT met'})")


if __name__ == "__main__":
    main()
