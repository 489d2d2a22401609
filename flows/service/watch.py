"""`watch-data`: ask for a retraining when what the pipeline would train on has changed.

The watcher runs the pipeline's cached extract and split stages with the pipeline's own
settings and takes the data fingerprint: metadata content, image listing, the drawn sample
and the drawn images' content. Growth below and above the per-class cap both change it. It
compares that with the fingerprint the last *successful* pipeline run with exactly these
settings recorded (a Prefect Variable written by the pipeline's last step). When they differ it
emits `agelens.data.changed`, whose payload carries the settings; the pipeline deployment's
trigger passes them on unchanged.

It looks at the runs it asked for: while one is scheduled or running it waits; when one failed
it asks again at the next watch, up to `max_attempts` times for the same data. Then it stops
asking and publishes a "retraining failing since ..., last error ..." artifact, until the data
changes again.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone

from prefect import flow, get_run_logger
from prefect.events import emit_event

from agelens.flows.service import preflight, state
from agelens.flows.pipeline.graph import selected
from agelens.flows.pipeline.inputs import Inputs, open_memo
from agelens.flows.service.locks import active_lock, locked
from agelens.flows.pipeline.runner import Runner
from agelens.flows.pipeline.settings import RunSettings

EVENT = "agelens.data.changed"
ACTIVE = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING")
FAILED = ("FAILED", "CRASHED", "CANCELLED")


def pipeline_runs(pipeline: str, settings: RunSettings, since: float) -> list:
    """Runs of deployment `pipeline` with these settings created at or after `since` (a Unix
    time), newest first; a nightly run scheduled for later does not count."""
    from datetime import timedelta

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    flow_name, _, deployment = pipeline.partition("/")
    with get_client(sync_client=True) as client:
        found = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
            flow_run_filter=FlowRunFilter(expected_start_time=FlowRunFilterExpectedStartTime(
                after_=datetime.fromtimestamp(since - 5, timezone.utc))),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC)
    soon = datetime.now(timezone.utc) + timedelta(minutes=1)
    wanted = settings.dump()
    return [r for r in found
            if isinstance(r.parameters.get("settings"), dict) and RunSettings(**r.parameters["settings"]).dump() == wanted
            and not (r.state_type == StateType.SCHEDULED and r.expected_start_time and r.expected_start_time > soon)]


def failure_of(run) -> str:
    """What a failed run said, without Prefect's wrapping ("Flow run encountered an exception: X: ...")."""
    message = (run.state.message if run.state else None) or run.state_type.value
    return re.sub(r"^Flow run encountered an exception: (\w+Error: )?", "", message)


def failing_report(asked: dict, pipeline: str) -> str:
    from agelens.tasks.reporting.markdown import escape

    return "\n\n".join([
        "# Retraining failing",
        f"The data changed (fingerprint {escape(asked['fingerprint'][:8])}), and every retraining of "
        f"{escape(pipeline)} asked for since {escape(asked['since'])} failed: {asked['attempts']} attempts. "
        "The watcher stops asking until the data changes again (or run the pipeline by hand).",
        f"Last error: {escape(asked.get('last_error') or 'unknown')}",
    ]) + "\n"


@flow(name="watch-data")
def watch_data(settings: RunSettings = RunSettings(), pipeline: str = "age-pipeline/demo",
               min_interval: float = 60.0, max_attempts: int = 3) -> dict:
    """Emit `agelens.data.changed` for `pipeline` when the data these settings would train on
    differs from what its last successful run trained on. `min_interval`: seconds to wait for the
    trigger to start an asked-for run; `max_attempts`: failed retrainings on the same data
    before the watcher stops asking."""
    from prefect.runtime import deployment

    from agelens.tasks.reporting.artifacts import RETRAINING, publish_markdown

    log = get_run_logger()
    out = preflight.writable_out(settings.out)
    with locked(active_lock(out), shared=True), open_memo(out) as memo:
        inputs = Inputs.of(settings, memo)
        runner = Runner(settings, out, inputs)
        runner.run(selected("split"))
        data = state.fingerprint(inputs, runner.results, out)
    drawn = runner.results["split"]["summary"]["per_class"]
    last = state.get_variable(state.state_variable(settings))
    report = {"fingerprint": data, "drawn": drawn, "previous": last, "emitted": False}
    if last and last.get("fingerprint") == data:
        log.info("data unchanged since the last successful run (%s): %s", data[:8], drawn)
        return report
    asked = state.get_variable(state.emitted_variable(settings))
    if not asked or asked.get("fingerprint") != data:
        asked = {"fingerprint": data, "attempts": 0, "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    else:
        found = pipeline_runs(pipeline, settings, asked["time"])
        if any(r.state_type.value in ACTIVE for r in found):
            log.info("a run of %s with these settings is scheduled or running; waiting for it", pipeline)
            return report
        failed = [r for r in found if r.state_type.value in FAILED]
        if not found and time.time() - asked["time"] < min_interval:
            log.info("retraining on data %s was asked for %.0f s ago; waiting for it to start", data[:8],
                     time.time() - asked["time"])
            return report
        if failed:
            asked["last_error"] = failure_of(failed[0])
        if asked["attempts"] >= max_attempts:
            log.warning("retraining on data %s failed %d times since %s; not asking again until the data changes "
                        "(last error: %s)", data[:8], asked["attempts"], asked["since"], asked.get("last_error"))
            publish_markdown(RETRAINING, failing_report(asked, pipeline), "Retraining failing",
                             scope=deployment.name)
            return {**report, "failing": asked}
    emit_event(event=EVENT, resource={"prefect.resource.id": f"agelens.data.{state.settings_digest(settings)}",
                                      "prefect.resource.name": settings.data or "demo", "agelens.pipeline": pipeline},
               payload={"settings": settings.dump(), "fingerprint": data, "drawn": drawn,
                        "previous": last and last.get("fingerprint")})
    asked = {**asked, "attempts": asked["attempts"] + 1, "time": time.time()}
    state.set_variable(state.emitted_variable(settings), asked)
    log.info("data changed (%s -> %s), drawn per class %s: asked %s to retrain (attempt %d)",
             (last or {}).get("fingerprint", "none")[:8], data[:8], drawn, pipeline, asked["attempts"])
    return {**report, "emitted": True}
