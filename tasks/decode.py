"""Stage: decode and resize every sampled image once, into one uint8 array on disk.

Training, evaluation, embedding and explanations read this array (as a memmap, in batches)
instead of decoding JPEGs every epoch. Images are decoded by a thread pool (PIL releases the
GIL), a few at a time, each written straight to its row of the array file, so memory stays
bounded whatever the sample size; images that cannot be decoded are left out (and counted) by
moving the later rows forward in chunks, never by a second full copy.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from tasks.errors import DataError
from tasks.progress import DECODE, Progress
from tasks.stage import Job, logger

GROUP = 16  # images per unit of work: small enough to keep every thread busy
# Written rows are handed to the disk every so often rather than left to pile up in the page
# cache, whose reclaim would otherwise take a quarter of the CPU when the array is tens of GB.
FLUSH_ROWS = 4096


def decode_one(path: Path, size: int) -> np.ndarray | None:
    """RGB uint8 (size, size, 3), or None when the file is not a readable image. JPEG's draft
    mode decodes at a reduced scale when that still covers `size` (and straight to RGB)."""
    try:
        with Image.open(path) as image:
            if image.format == "JPEG" and min(image.size) >= 2 * size:
                image.draft("RGB", (size, size))
            image = image.convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.BILINEAR, reducing_gap=None)
            return np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def decode_into(target: Path, paths: list[str], root: Path, size: int, threads: int, on_progress=None) -> np.ndarray:
    """Decode each of `paths` into row i of the uint8 array file `target`; return the mask of
    those that decoded. Threads write their rows themselves (pwrite, no lock, no copy through
    one writer); undecodable rows are then squeezed out in chunks, keeping the order. At most a
    few groups of images per thread are in memory."""
    row_bytes = size * size * 3
    ok = np.zeros(len(paths), dtype=bool)
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        def work(start: int) -> None:
            for i in range(start, min(start + GROUP, len(paths))):
                pixels = decode_one(root / paths[i], size)
                if pixels is not None:
                    os.pwrite(fd, pixels.data, i * row_bytes)
                    ok[i] = True

        starts = iter(range(0, len(paths), GROUP))
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="agelens-decode") as pool:
            pending: deque = deque()

            def top_up() -> None:
                while len(pending) < 4 * threads and (start := next(starts, None)) is not None:
                    pending.append((start, pool.submit(work, start)))

            top_up()
            flushed = 0
            while pending:
                start, future = pending.popleft()
                future.result()
                top_up()
                if start - flushed >= FLUSH_ROWS:  # rows before `start` are all written
                    os.posix_fadvise(fd, flushed * row_bytes, (start - flushed) * row_bytes, os.POSIX_FADV_DONTNEED)
                    flushed = start
                if on_progress:
                    on_progress(min(start + GROUP, len(paths)))
        _squeeze(fd, ok, row_bytes)
    finally:
        os.close(fd)
    return ok


def _squeeze(fd: int, ok: np.ndarray, row_bytes: int, chunk_rows: int = 256) -> None:
    """Move the decoded rows after the first gap forward, in order, a chunk at a time; cut the file."""
    kept = np.flatnonzero(ok)
    first_gap = int(np.argmin(ok)) if not ok.all() else len(ok)
    for start in range(first_gap, len(kept), chunk_rows):
        rows = kept[start:start + chunk_rows]
        for target, row in enumerate(rows, start):  # target < row: never overwrites an unread row
            os.pwrite(fd, os.pread(fd, row_bytes, int(row) * row_bytes), target * row_bytes)
    os.ftruncate(fd, len(kept) * row_bytes)


class DecodeProgress:
    """Images/s and the time left, in the terminal (tqdm), the log and the Prefect UI."""

    def __init__(self, total: int, log, every: float = 30.0):
        self.total, self.log, self.every = total, log, every
        self.began = self.logged = time.monotonic()
        self.bar = tqdm(total=total, desc="decode", unit="img", disable=None)
        self.artifact = Progress(DECODE, f"Decoding {total:,} images", total)

    def __call__(self, done: int) -> None:
        self.bar.update(done - self.bar.n)
        elapsed = time.monotonic() - self.began
        rate = done / max(elapsed, 1e-9)
        text = f"decoded {done:,} of {self.total:,} images ({rate:,.0f}/s, {(self.total - done) / max(rate, 1e-9):,.0f} s left)"
        self.artifact(done, text)
        if done == self.total or time.monotonic() - self.logged >= self.every:
            self.logged = time.monotonic()
            self.log.info(text)

    def close(self) -> None:
        self.bar.close()


def run(job: Job) -> dict:
    log = logger()
    size = job.settings["image_size"]
    manifest = pd.read_parquet(job.path("split", "manifest"))
    root = Path(job.inputs["images"]["path"])
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
        summary = {"image_size": size, "images": int(len(kept)), "undecodable": len(bad), "undecodable_examples": bad[:5],
                   "per_split": {str(k): int(v) for k, v in kept["split"].value_counts().items()},
                   "seconds": round(seconds, 2), "images_per_s": round(len(manifest) / max(seconds, 1e-9), 1)}
        log.info("decoded %d images at %d px in %.1f s (%d undecodable)", len(kept), size, seconds, len(bad))
        return out.finish(summary, meta={"image_size": size, "classes": job.upstream["split"]["meta"]["classes"]})
