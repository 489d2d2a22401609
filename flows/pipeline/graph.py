"""The stage graph: the stage modules in order. Each declares itself (`STAGE` in
tasks/<name>.py: what it needs, the settings it reads, its inputs and outputs, its summary), so
adding a stage is one module and one line here.

The flow walks the graph, `--until` slices it, `agelens status` computes its keys without
running anything, and the CLI summary, preflight, the report and the run table read the
declarations. A stage's key hashes
  * its code: its module and every project module that imports, transitively
    (flows/pipeline/codeversion.py);
  * the settings it `reads` (by name; `uses` are settings that do not change its results);
  * the content digests of the stages it `needs`, and of its external `inputs` (data files).
Never paths, timings, devices or the run id.
"""

from __future__ import annotations

import dataclasses

from agelens.flows.pipeline.codeversion import ROOT, code_version
from agelens.tasks.core.hashing import sha256_json
from agelens.tasks.core.stage import EARLIER, Stage, spec

STAGE_MODULES = (
    "extract",
    "split",
    "framing",
    "decode",
    "train",
    "calibrate",
    "evaluate",
    "compare",
    "embed",
    "featuremaps",
    "attention",
    "explain",
    "report",
)


def build(modules: tuple[str, ...]) -> tuple[Stage, ...]:
    """The declarations of `modules`, in order, with EARLIER needs resolved."""
    stages: list[Stage] = []
    for name in modules:
        stage = spec(name)
        if stage.needs == EARLIER:
            stage = dataclasses.replace(stage, needs=tuple(s.name for s in stages))
        missing = [n for n in stage.needs if n not in {s.name for s in stages}]
        if missing:
            raise RuntimeError(f"stage {name} needs {missing}, which do not come before it in the graph")
        stages.append(stage)
    return tuple(stages)


STAGES = build(STAGE_MODULES)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
BY_NAME = {stage.name: stage for stage in STAGES}


def selected(until: str) -> list[Stage]:
    """The stages up to and including `until`, in order."""
    return list(STAGES[: STAGE_NAMES.index(until) + 1])


def levels(stages: list[Stage]) -> list[list[Stage]]:
    """Stages grouped so that each group needs only earlier groups (run concurrently within)."""
    depth: dict[str, int] = {}
    for stage in stages:
        depth[stage.name] = 1 + max((depth[n] for n in stage.needs), default=-1)
    return [[s for s in stages if depth[s.name] == d] for d in range(max(depth.values()) + 1)]


def ancestors(stage: Stage, stages=STAGES) -> list[str]:
    """Every stage `stage` depends on, directly or not, in graph order."""
    by_name = {s.name: s for s in stages}
    found, todo = set(), list(stage.needs)
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo.extend(by_name[name].needs)
    return [s.name for s in stages if s.name in found]


def context(stage: Stage, results: dict[str, dict], stages=STAGES) -> dict:
    """The facts (`meta`) of every stage `stage` depends on, merged in graph order. Each fact
    derives from keyed content upstream, so it needs no place in the key of its own."""
    facts: dict = {}
    for name in ancestors(stage, stages):
        facts.update(results[name].get("meta", {}))
    return facts


def content_digest(result: dict) -> str:
    """What downstream keys see of a stage's result: its keyed outputs' hashes and its meta."""
    keyed = {name: o["sha256"] for name, o in result["outputs"].items() if "sha256" in o}
    return sha256_json({"outputs": keyed, "meta": result.get("meta", {})})


def stage_code(stage: Stage, root=ROOT) -> dict[str, str]:
    """A stage's code version; a stage that presents others counts their presentation too."""
    presents = tuple(f"agelens.tasks.{name}" for name in stage.needs) if stage.presents else ()
    return code_version(stage.module, root, presents)


def components(stage: Stage, settings, upstream: dict[str, dict], inputs: dict[str, dict], root=ROOT) -> dict:
    """Everything a stage's key is made from, readable (recorded as its parameters.json)."""
    values = settings.dump()
    return {
        "stage": stage.name,
        "code": stage_code(stage, root),
        "settings": {name: values[name] for name in stage.reads},
        "upstream": {name: {"key": upstream[name]["key"], "content": content_digest(upstream[name])}
                     for name in stage.needs},
        "inputs": {name: inputs[name]["sha256"] for name in stage.inputs},
    }


def key_of(parts: dict) -> str:
    keyed = {**parts, "upstream": {name: u["content"] for name, u in parts["upstream"].items()}}
    return sha256_json(keyed)[:24]
