"""The errors a user can cause and fix; the CLI prints each as one line, without a traceback."""

from __future__ import annotations


class AgelensError(ValueError):
    """An expected failure; the message names the input or option and the problem."""


class DataError(AgelensError):
    """Input data, weights or a layer that cannot be used."""


class ConfigError(AgelensError):
    """A setting that cannot work; the message names the option."""


def is_expected(record) -> bool:
    """Whether a log record is about an expected error (Prefect logs a task's or flow's
    exception with its traceback, several times): such records are replaced by one line."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, AgelensError):
        return True
    text = record.getMessage()
    return any(f"{cls.__name__}:" in text or f"{cls.__name__}(" in text for cls in (AgelensError, DataError, ConfigError))
