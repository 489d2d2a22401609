"""The decoded images, read in batches: never a whole split in memory.

`decode` writes one uint8 array (N, S, S, 3) to disk; every stage that reads images opens it
as a read-only memmap and iterates over batches of rows. Each batch is read with its rows
sorted (sequential reads), and a background thread prepares the next batch (gather, tensor,
pinned memory and an asynchronous copy on CUDA) while the current one computes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import torch

from agelens.tasks.core.stage import Job


def open_decoded(job: Job) -> tuple[pd.DataFrame, np.memmap]:
    """(index: one row per decoded image, in array order; read-only (N, S, S, 3) uint8 memmap)."""
    index = pd.read_parquet(job.path("decode", "index"))
    size = job.upstream["decode"]["meta"]["image_size"]
    array = np.memmap(job.path("decode", "images"), dtype=np.uint8, mode="r", shape=(len(index), size, size, 3))
    return index, array


def rows_of(index: pd.DataFrame, split: str) -> np.ndarray:
    return index.index[index["split"] == split].to_numpy()


def batch_rows(order: np.ndarray, batch_size: int, max_batches: int | None = None) -> list[np.ndarray]:
    """`order` cut into consecutive batches, each sorted (the memmap is read forwards)."""
    starts = range(0, len(order), batch_size)
    if max_batches is not None:
        starts = starts[:max_batches]
    return [np.sort(order[start:start + batch_size]) for start in starts]


def _load(array: np.ndarray, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    batch = torch.from_numpy(np.ascontiguousarray(array[rows]))
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def batches(array: np.ndarray, plan: list[np.ndarray], device: torch.device, prefetch: int = 2
            ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(rows, uint8 tensor (B, S, S, 3) on `device`) for each batch of `plan`, in order, the
    next `prefetch` batches prepared in a background thread."""
    upcoming = iter(plan)
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="agelens-batches") as pool:
        def top_up() -> None:
            while len(pending) <= prefetch and (rows := next(upcoming, None)) is not None:
                pending.append((rows, pool.submit(_load, array, rows, device)))

        top_up()
        while pending:
            rows, future = pending.popleft()
            top_up()
            yield rows, future.result()
