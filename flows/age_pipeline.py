"""The agelens pipeline: one Prefect flow walking the stage graph of `flows/graph.py`.

Each stage is a Prefect task cached by its key: `<out>/<stage>/<key>/.prefect-result`. Before a
stage runs, the flow takes a file lock on its key, so two runs into one `--out` compute each
stage once and the second reads what the first wrote. Stage modules are imported only by the
stages that run, so a fully cached run never imports torch. At the end, every run publishes
its artifacts from the stored outputs, appends a row to the run table and records the data
fingerprint it trained on (the watcher's reference).
"""

from __future__ import annotations

import importlib
import shutil
import sys
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task

from flows import preflight, runs
from flows.codeversion import code_version
from flows.graph import components, key_of, levels, selected
from flows.inputs import DEMO_ROOT, DEMO_STAMP, Inputs, demo_is_current, open_memo
from flows.locks import active_lock, locked, stage_lock
from flows.settings import RunSettings
from flows.status import plan
from tasks.stage import Job, output_path, read_result


def record_key(context, parameters: dict) -> str:
    """Where Prefect keeps a stage's cache record: inside the stage's own folder."""
    job = parameters["job"]
    return f"{job['stage']}/{job['key']}/.prefect-result"


def run_stage(job: dict) -> dict:
    """Run one stage (its module's `run(job)`), unless its folder is already complete."""
    work = Job(**job)
    done = read_result(work.out, work.stage, work.key)  # complete, but Prefect's record was lost
    if done is not None:
        return done
    return importlib.import_module(f"tasks.{work.stage}").run(work)


def stage_task(name: str, out: Path):
    return task(run_stage, name=name, cache_key_fn=record_key, persist_result=True, result_serializer="json",
                result_storage=out)


@task(name="demo")
def make_demo_data(root: str, stamp: dict) -> dict:
    from tasks.demo import DemoSpec, make_demo

    summary = make_demo(Path(root), DemoSpec(**stamp["spec"]), stamp, DEMO_STAMP)
    get_run_logger().info("demo dataset: %d images in %s", summary["images"], root)
    return summary


def demo_data() -> str:
    """The built-in demo's metadata file, generated into data/demo on first use."""
    from tasks.demo import DemoSpec

    root = DEMO_ROOT.resolve()
    stamp = {"spec": asdict(DemoSpec()), "code": code_version("tasks.demo")}
    if not demo_is_current(root, stamp):
        make_demo_data(str(root), stamp)
    return str(root / "celebrity2000_meta.mat")


class Runner:
    """Walks the graph: keys from this run's inputs and upstream results, one lock per key."""

    def __init__(self, settings: RunSettings, out: Path, inputs: Inputs):
        self.settings, self.out, self.inputs = settings, out, inputs
        self.results: dict[str, dict] = {}
        self.states: dict[str, str] = {}

    def job(self, stage) -> Job:
        handles = {name: self.inputs.get(name, self.results, str(self.out)) for name in stage.inputs}
        parts = components(stage, self.settings, self.results, handles)
        values = self.settings.dump()
        return Job(stage=stage.name, key=key_of(parts), out=str(self.out),
                   settings={name: values[name] for name in (*stage.reads, *stage.uses)},
                   upstream={name: self.results[name] for name in stage.needs}, inputs=handles, components=parts)

    def run(self, stages, after_level=None) -> None:
        for level in levels(stages):
            with ExitStack() as held:
                started = []
                for stage in sorted(level, key=lambda s: s.name):  # one lock order for every run
                    job = self.job(stage)
                    held.enter_context(locked(stage_lock(self.out, stage.name, job.key)))
                    for leftover in (self.out / stage.name).glob(f"{job.key}.tmp-*"):  # a killed run's
                        shutil.rmtree(leftover, ignore_errors=True)
                    started.append((stage.name, stage_task(stage.name, self.out).submit(job=asdict(job))))
                for name, future in started:
                    future.wait()
                    self.results[name] = future.result()  # re-raises the stage's own error
                    self.states[name] = future.state.name
            if after_level:
                after_level(self.results)


@flow(name="age-pipeline", log_prints=True)
def age_pipeline(settings: RunSettings = RunSettings()) -> dict:
    """Face-age study on CACD (or the built-in demo): extract -> split -> decode -> train ->
    evaluate | embed | feature maps | attention | explain -> report."""
    log = get_run_logger()
    out = preflight.writable_out(settings.out)
    with locked(active_lock(out), shared=True), open_memo(out) as memo:
        inputs = Inputs(settings.data or demo_data(), settings.images, settings.weights_choice, settings.backbone, memo)
        steps = plan(settings, str(out), inputs)
        will_run = {row["stage"] for row in steps if not row["cached"]}
        for row in steps:
            if not row["cached"] and row["key"]:
                log.info("%s runs: %s", row["stage"], "; ".join(row["reasons"]))
        preflight.check_model_settings(settings, will_run)
        if "train" in will_run:
            inputs.get("weights", {}, str(out))  # missing weights stop the run before any work
        runner = Runner(settings, out, inputs)

        def after_level(results):
            if "extract" in results and "split" not in results:
                preflight.check_classes(settings, results["extract"]["meta"]["classes"], will_run)

        runner.run(selected(settings.until), after_level)
        row = finish(settings, out, inputs, runner)
    log.info("stages: %s", runner.states)
    return {"settings": settings.dump(), "out": str(out), "run": row,
            "stages": {stage.name: described(out, runner.results[stage.name], runner.states[stage.name])
                       for stage in selected(settings.until)}}


def described(out: Path, result: dict, state: str) -> dict:
    """A stage's result for people and --json: its state, key, summary and output files."""
    return {"state": state, "key": result["key"], "summary": result["summary"],
            "outputs": {name: str(output_path(out, result, name)) for name in result["outputs"]}}


def finish(settings: RunSettings, out: Path, inputs: Inputs, runner: Runner) -> dict:
    """Publish this run's artifacts, append it to the run table, record its data fingerprint."""
    from prefect.runtime import flow_run

    from flows.publish import run_report, run_tables
    from tasks.artifacts import publish_run

    results = runner.results
    data = None
    if "split" in results:
        data = runs.fingerprint(inputs, results, out)
    previous = runs.read_runs(out)
    row = runs.make_row(str(flow_run.get_id() or "local"), settings, results, runner.states, data)
    runs.append_run(out, row)
    publish_run(run_tables(out, results, [*previous, row]), run_report(out, results, previous, row))
    if data is not None:
        runs.record_state(settings, {"fingerprint": data, "drawn": row["drawn"], "run_id": row["run_id"],
                                     "time": row["time"]})
    return row


def with_task_runner(task_runner: str = "thread", dask_address: str | None = None):
    """The flow on Prefect's default thread pool, or on Dask: a LocalCluster, or the cluster at
    `dask_address` (then every machine must see `out` at the same path)."""
    if task_runner == "thread":
        return age_pipeline
    from prefect_dask import DaskTaskRunner

    runner = DaskTaskRunner(address=dask_address) if dask_address else DaskTaskRunner(
        cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True})
    return age_pipeline.with_options(task_runner=runner)


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["run", *sys.argv[1:]]))
