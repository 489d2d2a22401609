"""The agelens pipeline: one Prefect flow walking the stage graph (flows/pipeline/graph.py, flows/pipeline/runner.py).

Before any work it checks what can be checked (flows/service/preflight.py); at the end, every run,
cached or not, appends its row to the run table, publishes its report and tables, and records
the data fingerprint it trained on (flows/pipeline/publish.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger

from agelens.flows.service import preflight
from agelens.flows.pipeline.graph import selected
from agelens.flows.pipeline.inputs import Inputs, open_memo
from agelens.flows.service.locks import active_lock, locked
from agelens.flows.service.logs import ONE_LINE, quiet_expected_errors
from agelens.flows.pipeline.publish import finish
from agelens.flows.pipeline.runner import Runner
from agelens.flows.pipeline.settings import RunSettings
from agelens.tasks.core.errors import AgelensError
from agelens.tasks.core.stage import output_path


@flow(name="age-pipeline", log_prints=True)
def age_pipeline(settings: RunSettings = RunSettings()) -> dict:
    """Face-age study on CACD (or the built-in demo): extract -> split -> decode -> train ->
    evaluate | embed | feature maps | attention | explain -> report."""
    from prefect.runtime import deployment, flow_run

    log = get_run_logger()
    if not os.environ.get("AGELENS_DEBUG"):
        quiet_expected_errors()
    try:
        return _study(settings, log, str(flow_run.get_id() or "local"), deployment.name)
    except AgelensError as error:
        log.error("%s%s", ONE_LINE, error)  # the one line a worker's log shows of it
        raise


def _study(settings: RunSettings, log, run_id: str, scope: str | None) -> dict:
    out = preflight.writable_out(settings.out)
    with locked(active_lock(out), shared=True), open_memo(out) as memo:
        inputs = Inputs.of(settings, memo)
        steps, notes = preflight.check_run(settings, out, inputs)
        will_run = {row["stage"] for row in steps if not row["cached"]}
        for row in steps:
            if not row["cached"] and row["key"]:
                log.info("%s runs: %s", row["stage"], "; ".join(row["reasons"]))
        for note in notes:
            log.info(note)
        runner = Runner(settings, out, inputs, log)

        def after_level(results):
            if "extract" in results and "split" not in results:
                preflight.check_classes(settings, results["extract"]["meta"]["classes"], will_run)

        try:
            runner.run(selected(settings.until), after_level)
        except BaseException:
            empty_records_removed(out)
            raise
        row = finish(settings, out, inputs, runner.results, runner.states, run_id, scope)
    log.info("stages: %s", runner.states)
    return {"settings": settings.dump(), "out": str(out), "run": row,
            "stages": {stage.name: described(out, runner.results[stage.name], runner.states[stage.name])
                       for stage in selected(settings.until)}}


def empty_records_removed(out: Path) -> None:
    """Prefect records a failed task's error at the top of the result storage; on a full disk that
    record is an empty file, which nothing can read: it goes."""
    from agelens.flows.service.gc import PREFECT_RECORD

    for path in out.iterdir():
        try:
            if PREFECT_RECORD.match(path.name) and path.is_file() and path.stat().st_size == 0:
                path.unlink()
        except OSError:
            continue


def described(out: Path, result: dict, state: str) -> dict:
    """A stage's result for people and --json: its state, key, summary and output files."""
    return {"state": state, "key": result["key"], "summary": result["summary"],
            "outputs": {name: str(output_path(out, result, name)) for name in result["outputs"]}}


def with_task_runner(task_runner: str = "thread", dask_address: str | None = None):
    """The flow on Prefect's default thread pool, or on Dask: a LocalCluster, or the cluster at
    `dask_address` (then every machine must see `out` at the same path)."""
    return on_task_runner(age_pipeline, task_runner, dask_address)


def on_task_runner(flow_object, task_runner: str = "thread", dask_address: str | None = None):
    if task_runner == "thread":
        return flow_object
    from prefect_dask import DaskTaskRunner

    runner = DaskTaskRunner(address=dask_address) if dask_address else DaskTaskRunner(
        cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True})
    return flow_object.with_options(task_runner=runner)
