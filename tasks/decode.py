"""Stage: decode and resize every manifest image once, into a memory-mapped uint8 array.

Training, evaluation, embedding and explanations all read this array instead of
decoding JPEGs with PIL every epoch. Images that cannot be decoded are excluded here,
when first decoded, and counted.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from prefect import get_run_logger, task

from tasks.stage import StageKey, task_output, write_json

ARRAY = "images.u8"


def decode_one(path: Path, size: int) -> np.ndarray | None:
    """RGB uint8 (size, size, 3), or None when the file is not a readable image."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.BILINEAR, reducing_gap=None)
            return np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def decode_all(paths: list[str], root: Path, size: int, target: np.ndarray, threads: int) -> np.ndarray:
    """Fill `target[i]` with image i; return a mask of the images that decoded."""
    ok = np.zeros(len(paths), dtype=bool)

    def work(i: int) -> None:
        pixels = decode_one(root / paths[i], size)
        if pixels is not None:
            target[i] = pixels
            ok[i] = True

    with ThreadPoolExecutor(max_workers=threads) as pool:  # PIL releases the GIL while decoding
        list(pool.map(work, range(len(paths))))
    return ok


def open_images(handle: dict) -> tuple[pd.DataFrame, np.ndarray]:
    """(manifest of decoded images, read-only (N, S, S, 3) uint8 memmap) of a decode result."""
    index = pd.read_parquet(handle["outputs"]["index"]["path"])
    size = handle["summary"]["image_size"]
    array = np.memmap(handle["outputs"]["images"]["path"], dtype=np.uint8, mode="r",
                      shape=(len(index), size, size, 3))
    return index, array


@task(name="decode", cache_key_fn=StageKey("decode", ("tasks.decode",)), persist_result=True,
      result_serializer="json")
def decode_images(split: dict, images: dict, image_size: int, out: str) -> dict:
    log = get_run_logger()
    manifest = pd.read_parquet(split["outputs"]["manifest"]["path"])
    root = Path(images["path"])
    with task_output() as out_dir:
        scratch = np.lib.format.open_memmap(out_dir.path("scratch.npy"), mode="w+", dtype=np.uint8,
                                            shape=(len(manifest), image_size, image_size, 3))
        ok = decode_all(manifest["path"].tolist(), root, image_size, scratch, threads=os.cpu_count() or 1)
        bad = manifest.loc[~ok, "path"].tolist()
        for path in bad[:5]:
            log.warning("excluded undecodable image %s", path)
        kept = manifest[ok].reset_index(drop=True)
        if kept.empty:
            raise ValueError("no image of the sample could be decoded")
        kept = kept.assign(row=np.arange(len(kept)))
        packed = np.memmap(out_dir.path(ARRAY), dtype=np.uint8, mode="w+", shape=(len(kept), image_size, image_size, 3))
        packed[:] = scratch[ok]
        packed.flush()
        del packed, scratch
        os.remove(out_dir.path("scratch.npy"))
        kept.to_parquet(out_dir.path("index.parquet"), index=False)
        summary = {"image_size": image_size, "images": int(len(kept)), "undecodable": len(bad),
                   "undecodable_examples": bad[:5],
                   "per_split": {str(k): int(v) for k, v in kept["split"].value_counts().items()}}
        write_json(out_dir.path("summary.json"), summary)
        log.info("decoded %d images at %d px (%d undecodable)", len(kept), image_size, len(bad))
        return {"summary": summary, "classes": split["classes"],
                "outputs": {"images": out_dir.handle(ARRAY), "index": out_dir.handle("index.parquet")}}
