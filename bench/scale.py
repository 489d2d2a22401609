"""The full CACD in bounded memory: decode and one capped training epoch on every image.

Writes N synthetic 250x250 JPEGs under the real metadata's file names (all 163,446 by default;
kept between runs), then runs, inside a memory cgroup,
    agelens run --data <real metadata> --images <them> --per-class all --until train --epochs 1
                --max-steps K --backbone convnext_narrow --weights none --image-size S
and reports the peak *anonymous* memory of the run's process tree (RssAnon, sampled; page cache
and the memmapped array are not counted) next to the decoded array's size, and the decode rate
against a plain PIL thread-pool decode of the same files measured in the same run.
Targets: peak anonymous memory <= 3 GB whatever N; decode >= 90% of plain PIL.

    .venv/bin/python bench/scale.py                      # all 163,446 images at 224 px
    .venv/bin/python bench/scale.py --images 20000 --image-size 112
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.measure import machine, run_measured  # noqa: E402
from agelens.tasks.data.sources import read_source  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REAL_META = REPO / ".." / "shared" / "data" / "cacd" / "celebrity2000_meta.mat"


def synthetic_face(index: int) -> Image.Image:
    """A smooth 250x250 picture (compresses like a photo, unlike noise), different per index."""
    rng = np.random.default_rng(index)
    ramp = np.linspace(0, 1, 250, dtype=np.float32)
    base = rng.uniform(40, 200, 3).astype(np.float32)
    pixels = base + 40 * ramp[:, None, None] * rng.uniform(-1, 1, 3).astype(np.float32) + \
        30 * ramp[None, :, None] * rng.uniform(-1, 1, 3).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    x, y = rng.uniform(80, 170, 2)
    draw.ellipse([x - 55, y - 70, x + 55, y + 70], tuple(int(c) for c in rng.integers(120, 250, 3)))
    return image


def write_images(names: list[str], root: Path, threads: int) -> int:
    """The images not in `root` yet (linked from a sibling folder that has them, or drawn);
    returns how many were added. A folder holds exactly the images of one N."""
    root.mkdir(parents=True, exist_ok=True)
    present = set(os.listdir(root))
    missing = [(i, n) for i, n in enumerate(names) if n not in present]
    donors = [d for d in root.parent.glob("CACD2000-*") if d != root]

    def write(item):
        i, name = item
        for donor in donors:
            try:
                return os.link(donor / name, root / name)
            except OSError:
                continue
        synthetic_face(i).save(root / name, quality=90)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, missing, chunksize=256))
    return len(missing)


def plain_decode(paths: list[Path], size: int, threads: int) -> float:
    """Images/s of the obvious decode: PIL open, convert, resize, in a thread pool."""
    def one(path):
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR))

    began = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(one, paths, chunksize=64):
            pass
    return len(paths) / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=None, help="how many images (default: all of the metadata)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--max-steps", type=int, default=20, help="training (and validation) batches of the epoch")
    parser.add_argument("--memory-limit-gb", type=float, default=8.0, help="the cgroup's limit (anon + page cache)")
    parser.add_argument("--plain-sample", type=int, default=30000, help="images decoded by the plain PIL baseline")
    parser.add_argument("--workdir", type=Path, default=REPO / "data" / "bench-scale")
    parser.add_argument("--meta", type=Path, default=REAL_META)
    args = parser.parse_args()
    threads = os.cpu_count() or 1

    names = read_source(args.meta, "mat-v5")["path"].tolist()
    names = names[: args.images] if args.images else names
    faces = args.workdir / f"CACD2000-{len(names)}"
    began = time.perf_counter()
    written = write_images(names, faces, threads)
    print(f"images: {len(names):,} synthetic 250x250 JPEGs in {faces} ({written:,} written now, "
          f"{time.perf_counter() - began:.0f} s)", flush=True)

    sample = [faces / n for n in np.random.default_rng(0).permutation(names)[: args.plain_sample]]
    plain_decode(sample[:2000], args.image_size, threads)  # warm the page cache and the code
    plain = plain_decode(sample, args.image_size, threads)

    out = args.workdir / "out"
    shutil.rmtree(out, ignore_errors=True)  # decode for real every time
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "PREFECT_HOME": home, "PREFECT_LOGGING_LEVEL": "WARNING",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        command = [str(Path(sys.executable).with_name("agelens")), "run", "--data", str(args.meta), "--images",
                   str(faces), "--out", str(out), "--per-class", "all", "--until", "train", "--epochs", "1",
                   "--max-steps", str(args.max_steps), "--backbone", "convnext_narrow", "--weights", "none",
                   "--image-size", str(args.image_size), "--json"]
        proc, peak, seconds = run_measured(command, env, int(args.memory_limit_gb * 2**30), log=args.workdir / "run.log")
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-15:])
        sys.exit(f"the run failed (exit {proc.returncode}; -9 = killed at the cgroup's memory limit):\n{tail}")
    result = json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("{")))
    decode, train = result["stages"]["decode"]["summary"], result["stages"]["train"]["summary"]
    array_gb = decode["images"] * args.image_size ** 2 * 3 / 1e9
    ratio = decode["images_per_s"] / plain
    print(f"machine:  {machine()}")
    print(f"command:  {' '.join(command[1:])}")
    print(f"run:      {seconds:.0f} s wall; decoded {decode['images']:,} images at {args.image_size} px "
          f"({decode['undecodable']} undecodable) into a {array_gb:.1f} GB array; trained "
          f"{train['train_images']:,} train images for {args.max_steps} steps of 32")
    print(f"memory:   peak anonymous {peak / 1e9:.2f} GB (target <= 3 GB: {'met' if peak <= 3e9 else 'NOT met'}) "
          f"for a {array_gb:.1f} GB array, in a cgroup limited to {args.memory_limit_gb:.0f} GB")
    print(f"decode:   agelens {decode['images_per_s']:,.0f} images/s over all {decode['images']:,} (written to the "
          f"array) vs plain PIL thread pool {plain:,.0f} images/s over {len(sample):,} (not stored): ratio {ratio:.2f} "
          f"(target >= 0.90: {'met' if ratio >= 0.9 else 'NOT met'})")


if __name__ == "__main__":
    main()
