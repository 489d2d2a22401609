"""Stage: decode and resize every sampled image once, into one uint8 array on disk, in bounded
memory (tasks/data/decoding.py), with progress in the terminal, the log and the Prefect UI."""

from __future__ import annotations

from agelens.tasks.core.stage import Job, Stage, Summary, logger


class DecodeSummary(Summary):
    image_size: int
    images: int
    undecodable: int
    undecodable_examples: list[str]
    per_split: dict[str, int]
    seconds: float
    images_per_s: float


STAGE = Stage("decode", DecodeSummary, needs=("split",), reads=("image_size",), inputs=("images",),
              outputs=("images", "index"))


def run(job: Job) -> dict:
    import os
    import time
    from pathlib import Path

    import pandas as pd

    from agelens.tasks.core.errors import DataError
    from agelens.tasks.data.decoding import check_space, decode_into
    from agelens.tasks.reporting.progress import DecodeProgress

    log = logger()
    size = job.settings["image_size"]
    manifest = pd.read_parquet(job.path("split", "manifest"))
    root = Path(job.inputs["images"]["path"])
    check_space(job.folder.parent, len(manifest), size)
    progress = DecodeProgress(len(manifest), log)
    began = time.monotonic()
    with job.output() as out:
        try:
            ok = decode_into(out.path("images.u8"), manifest["path"].tolist(), root, size, os.cpu_count() or 1, progress)
        finally:
            progress.close()
        seconds = time.monotonic() - began
        bad = manifest.loc[~ok, "path"].tolist()
        for path in bad[:5]:
            log.warning("excluded undecodable image %s", path)
        if not ok.any():
            raise DataError(f"no image of the sample could be decoded (e.g. {', '.join(bad[:3])}) under {root}")
        kept = manifest[ok].reset_index(drop=True)
        kept.to_parquet(out.path("index.parquet"), index=False)
        out.add("images", "images.u8", same_as_key=True)  # hashing 25 GB would double the stage's time
        out.add("index", "index.parquet")
        log.info("decoded %d images at %d px in %.1f s (%d undecodable)", len(kept), size, seconds, len(bad))
        return out.finish(DecodeSummary(
            image_size=size, images=len(kept), undecodable=len(bad), undecodable_examples=bad[:5],
            per_split={str(k): int(v) for k, v in kept["split"].value_counts().items()}, seconds=round(seconds, 2),
            images_per_s=round(len(manifest) / max(seconds, 1e-9), 1)), meta={"image_size": size})


def describe(s: DecodeSummary) -> str:
    return f"{s.images} images at {s.image_size} px, {s.undecodable} undecodable"
