"""The errors a user can cause and fix; the CLI prints each as one line, without a traceback."""

from __future__ import annotations


class AgelensError(ValueError):
    """An expected failure; the message names the input or option and the problem."""


class DataError(AgelensError):
    """Input data, weights or a layer that cannot be used."""


class ConfigError(AgelensError):
    """A setting that cannot work; the message names the option."""


def full_disk(error: BaseException, folder) -> DataError | None:
    """A DataError naming `folder` when `error` comes from its disk being full. torch's and
    safetensors' writers raise RuntimeErrors for it (not OSError), so a failed write on a disk
    with next to nothing free counts too."""
    import errno
    import shutil

    chain, seen = [], error
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if any(isinstance(e, DataError) for e in chain):
        return None
    nospace = any(isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e) for e in chain)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if nospace or (isinstance(error, (RuntimeError, OSError)) and free < FULL_BYTES):
        return DataError(f"the disk holding {folder} is full ({free / 1e6:,.1f} MB free): free some space, or pass "
                         "--out on a larger disk; rerun the same command to continue")
    return None


FULL_BYTES = 8 << 20  # a disk with less free is full for any stage's outputs


def is_expected(record) -> bool:
    """Whether a log record is about an expected error (Prefect logs a task's or flow's
    exception with its traceback, several times): such records are replaced by one line."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, AgelensError):
        return True
    text = record.getMessage()
    return any(f"{cls.__name__}:" in text or f"{cls.__name__}(" in text for cls in (AgelensError, DataError, ConfigError))
