"""The stage graph: keys from content, settings read and transitive code; never paths or noise; a new
stage is one module and one line of the graph."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agelens.flows.pipeline.codeversion import ROOT, closure, forget
from agelens.flows.pipeline.graph import STAGES, components, content_digest, key_of, stage_code
from agelens.flows.pipeline.settings import RunSettings

UPSTREAM = {"outputs": {"model": {"file": "model.pt", "sha256": "m1"}, "timings": {"file": "timings.csv"}},
            "summary": {"seconds": 12.5}, "meta": {"classes": ["10s", "20s"]}, "key": "k1", "stage": "train"}


def test_every_setting_a_stage_reads_is_a_run_setting():
    fields = set(RunSettings.model_fields)
    for stage in STAGES:
        assert set(stage.reads) <= fields and set(stage.uses) <= fields, stage.name
        assert not set(stage.reads) & {"out", "device", "eval_batch_size", "data", "images"}, stage.name


def test_upstream_content_counts_not_its_key_timings_or_location():
    evaluate = next(s for s in STAGES if s.name == "evaluate")
    same = {name: UPSTREAM for name in evaluate.needs}
    base = key_of(components(evaluate, RunSettings(), same, {}))
    elsewhere = {**UPSTREAM, "key": "k2", "summary": {"seconds": 99.0},
                 "outputs": {**UPSTREAM["outputs"], "timings": {"file": "other.csv"}}}
    assert key_of(components(evaluate, RunSettings(), {**same, "train": elsewhere}, {})) == base
    retrained = {**UPSTREAM, "outputs": {**UPSTREAM["outputs"], "model": {"file": "model.pt", "sha256": "m2"}}}
    assert key_of(components(evaluate, RunSettings(), {**same, "train": retrained}, {})) != base
    # Settings the stage does not read, or that do not change results, are not in its key.
    for change in ({"epochs": 9}, {"eval_batch_size": 7}, {"device": "cpu"}, {"out": "/elsewhere"}):
        assert key_of(components(evaluate, RunSettings(**change), same, {})) == base
    assert content_digest(UPSTREAM) == content_digest({**UPSTREAM, "summary": {}})


def test_inputs_are_keyed_by_content_only():
    extract = STAGES[0]
    one = {"source": {"path": "/a/meta.mat", "sha256": "s"}, "listing": {"path": "/a/CACD2000", "sha256": "l"}}
    moved = {"source": {"path": "/b/meta.mat", "sha256": "s"}, "listing": {"path": "/b/faces", "sha256": "l"}}
    edited = {**one, "listing": {"path": "/a/CACD2000", "sha256": "l2"}}
    key = key_of(components(extract, RunSettings(), {}, one))
    assert key == key_of(components(extract, RunSettings(), {}, moved))
    assert key != key_of(components(extract, RunSettings(), {}, edited))


def _copy_package(tmp_path: Path) -> Path:
    """A copy of the `agelens` package at tmp_path/agelens (importable with tmp_path on PYTHONPATH)."""
    root = tmp_path / "agelens"
    for package in ("tasks", "flows"):
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(ROOT / "__main__.py", root / "__main__.py")
    return root


@pytest.mark.parametrize("module, helper, dependents", [
    ("data/picking", "def first_per_class", {"embed", "featuremaps", "attention", "explain"}),
    ("model/inference", "def normalise",
     {"train", "calibrate", "evaluate", "compare", "embed", "featuremaps", "attention", "explain"}),
    ("reporting/markdown", "def escape", {"report"}),
    ("reporting/tables", "def class_report_rows", {"report"}),
    ("data/sources", "def list_images", {"extract", "framing"}),  # framing finds image files as predict does
    # Labels reach every stage that holds a model, through the age head.
    ("data/labels", "def decade_values",
     {"extract", "train", "calibrate", "evaluate", "compare", "embed", "featuremaps", "attention", "explain"}),
    ("model/calibration", "def fit_temperature", {"calibrate", "evaluate"}),
    # Publishing and the learning curve over runs belong to the flow: no stage reruns for them.
    ("reporting/artifacts", "def publish_run", set()),
    ("reporting/plots/runs", "def learning_curve", set()),
    ("reporting/plots/training", "def training_curves", {"train"}),
    # A stage's presentation (how the CLI, the report and the artifacts show it) reruns only the report.
    ("train", "def describe", {"report"}),
    ("explain", "def report_section", {"report"}),
    ("train", "def run", {"train"}),
])
def test_a_helper_edit_changes_exactly_the_stages_that_import_it(tmp_path, module, helper, dependents):
    """Code versions are computed from imports, transitively: edit a helper in a copy of the
    package and compare every stage's code version before and after."""
    root = _copy_package(tmp_path)
    before = {s.name: stage_code(s, root) for s in STAGES}
    path = root / "tasks" / f"{module}.py"
    source = path.read_text()
    assert helper in source
    path.write_text(source.replace(helper, f"# edited\n{helper}", 1))
    forget()
    after = {s.name: stage_code(s, root) for s in STAGES}
    assert {name for name in before if before[name] != after[name]} == dependents


def test_no_stage_imports_another_stage_and_imports_go_one_way():
    """Stages import helpers, helpers import helpers, flows import tasks: never the other way round."""
    from agelens.flows.pipeline.codeversion import module_file

    stages = {s.module for s in STAGES}
    for stage in STAGES:
        assert not (set(closure(stage.module)) - {stage.module}) & stages, stage.name
    helpers = [f"agelens.tasks.{p.relative_to(ROOT / 'tasks').with_suffix('').as_posix().replace('/', '.')}"
               for p in (ROOT / "tasks").rglob("*.py") if p.parent != ROOT / "tasks" and p.name != "__init__.py"]
    assert len(helpers) > 20 and all(module_file(h, ROOT) for h in helpers)
    for helper in helpers:
        reached = set(closure(helper))
        assert not reached & stages, (helper, reached & stages)
        assert not [m for m in reached if m.startswith("agelens.flows")], helper
    for stage in STAGES:
        assert not [m for m in closure(stage.module) if m.startswith("agelens.flows")], stage.name


TOY = '''"""Stage: the number of drawn images per split (a toy, to show what adding a stage takes)."""

from agelens.tasks.core.stage import Job, Stage, Summary


class ToySummary(Summary):
    images: int
    per_split: dict[str, int]


STAGE = Stage("toy", ToySummary, needs=("split",), reads=("seed",), outputs=("counts",))


def run(job: Job) -> dict:
    import pandas as pd

    manifest = pd.read_parquet(job.path("split", "manifest"))
    with job.output() as out:
        manifest["split"].value_counts().to_csv(out.path("counts.csv"))
        out.add("counts", "counts.csv")
        return out.finish(ToySummary(images=len(manifest), per_split=manifest["split"].value_counts().to_dict()))


def describe(s: ToySummary) -> str:
    return f"toy counted {s.images} images"


def report_section(view) -> list[str]:
    return ["## Toy", f"The toy counted {view.summary.images} drawn images."]
'''

REPORT_OF_TOY = """
import json, sys
from pathlib import Path
from agelens.flows.pipeline.graph import BY_NAME
from agelens.tasks.core.stage import Job
from agelens.tasks.report import study_report
out = Path(sys.argv[1])
result = json.loads(sys.argv[2])
assert "toy" in BY_NAME["report"].needs, BY_NAME["report"].needs
results = {name: json.loads((out / name / stage["key"] / "result.json").read_text())
           for name, stage in result["stages"].items()}
facts = {k: v for r in results.values() for k, v in r["meta"].items()}
job = Job(stage="report", key="k", out=str(out), upstream=results, context=facts)
print(study_report(job))
"""


@pytest.mark.slow  # four CLI processes against a server
def test_a_new_stage_is_one_module_and_one_line_of_the_graph(server, small_cacd, tmp_path):
    """A toy stage added to a copy of the package: one new module, one line in flows/pipeline/graph.py;
    it then runs, is cached, and shows in `agelens status`, the CLI summary and the report."""
    root = _copy_package(tmp_path / "copy")
    (root / "tasks" / "toy.py").write_text(TOY)
    graph = root / "flows" / "pipeline" / "graph.py"
    before = graph.read_text()
    graph.write_text(before.replace('    "split",\n', '    "split",\n    "toy",\n', 1))
    assert len(graph.read_text().splitlines()) == len(before.splitlines()) + 1
    env = {**server.env, "PYTHONPATH": str(root.parent)}
    options = ["--data", str(small_cacd / "celebrity2000_meta.mat"), "--out", str(tmp_path / "o"), "--until", "toy",
               "--per-class", "10"]

    def agelens(*args):
        proc = subprocess.run([sys.executable, "-m", "agelens", *args], cwd=root.parent, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    summary = agelens("run", *options)
    assert re.search(r"^toy +Completed +toy counted 60 images$", summary, re.M), summary
    assert re.search(r"^toy +cached$", agelens("status", *options), re.M)
    result = json.loads(agelens("run", *options, "--json").strip().splitlines()[-1])
    assert result["stages"]["toy"]["state"] == "Cached" and result["stages"]["toy"]["summary"]["images"] == 60
    report = subprocess.run([sys.executable, "-c", REPORT_OF_TOY, str(tmp_path / "o"), json.dumps(result)], cwd=root.parent,
                            env=env, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "## Toy\n\nThe toy counted 60 drawn images." in report.stdout
