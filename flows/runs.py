"""What each completed run trained on and reached: the run table under `--out`, the data
fingerprint the watcher compares, and the per-configuration state kept in Prefect Variables."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from flows.graph import BY_NAME
from flows.locks import locked
from tasks.hashing import sha256_json

# Settings that change what a model learns, apart from how many images it sees: runs that
# agree on these are points of one learning curve.
LEARNING_CURVE_SETTINGS = tuple(dict.fromkeys(
    name for stage in ("split", "decode", "train") for name in BY_NAME[stage].reads if name != "per_class"))


def settings_digest(settings) -> str:
    return sha256_json(settings.dump())[:16]


def state_variable(settings) -> str:
    """The Prefect Variable holding the data fingerprint of the last successful run with
    exactly these settings (so configurations never interfere)."""
    return f"agelens-state-{settings_digest(settings)}"


def emitted_variable(settings) -> str:
    """The Prefect Variable recording the last retraining the watcher asked for."""
    return f"agelens-emitted-{settings_digest(settings)}"


def fingerprint(inputs, results: dict[str, dict], out: str | Path) -> str:
    """What the pipeline would train on: the metadata's content, the image listing, the drawn
    sample (the split manifest) and the content of every drawn image (`inputs`: flows.inputs.Inputs)."""
    handles = {name: inputs.get(name, results, str(out)) for name in ("source", "listing", "images")}
    return sha256_json({"source": handles["source"]["sha256"], "listing": handles["listing"]["sha256"],
                        "sample": results["split"]["outputs"]["manifest"]["sha256"],
                        "images": handles["images"]["sha256"]})[:32]


def table_path(out: str | Path) -> Path:
    return Path(out) / "runs" / "runs.jsonl"


def read_runs(out: str | Path) -> list[dict]:
    """Completed runs, oldest first (lines cut short by a crash are skipped)."""
    try:
        lines = table_path(out).read_text().splitlines()
    except FileNotFoundError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
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
    def metric(split):
        found = results.get("evaluate", {}).get("summary", {}).get(split)
        return {k: found[k] for k in ("accuracy", "macro_f1", "mae_decades")} if found else None

    split, train = results.get("split", {}).get("summary", {}), results.get("train", {}).get("summary", {})
    return {
        "run_id": run_id, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": data_fingerprint, "settings": settings.dump(), "drawn": split.get("per_class"),
        "train_images": train.get("train_images"), "val": metric("val"), "test": metric("test"),
        "best_epoch": train.get("best_epoch"), "training_seconds": train.get("training_seconds"),
        "stages": {name: result["key"] for name, result in results.items()}, "states": states,
    }


def _short(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def since_last(previous: dict | None, row: dict) -> list[str]:
    """Markdown lines: which settings and data counts changed since `previous`, and the metric deltas."""
    if previous is None:
        return ["First recorded run in this output folder."]
    lines = [f"Compared with run {previous['run_id'][:8]} of {previous['time']}:"]
    changed = [f"{name} {_short(previous['settings'].get(name))} → {_short(value)}"
               for name, value in row["settings"].items() if previous["settings"].get(name) != value]
    lines.append("- settings: " + ("; ".join(changed) if changed else "unchanged"))
    before, now = previous.get("drawn") or {}, row.get("drawn") or {}
    counts = [f"{c} {before.get(c, 0)} → {n}" for c, n in now.items() if before.get(c) != n]
    data = "same data" if previous.get("fingerprint") == row.get("fingerprint") else "the data changed"
    lines.append(f"- images drawn per class: {'; '.join(counts) if counts else 'unchanged'} ({data})")
    for split in ("val", "test"):
        if row.get(split) and previous.get(split):
            deltas = [f"{name} {row[split][name]:.3f} ({row[split][name] - previous[split][name]:+.3f})"
                      for name in ("accuracy", "macro_f1", "mae_decades") if row[split][name] is not None
                      and previous[split][name] is not None]
            lines.append(f"- {split}: " + ", ".join(deltas))
    return lines


def learning_points(rows: list[dict], row: dict) -> list[dict]:
    """One point per distinct training set among runs whose settings equal this one's apart
    from the sample size (and whose data lives at the same place)."""
    def group(r):
        s = r["settings"]
        return [s.get("data"), s.get("images"), s.get("weights"), *(s.get(n) for n in LEARNING_CURVE_SETTINGS)]

    points = {}
    for r in [*rows, row]:
        if group(r) == group(row) and r.get("val") and r.get("train_images"):
            points[(r["train_images"], r["fingerprint"])] = {"train_images": r["train_images"],
                                                             "val_accuracy": r["val"]["accuracy"]}
    return list(points.values())


def table_rows(rows: list[dict], limit: int = 30) -> list[dict]:
    """The run table for people, newest first."""
    out = []
    for r in reversed(rows[-limit:]):
        val = r.get("val") or {}
        out.append({"run": r["run_id"][:8], "time": r["time"], "data": (r.get("fingerprint") or "")[:8],
                    "per class": ", ".join(f"{c} {n}" for c, n in (r.get("drawn") or {}).items()),
                    "train images": r.get("train_images"), "val accuracy": val.get("accuracy"),
                    "macro-F1": val.get("macro_f1"), "MAE (decades)": val.get("mae_decades"),
                    "best epoch": r.get("best_epoch"), "training s": r.get("training_seconds")})
    return out


def set_variable(name: str, value: dict) -> None:
    """Prefect's Variable.set(overwrite=True) reads, then creates or updates: two runs finishing at
    once can both try to create. The loser retries, and then updates."""
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.variables import Variable

    for attempt in range(3):
        try:
            Variable.set(name, value, overwrite=True)
            return
        except ObjectAlreadyExists:
            if attempt == 2:
                raise


def record_state(settings, state: dict) -> None:
    """What a successful run trained on, for the watcher; written only when the data changed
    (a read costs the server less than a write, and a cached rerun changes nothing)."""
    from prefect.variables import Variable

    name = state_variable(settings)
    current = Variable.get(name, default=None)
    if not current or current.get("fingerprint") != state["fingerprint"]:
        set_variable(name, state)
