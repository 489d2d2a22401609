"""Markdown for reports: user strings escaped, tables, embedded images (Prefect's UI renders
`data:image/png;base64` images in markdown artifacts).

One rule for text that goes into markdown: every character with a meaning in CommonMark or its
tables (`<`, `&`, `|`, brackets, emphasis, ...) is backslash-escaped, once, and nothing else is
changed: a renderer shows the text as it was (an HTML entity such as `&#x27;` would show as
written once its `&` or `#` is escaped).
Line breaks become spaces: one value stays on its line, in its table cell."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|$~<>&])")
_BREAKS = re.compile(r"[\r\n\t\v\f]")


def escape(text) -> str:
    """Any string (file name, label, message) as literal markdown text."""
    return _SPECIAL.sub(r"\\\1", _BREAKS.sub(" ", str(text)))


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
