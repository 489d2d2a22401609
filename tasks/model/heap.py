"""Training without page faults: glibc's allocator kept from handing a step's memory back.

A training step frees its activations and allocates them again in the next step. By default
glibc returns blocks of that size to the kernel (munmap, or trimming the heap's top), so every
step faults its pages in and the kernel zeroes them again: some 10,000 page faults and 20 ms of
system time in a ResNet-10 step at 64 px, batch 64 (bench/train_throughput.py). Inside
`kept_heap()` those blocks stay in the process and are reused, in the main thread's heap and in
a worker thread's arena (where the pipeline trains); on leaving, the free memory goes back to the
kernel. Elsewhere than glibc (macOS, musl) it changes nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Iterator
from functools import lru_cache

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
KEPT_MMAP_THRESHOLD = 512 << 20  # blocks up to this come from the heap (ConvNeXt-Tiny's largest at 224 px: 154 MB)
KEPT_TRIM_THRESHOLD = 1 << 30  # free memory the heap keeps at its top before trimming
KEPT_TOP_PAD = 64 << 20  # a thread's arena deletes a heap (64 MB) once all free unless this much must stay
# Leaving, the thresholds glibc's own adaptive setting reaches once large blocks have been freed
# (its mmap threshold stops at 32 MB, the trim threshold is twice that): mallopt cannot re-enable
# the adaptation itself.
SETTLED_MMAP_THRESHOLD, SETTLED_TRIM_THRESHOLD, SETTLED_TOP_PAD = 32 << 20, 64 << 20, 128 << 10
# The setting is the process's, and trainings may run in threads side by side: the last to leave resets it.
_holders = {"count": 0, "lock": threading.Lock()}


@lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it (musl's mallopt does nothing)
        return libc
    except (OSError, AttributeError):
        return None


def heap_control() -> bool:
    """Whether this process's allocator can be told to keep its memory (glibc)."""
    return _glibc() is not None


@contextlib.contextmanager
def kept_heap() -> Iterator[None]:
    """Freed memory stays in the process until the block ends, then is returned."""
    libc = _glibc()
    if libc is None:
        yield
        return
    with _holders["lock"]:
        _holders["count"] += 1
        libc.mallopt(M_MMAP_THRESHOLD, KEPT_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, KEPT_TRIM_THRESHOLD)
        libc.mallopt(M_TOP_PAD, KEPT_TOP_PAD)
    try:
        yield
    finally:
        with _holders["lock"]:
            _holders["count"] -= 1
            if _holders["count"] == 0:
                libc.mallopt(M_MMAP_THRESHOLD, SETTLED_MMAP_THRESHOLD)
                libc.mallopt(M_TRIM_THRESHOLD, SETTLED_TRIM_THRESHOLD)
                libc.mallopt(M_TOP_PAD, SETTLED_TOP_PAD)
                libc.malloc_trim(0)
