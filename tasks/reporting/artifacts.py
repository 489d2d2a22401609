"""Every Prefect artifact agelens publishes, and their keys (versions accumulate under a key).

The flow publishes a run's tables and its report from the stored outputs at the end of every
run, cached stages included, so each flow run carries its own artifacts. A run from a
deployment publishes under keys of its own (`agelens-<deployment>-run-report`), so the
histories of configurations side by side never interleave. Progress artifacts are the
exception: decode and train update them while they work (tasks/reporting/progress.py).

Prefect's UI renders markdown, links and HTML inside table cells, so every cell and column name
is escaped here, whatever a stage put in it (class names and file names come from users).
"""

from __future__ import annotations

import asyncio
import html
import re

from agelens.tasks.reporting.markdown import escape
from agelens.tasks.reporting.tables import Table

REPORT = "run-report"
RUNS = "runs"
RETRAINING = "retraining"
DECISION = "model-decision"


def artifact_key(name: str, scope: str | None = None) -> str:
    """`agelens-<name>`, or `agelens-<scope>-<name>`; Prefect keys allow lowercase letters,
    digits and dashes only."""
    parts = ["agelens", *([scope] if scope else []), name]
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


_LINK_SYNTAX = re.compile(r"([\\\[\]()`])")


def cell_text(value) -> str:
    """A table cell or column name as text: `<`, `>` and `&` as HTML entities (the UI renders a
    cell as HTML), link and code syntax backslash-escaped (names such as `train_loss` stay as
    they are); quotes need nothing outside an attribute."""
    return _LINK_SYNTAX.sub(r"\\\1", html.escape(str(value), quote=False))


def safe_rows(rows: list[dict]) -> list[dict]:
    """Every string cell and column name escaped; numbers and booleans kept as they are."""
    return [{cell_text(k): (v if isinstance(v, (int, float, bool)) or v is None else cell_text(v))
             for k, v in row.items()} for row in rows]


def publish_run(tables: list[Table], report: str | None, scope: str | None = None) -> None:
    """This run's artifacts, created concurrently."""
    from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
    from prefect.utilities.asyncutils import run_coro_as_sync

    pending = [acreate_table_artifact(safe_rows(t.rows), key=artifact_key(t.name, scope),
                                      description=escape(t.description)) for t in tables if t.rows]
    if report is not None:
        pending.append(acreate_markdown_artifact(report, key=artifact_key(REPORT, scope),
                                                 description="agelens run report with plots"))

    async def all_of_them():
        await asyncio.gather(*pending)

    run_coro_as_sync(all_of_them())


def publish_markdown(name: str, markdown: str, description: str, scope: str | None = None) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown, key=artifact_key(name, scope), description=escape(description))
