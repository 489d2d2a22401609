"""A run's tables and report, assembled from the stored outputs (milliseconds, no torch): what
every run publishes, cached stages included."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from flows import runs
from tasks.hashing import sha256_json
from tasks.markdown import escape, image, table
from tasks.stage import output_path


def _number(text: str):
    try:
        return int(text) if text.lstrip("-").isdigit() else float(text)
    except ValueError:
        return {"True": True, "False": False}.get(text, text)


def run_tables(out: Path, results: dict[str, dict], rows: list[dict]) -> dict:
    tables: dict = {"runs": runs.table_rows(rows)}
    if "extract" in results:
        tables["extract"] = results["extract"]["summary"]
    if "split" in results:
        tables["split"] = results["split"]["summary"]
    if "train" in results:
        with open(output_path(out, results["train"], "history")) as handle:
            tables["history"] = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    if "evaluate" in results:
        tables["metrics"] = json.loads(output_path(out, results["evaluate"], "metrics").read_text())
        tables["classes"] = results["evaluate"]["meta"]["classes"]
    if "explain" in results:
        tables["faithfulness"] = results["explain"]["summary"]["faithfulness"]
        if "randomisation" in results["explain"]["summary"]:
            tables["randomisation"] = results["explain"]["summary"]["randomisation"]
    return tables


def learning_curve(out: Path, points: list[dict]) -> Path:
    """The learning-curve plot of these points, drawn once per distinct set of points."""
    path = out / "runs" / f"learning-curve-{sha256_json(sorted(points, key=json.dumps))[:16]}.png"
    if not path.exists():
        from tasks.plots import base, runs as run_plots
        from tasks.stage import atomic_write_bytes

        tmp = path.with_name(f".{path.name}.partial.png")
        base.save(run_plots.learning_curve(points), tmp)
        atomic_write_bytes(path, tmp.read_bytes())
        tmp.unlink()
    return path


def run_report(out: Path, results: dict[str, dict], previous: list[dict], row: dict) -> str:
    """The study report (when the run reached it) plus what is particular to this run: what
    changed since the last run, the learning curve over runs, the run table."""
    if "report" in results:
        parts = [output_path(out, results["report"], "report").read_text().rstrip()]
    else:
        parts = [f"# agelens run (until {escape(row['settings']['until'])})",
                 table([{"stage": name, "state": row["states"][name], "key": key} for name, key in row["stages"].items()])]
    parts += ["## Since the last run", "\n".join(escape(line) if not line.startswith("- ") else "- " + escape(line[2:])
                                                  for line in runs.since_last(previous[-1] if previous else None, row))]
    points = runs.learning_points(previous, row)
    if len(points) >= 2:
        parts += ["## Learning curve", image(learning_curve(out, points), "val accuracy against training images", 560)]
    parts += ["## Runs in this output folder (newest first)", table(runs.table_rows([*previous, row], limit=10))]
    return "\n\n".join(parts) + "\n"
