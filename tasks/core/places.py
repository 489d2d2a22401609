"""Where agelens keeps what is not the user's: its cache (downloaded model files, the demo data
of an installed package), `$XDG_CACHE_HOME/agelens`, else `~/.cache/agelens`."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "agelens"
