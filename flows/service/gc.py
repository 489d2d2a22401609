"""`agelens gc`: remove what no recent completed run used.

Kept: every stage folder that one of the last N completed runs (of any settings) used.
Removed: other stage folders, leftovers of killed runs (`*.tmp-*` folders, training
checkpoints `*.partial` of stages no kept run used), lock files of removed keys, and Prefect's
records of failed tasks (stray files at the top of the output folder). gc runs only while no
run is using the folder: runs hold a shared lock on it, gc an exclusive one.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from agelens.flows.pipeline.graph import STAGE_NAMES
from agelens.flows.service.locks import Busy, NoLock, active_lock, locked
from agelens.flows.pipeline.runs import read_runs
from agelens.tasks.core.errors import AgelensError

PREFECT_RECORD = re.compile(r"^[0-9a-f]{32}$")


def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def candidates(out: Path, keep_last: int) -> tuple[list[Path], int]:
    """(paths to remove, number of runs whose folders are kept)."""
    recorded = read_runs(out)
    rows = recorded[-keep_last:] if keep_last > 0 else []
    keep = {(stage, key) for row in rows for stage, key in row.get("stages", {}).items()}
    doomed = []
    for stage in STAGE_NAMES:
        folder = out / stage
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            key = entry.name.split(".")[0]
            leftover = ".tmp-" in entry.name
            if leftover or (stage, key) not in keep:
                doomed.append(entry)
    if not recorded:  # nothing recorded (an older folder?): keep stage folders, remove only leftovers
        doomed = [p for p in doomed if ".tmp-" in p.name]
    doomed += [p for p in out.iterdir() if p.is_file() and PREFECT_RECORD.match(p.name)]
    return sorted(doomed), len(rows)


def collect(out: str | Path, keep_last: int = 5, dry_run: bool = False) -> dict:
    out = Path(out).expanduser().resolve()
    if not out.is_dir():
        raise AgelensError(f"--out {out} is not a folder")
    if not active_lock(out).parent.is_dir():  # every run makes it first: what has none is not ours to clean
        raise AgelensError(f"--out {out} is not an agelens output folder (it has no {active_lock(out).parent.name}/): "
                           "gc removes nothing there")
    try:
        with locked(active_lock(out), wait=False):
            doomed, kept_runs = candidates(out, keep_last)
            sizes = {p: _size(p) for p in doomed}
            if not dry_run:
                for path in doomed:
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
    except Busy:
        raise AgelensError(f"a run is using {out}; gc removes nothing while runs are active (try again later)") from None
    except (OSError, NoLock) as error:  # the lock cannot even be created: a read-only folder
        if not dry_run:
            reason = error.strerror if isinstance(error, OSError) else "no lock can be taken there"
            raise AgelensError(f"--out {out} cannot be written ({reason}): gc removes nothing") from None
        doomed, kept_runs = candidates(out, keep_last)
        sizes = {p: _size(p) for p in doomed}
    return {"out": str(out), "kept_runs": kept_runs, "dry_run": dry_run, "removed": [str(p) for p in doomed],
            "bytes": sum(sizes.values())}


def describe(report: dict) -> str:
    verb = "would remove" if report["dry_run"] else "removed"
    mb = report["bytes"] / 1e6
    lines = [f"{verb} {len(report['removed'])} items, {mb:,.1f} MB, from {report['out']} "
             f"(kept what the last {report['kept_runs']} recorded runs used)"]
    lines += [f"  {p}" for p in report["removed"][:20]]
    if len(report["removed"]) > 20:
        lines.append(f"  ... and {len(report['removed']) - 20} more")
    return "\n".join(lines)
