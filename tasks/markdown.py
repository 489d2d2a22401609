"""Markdown for reports: user strings escaped, tables, embedded images (Prefect's UI renders
`data:image/png;base64` images in markdown artifacts)."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|$~])")


def escape(text) -> str:
    """Any user string (file name, label) as literal text: HTML escaped, markdown and table
    syntax backslash-escaped."""
    return _SPECIAL.sub(r"\\\1", html.escape(str(text), quote=True))


def cell(value, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return escape(value)


def table(rows: list[dict]) -> str:
    if not rows:
        return ""
    head = list(rows[0])
    lines = ["| " + " | ".join(escape(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(r.get(h, "")) for h in head) + " |" for r in rows]
    return "\n".join(lines)


def image(path: str | Path, alt: str, max_width: int = 480) -> str:
    from tasks.plots import png_bytes

    data = base64.b64encode(png_bytes(path, max_width)).decode()
    return f"![{escape(alt)}](data:image/png;base64,{data})"
