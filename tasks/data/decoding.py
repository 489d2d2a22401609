"""Decoding and resizing every sampled image once, into one uint8 array on disk.

Training, evaluation, embedding and explanations read this array (as a memmap, in batches)
instead of decoding JPEGs every epoch. Images are decoded by a thread pool (PIL releases the
GIL), a few at a time, each written straight to its row of the array file, so memory stays
bounded whatever the sample size; images that cannot be decoded are left out (and counted) by
moving the later rows forward in chunks, never by a second full copy.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from agelens.tasks.core.errors import DataError

GROUP = 16  # images per unit of work: small enough to keep every thread busy
# Written rows are handed to the disk every so often rather than left to pile up in the page
# cache, whose reclaim would otherwise take a quarter of the CPU when the array is tens of GB.
FLUSH_ROWS = 4096


def _as_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. Pillow's convert() clips 16-bit and float greyscale at 255 (a 16-bit PNG
    becomes white), so those are scaled to 8 bits first."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
        else:
            scale = 1 / 257  # 0..65535 -> 0..255
        image = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def decode_one(path: Path, size: int) -> np.ndarray | None:
    """RGB uint8 (size, size, 3), or None when the file is not a readable image. JPEG's draft
    mode decodes at a reduced scale when that still covers `size` (and straight to RGB)."""
    try:
        with Image.open(path) as image:
            if image.format == "JPEG" and min(image.size) >= 2 * size:
                image.draft("RGB", (size, size))
            image = _as_rgb(image)
            if image.size != (size, size):
                image = image.resize((size, size), Image.BILINEAR, reducing_gap=None)
            return np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def read_rgb(path: Path) -> np.ndarray | None:
    """RGB uint8 at the file's own size, read as `decode_one` reads it; None when unreadable."""
    try:
        with Image.open(path) as image:
            return np.asarray(_as_rgb(image), dtype=np.uint8)
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
                try:
                    future.result()
                except OSError as error:
                    for _, other in pending:
                        other.cancel()
                    raise no_space(error, target.parent, len(paths) * row_bytes) or error
                top_up()
                if start - flushed >= FLUSH_ROWS:  # rows before `start` are all written
                    os.posix_fadvise(fd, flushed * row_bytes, (start - flushed) * row_bytes, os.POSIX_FADV_DONTNEED)
                    flushed = start
                if on_progress:
                    on_progress(min(start + GROUP, len(paths)))
        _squeeze(fd, ok, row_bytes)
    except OSError as error:
        raise no_space(error, target.parent, len(paths) * row_bytes) or error
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


def check_space(folder: Path, images: int, size: int) -> None:
    """One clear error, before any work, when the decoded array cannot fit on the disk."""
    folder.mkdir(parents=True, exist_ok=True)
    needed = images * size * size * 3
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DataError(f"not enough disk space in {folder}: decoding {images:,} images at {size} px needs "
                        f"{needed / 1e9:,.2f} GB, {free / 1e9:,.2f} GB are free")


def no_space(error: OSError, folder: Path, needed: int) -> DataError | None:
    """A DataError naming the folder and the space needed, when `error` is a full disk."""
    if error.errno != errno.ENOSPC:
        return None
    return DataError(f"the disk holding {folder} is full: decoding needs {needed / 1e9:,.2f} GB there")
