"""The run table under `--out`: one row per completed run, what it trained on and reached."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

from agelens.flows.pipeline.graph import BY_NAME
from agelens.flows.service.locks import locked

ROW_FIELDS = {"run_id": str, "time": str, "settings": dict, "stages": dict}
METRICS = ("accuracy", "accuracy_ci", "macro_f1", "within_one", "mae_years", "mae_decades")
log = logging.getLogger("agelens")


def table_path(out: str | Path) -> Path:
    return Path(out) / "runs" / "runs.jsonl"


def _row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict) or not all(isinstance(row.get(k), t) for k, t in ROW_FIELDS.items()):
        return None
    return row


def read_runs(out: str | Path) -> list[dict]:
    """Completed runs, oldest first. A line cut short by a crash, or edited into another shape, is
    skipped with a warning."""
    try:
        lines = table_path(out).read_text(errors="replace").splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as error:
        log.warning("cannot read the run table %s: %s", table_path(out), error.strerror)
        return []
    rows, bad = [], []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            row = _row(line)
            if row is None:
                bad.append(number)
            else:
                rows.append(row)
    # The last line may be a run killed while appending; anything else was damaged.
    if bad and bad != [len(lines)]:
        log.warning("skipped %d damaged line(s) of %s (line %s)", len(bad), table_path(out),
                    ", ".join(map(str, bad[:5])))
    return rows


def append_run(out: str | Path, row: dict) -> None:
    """Append one row; runs finishing at once take turns (lock), so both are recorded."""
    path = table_path(out)
    with locked(path.with_suffix(".lock")):
        with open(path, "a") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def make_row(run_id: str, settings, results: dict[str, dict], states: dict[str, str], data_fingerprint: str | None) -> dict:
    def summary(stage: str):
        return BY_NAME[stage].summary.model_validate(results[stage]["summary"]) if stage in results else None

    split, train, evaluate = summary("split"), summary("train"), summary("evaluate")

    def metric(split_name: str):
        found = getattr(evaluate, split_name, None) if evaluate else None
        return {k: getattr(found, k) for k in METRICS} if found else None

    return {
        "run_id": run_id, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": data_fingerprint, "settings": settings.dump(), "drawn": split.per_class if split else None,
        "train_images": train.train_images if train else None, "val": metric("val"), "test": metric("test"),
        "best_epoch": train.best_epoch if train else None,
        "training_seconds": train.training_seconds if train else None,
        "stages": {name: result["key"] for name, result in results.items()}, "states": states,
    }


def headline(row: dict) -> tuple[str, dict]:
    """The split a run's numbers come from: test, or val (which chose the epoch) without one."""
    return ("test", row["test"]) if row.get("test") else ("val", row.get("val") or {})


def _interval(bounds) -> str | None:
    return f"{bounds[0]:.3f}-{bounds[1]:.3f}" if bounds else None


def table_rows(rows: list[dict], limit: int = 30) -> list[dict]:
    """The run table for people, newest first."""
    out = []
    for r in reversed(rows[-limit:] if limit else []):
        split, m = headline(r)
        out.append({"run": r["run_id"][:8], "time": r["time"], "data": (r.get("fingerprint") or "")[:8],
                    "per class": ", ".join(f"{c} {n}" for c, n in (r.get("drawn") or {}).items()),
                    "train images": r.get("train_images"), "on": split, "accuracy": m.get("accuracy"),
                    "95% interval": _interval(m.get("accuracy_ci")),
                    "macro-F1": m.get("macro_f1"), "within one": m.get("within_one"), "MAE (years)": m.get("mae_years"),
                    "best epoch": r.get("best_epoch"), "training s": r.get("training_seconds")})
    return out


def _drawn(drawn: dict | None) -> str:
    counts = set((drawn or {}).values())
    if len(counts) == 1:
        return f"{counts.pop()} each"
    return ", ".join(f"{c} {n}" for c, n in (drawn or {}).items())


def compact_rows(rows: list[dict]) -> list[dict]:
    """The run table for a terminal, newest first: the settings that tell runs apart, the headline
    metric with its interval, and a rerun that computed nothing folded into the run it repeated."""
    first: dict[tuple, dict] = {}
    shown = []
    for r in rows:
        same = tuple(sorted(r["stages"].items()))
        if set(r.get("states", {}).values()) == {"Cached"} and same in first:
            first[same]["reruns"] += 1
            continue
        s, (split, m) = r["settings"], headline(r)
        ci = m.get("accuracy_ci")
        accuracy = "-" if m.get("accuracy") is None else f"{split} {m['accuracy']:.3f}" + (
            f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        entry = {"run": r["run_id"][:8], "time": r["time"][5:16].replace("T", " "),
                 "data": (r.get("fingerprint") or "")[:8],
                 "drawn": _drawn(r.get("drawn")), "model": f"{s.get('backbone')} {s.get('image_size')}px",
                 "training": f"{s.get('recipe')} {s.get('epochs')}ep lr {s.get('lr')} {s.get('head')}",
                 "accuracy": accuracy,
                 "MAE y": f"{m['mae_years']:.1f}" if m.get("mae_years") is not None else "-", "reruns": 0}
        first.setdefault(same, entry)
        shown.append(entry)
    return list(reversed(shown))
