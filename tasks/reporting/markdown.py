"""Markdown for reports: user strings escaped, tables, embedded images (Prefect's UI renders
`data:image/png;base64` images in markdown artifacts)."""

from __future__ import annotations

import base64
import html
import io
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


def png_bytes(path: str | Path, max_width: int = 640) -> bytes:
    """A PNG downscaled to at most `max_width` pixels wide (for embedding in reports)."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.width > max_width:
            image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
        buffer = io.BytesIO()
        # A 128-colour palette keeps plots legible at a fraction of the size.
        image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def image(path: str | Path, alt: str, max_width: int = 480) -> str:
    data = base64.b64encode(png_bytes(path, max_width)).decode()
    return f"![{escape(alt)}](data:image/png;base64,{data})"
