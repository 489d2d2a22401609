"""`agelens status`: for each stage, whether a run with these settings would be cached, and if
not, why: which setting, code file, input or upstream stage changed since the last run.
It computes the keys without running anything (no torch, no Prefect server)."""

from __future__ import annotations

import json
from pathlib import Path

from agelens.flows.pipeline.graph import components, key_of, selected
from agelens.flows.pipeline.runs import read_runs
from agelens.tasks.core.errors import AgelensError
from agelens.tasks.core.stage import PARAMETERS, damage, read_result, stage_folder


def _previous_parts(out: str, stage: str) -> dict | None:
    """The key components of this stage in the latest recorded run that ran it."""
    for row in reversed(read_runs(out)):
        key = row.get("stages", {}).get(stage)
        if key:
            try:
                return json.loads((stage_folder(out, stage, key) / PARAMETERS).read_text())
            except (OSError, ValueError):
                return None
    return None


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def reasons(parts: dict, before: dict | None) -> list[str]:
    """Why a stage with key components `parts` is not the one recorded in `before`."""
    if before is None:
        return ["no earlier run of this stage recorded in this output folder"]
    why = [f"setting {name}: {_short(before['settings'].get(name))} -> {_short(value)}"
           for name, value in parts["settings"].items() if before["settings"].get(name) != value]
    changed_code = sorted(f for f in {*parts["code"], *before["code"]} if parts["code"].get(f) != before["code"].get(f))
    if changed_code:
        why.append("code changed: " + ", ".join(changed_code))
    why += [f"input {name} changed (content)" for name, digest in parts["inputs"].items()
            if before["inputs"].get(name) != digest]
    why += [f"output of {name} changed" for name, u in parts["upstream"].items()
            if before["upstream"].get(name, {}).get("content") != u["content"]]
    return why or ["its output folder was removed"]


def plan(settings, out: str, inputs, hash_file=None) -> list[dict]:
    """[{stage, key (None while an upstream stage must run first), cached, reasons}] for the
    stages up to `until`, computed from the folders under `out` and the inputs' content. A
    folder whose outputs are missing or changed is not cached (`hash_file`: the memo's)."""
    known: dict[str, dict] = {}
    rows = []
    for stage in selected(settings.until):
        waiting = [name for name in stage.needs if name not in known]
        if waiting:
            rows.append({"stage": stage.name, "key": None, "cached": False,
                         "reasons": [f"upstream {', '.join(waiting)} must run first"]})
            continue
        try:
            handles = {name: inputs.get(name, known, out) for name in stage.inputs}
        except AgelensError as error:
            rows.append({"stage": stage.name, "key": None, "cached": False, "reasons": [f"cannot run: {error}"],
                         "error": str(error)})
            continue
        parts = components(stage, settings, known, handles)
        key = key_of(parts)
        problem = damage(out, stage.name, key, **({"hash_file": hash_file} if hash_file else {}))
        result = None if problem else read_result(out, stage.name, key)
        if result is not None:
            known[stage.name] = result
            rows.append({"stage": stage.name, "key": key, "cached": True, "reasons": []})
        else:
            rows.append({"stage": stage.name, "key": key, "cached": False,
                         "reasons": [f"damaged: {problem}"] if problem else reasons(parts, _previous_parts(out, stage.name))})
    return rows


def describe(rows: list[dict], out: str | Path) -> str:
    lines = []
    for row in rows:
        state = "cached" if row["cached"] else "would run"
        lines.append(f"{row['stage']:<12} {state:<10} {'; '.join(row['reasons'])}".rstrip())
    lines.append(f"(output folder {out})")
    return "\n".join(lines)
