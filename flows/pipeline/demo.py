"""The built-in demo data set: drawn faces in CACD's format, generated on first use into `data/demo`
of a checkout (or, for an installed package, the user's cache) and regenerated only when its spec
or code changes."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from agelens.flows.pipeline.codeversion import ROOT, code_version
from agelens.tasks.core.places import cache_dir


def demo_root() -> Path:
    """`data/demo` in a checkout; an installed package is no place to write, so the user's cache."""
    return ROOT / "data" / "demo" if (ROOT / "pyproject.toml").is_file() else cache_dir() / "demo"


DEMO_ROOT = demo_root()
DEMO_STAMP = ".agelens-demo.json"
DEMO_FILE = "celebrity2000_meta.mat"


def demo_is_current(root: Path, stamp: dict) -> bool:
    """True when `root` holds a complete demo made from this spec by this code."""
    try:
        found = json.loads((root / DEMO_STAMP).read_text())
    except (OSError, ValueError):
        return False
    return {k: found.get(k) for k in stamp} == stamp and "summary" in found


def demo_stamp(spec=None) -> dict:
    from agelens.tasks.data.demo import DemoSpec

    return {"spec": asdict(spec or DemoSpec()), "code": code_version("tasks.data.demo")}


def demo_data(root: Path = DEMO_ROOT, spec=None) -> str:
    """The demo's metadata file, generated first when missing or out of date (`spec`: the
    default DemoSpec unless given, for tests)."""
    from prefect import get_run_logger, task

    from agelens.tasks.data.demo import DemoSpec, make_demo

    stamp = demo_stamp(spec)
    if not demo_is_current(root, stamp):
        @task(name="demo")
        def make_demo_data() -> dict:
            summary = make_demo(root, DemoSpec(**stamp["spec"]), stamp, DEMO_STAMP)
            get_run_logger().info("demo dataset: %d images in %s", summary["images"], root)
            return summary

        make_demo_data()
    return str(root / DEMO_FILE)
