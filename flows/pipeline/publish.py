"""The end of every run, cached or not: its row in the run table, its report (the study report
plus what is particular to this run: what changed since the last run, the learning curve over
runs, the run table) as `<out>/report.md` and a Prefect artifact, every stage's tables as
artifacts, and the data fingerprint it trained on for the watcher. Milliseconds, no torch."""

from __future__ import annotations

import json
from pathlib import Path

from agelens.flows.pipeline import runs

from agelens.flows.service import state
from agelens.flows.pipeline.graph import BY_NAME, STAGES, context
from agelens.tasks.core.hashing import sha256_json
from agelens.tasks.core.stage import View, atomic_write_bytes, output_path
from agelens.tasks.reporting.markdown import escape, image, table

REPORT_FILE = "report.md"  # the latest run's full report, at the top of --out
# Settings that change what a model learns, apart from how many images it sees: runs that
# agree on these are points of one learning curve.
LEARNING_CURVE_SETTINGS = tuple(dict.fromkeys(
    name for stage in ("split", "decode", "train") for name in BY_NAME[stage].reads if name != "per_class"))


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
                      for name in ("accuracy", "macro_f1", "within_one", "mae_years") if row[split].get(name) is not None
                      and previous[split].get(name) is not None]
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
        split, m = runs.headline(r)
        if group(r) == group(row) and m and r.get("train_images"):
            points[(r["train_images"], r["fingerprint"])] = {"train_images": r["train_images"], "split": split,
                                                             "accuracy": m["accuracy"],
                                                             "accuracy_ci": m.get("accuracy_ci")}
    return list(points.values())


def learning_curve(out: Path, points: list[dict], chance: float | None = None) -> Path:
    """The learning-curve plot of these points, drawn once per distinct set of points."""
    path = out / "runs" / f"learning-curve-{sha256_json([sorted(points, key=json.dumps), chance])[:16]}.png"
    if not path.exists():
        from agelens.tasks.reporting.plots import base, runs as run_plots

        tmp = path.with_name(f".{path.name}.partial.png")
        base.save(run_plots.learning_curve(points, chance), tmp)
        atomic_write_bytes(path, tmp.read_bytes())
        tmp.unlink()
    return path


def views(out: Path, results: dict[str, dict]) -> list[View]:
    return [View(out, results[s.name], context(s, results)) for s in STAGES if s.name in results]


def run_tables(out: Path, results: dict[str, dict], rows: list[dict]) -> list:
    """Every table the stages of this run offer, and the run table."""
    from agelens.tasks.reporting.artifacts import RUNS
    from agelens.tasks.reporting.tables import Table

    found = []
    for view in views(out, results):
        offer = BY_NAME[view.stage].presentation("tables")
        if offer is not None:
            found += offer(view)
    return [*found, Table(RUNS, runs.table_rows(rows), "Completed runs in this output folder, newest first")]


def run_report(out: Path, results: dict[str, dict], previous: list[dict], row: dict) -> str:
    """The study report (when the run reached it) plus what is particular to this run."""
    if "report" in results:
        parts = [output_path(out, results["report"], "report").read_text().rstrip()]
    else:
        parts = [f"# agelens run (until {escape(row['settings']['until'])})",
                 table([{"stage": name, "state": row["states"][name], "key": key, "summary": BY_NAME[name].describe(
                     results[name]["summary"])} for name, key in row["stages"].items()])]
    parts += ["## Since the last run", "\n".join(escape(line) if not line.startswith("- ") else "- " + escape(line[2:])
                                                  for line in since_last(previous[-1] if previous else None, row))]
    points = learning_points(previous, row)
    if len(points) >= 2:
        chance = 1 / len(row["drawn"]) if row.get("drawn") else None
        parts += ["## Learning curve", image(learning_curve(out, points, chance), "accuracy against training images",
                                             560)]
    parts += ["## Runs in this output folder (newest first)", table(runs.table_rows([*previous, row], limit=10))]
    return "\n\n".join(parts) + "\n"


def finish(settings, out: Path, inputs, results: dict[str, dict], states: dict[str, str], run_id: str,
           scope: str | None = None, publish: bool = True) -> dict:
    """Append this run to the run table, apply its champion decision, write and publish its report
    and tables, record the data fingerprint it trained on. Returns the run's row (with the report's
    path). A sweep's runs (`publish=False`) are recorded and judged, and publish one comparison."""
    from agelens.flows.registry import models
    from agelens.tasks.reporting.artifacts import DECISION, publish_markdown, publish_run

    data = state.fingerprint(inputs, results, out) if "split" in results else None
    previous = runs.read_runs(out)
    row = runs.make_row(run_id, settings, results, states, data)
    runs.append_run(out, row)
    facts = {k: v for result in results.values() for k, v in result.get("meta", {}).items()}
    decision = models.settle(out, settings, run_id, results, facts, inputs.memo.file) if "compare" in results else None
    if not publish:
        return {**row, "report": None, "decision": decision}
    report = run_report(out, results, previous, row)
    atomic_write_bytes(out / REPORT_FILE, report.encode())
    publish_run(run_tables(out, results, [*previous, row]), report, scope)
    if decision is not None:
        publish_markdown(DECISION, decision_markdown(decision), "Whether this run's model became the champion", scope)
    if data is not None:
        state.record_state(settings, {"fingerprint": data, "drawn": row["drawn"], "run_id": row["run_id"],
                                      "time": row["time"]})
    return {**row, "report": str(out / REPORT_FILE), "decision": decision}


def decision_markdown(decision: dict) -> str:
    verdict = {"promote": "Promoted", "keep": "Kept the champion", "same": "Champion"}[decision["decision"]]
    return (f"# {verdict}\n\n{escape(decision['why'])}.\n\nConfiguration {escape(decision['config'])}: "
            "`agelens models` lists its champion and every rejected model.\n")
