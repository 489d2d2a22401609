"""File locks (flock): released by the kernel when their process dies, so a killed run never
leaves a stale lock. Written here because filelock has no shared locks, which gc needs."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from agelens.tasks.core.errors import AgelensError


class Busy(Exception):
    """A non-blocking lock is held by another process."""


class NoLock(AgelensError):
    """The lock file cannot be created: a read-only folder, or a file where a folder should be."""


@contextmanager
def locked(path: str | os.PathLike, shared: bool = False, wait: bool = True):
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    except OSError as error:
        raise NoLock(f"cannot take the lock {path}: {error.strerror or type(error).__name__} "
                           "(agelens needs to write in that folder)") from None
    try:
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(handle, mode)
        except BlockingIOError:
            raise Busy(str(path)) from None
        yield handle
    finally:
        handle.close()  # closing releases the lock


def active_lock(out: str | os.PathLike) -> Path:
    """Every run holds this shared while it uses `out`; gc needs it exclusively."""
    return Path(out) / ".agelens" / "active.lock"


def stage_lock(out: str | os.PathLike, stage: str, key: str) -> Path:
    return Path(out) / stage / f"{key}.lock"
