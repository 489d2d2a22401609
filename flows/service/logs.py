"""Expected errors (a missing file, a bad option) in one line, in the terminal and in a worker's
log alike; Prefect would print the same traceback three times (task, flow, engine)."""

from __future__ import annotations

import logging

from agelens.tasks.core.errors import is_expected


ONE_LINE = "agelens: error: "  # how the flow logs an expected error, once


def _keep(record: logging.LogRecord) -> bool:
    return not is_expected(record)


def _keep_for_cli(record: logging.LogRecord) -> bool:
    """The CLI prints the error line itself, and says when a disk is full (Prefect warns that it
    could not write a failed task's record: the API log keeps that)."""
    message = record.getMessage()
    return _keep(record) and not message.startswith(ONE_LINE) and not message.startswith("Failed to write result")


def quiet_expected_errors(cli: bool = False) -> None:
    """Drop Prefect's console records of expected errors (the API keeps them); idempotent."""
    from prefect.logging.handlers import PrefectConsoleHandler

    keep = _keep_for_cli if cli else _keep
    for logger in (logging.getLogger(), logging.getLogger("prefect")):
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler) and keep not in handler.filters:
                handler.addFilter(keep)
