"""`watch-data`: ask for a retraining when what the pipeline would train on has changed.

The watcher runs the pipeline's cached extract and split stages with the pipeline's own
settings and takes the data fingerprint: metadata content, image listing, the drawn sample
and the drawn images' content. Growth below and above the per-class cap both change it. It
compares that with the fingerprint the last *successful* pipeline run with exactly these
settings recorded (a Prefect Variable written by the pipeline's last step), so a failed
retraining is asked for again at the next watch. It emits `agelens.data.changed`, whose
payload carries the settings; the pipeline deployment's trigger passes them on unchanged.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.variables import Variable

from flows import preflight, runs
from flows.age_pipeline import Runner, demo_data
from flows.graph import selected
from flows.inputs import Inputs, open_memo
from flows.locks import active_lock, locked
from flows.settings import RunSettings

EVENT = "agelens.data.changed"


def pipeline_busy(pipeline: str, settings: RunSettings) -> bool:
    """Whether a run of deployment `pipeline` with these settings is running or about to start
    (a nightly run scheduled for later does not count)."""
    from datetime import datetime, timedelta, timezone

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    flow_name, _, deployment = pipeline.partition("/")
    active = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]
    with get_client(sync_client=True) as client:
        found = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=active))))
    soon = datetime.now(timezone.utc) + timedelta(minutes=1)
    wanted = settings.dump()
    return any(isinstance(r.parameters.get("settings"), dict) and RunSettings(**r.parameters["settings"]).dump() == wanted
               and (r.state_type != StateType.SCHEDULED or r.expected_start_time is None or r.expected_start_time <= soon)
               for r in found)


@flow(name="watch-data")
def watch_data(settings: RunSettings = RunSettings(), pipeline: str = "age-pipeline/demo",
               min_interval: float = 60.0) -> dict:
    """Emit `agelens.data.changed` for `pipeline` when the data these settings would train on
    differs from what its last successful run trained on. `min_interval`: seconds during which
    the same request is not repeated (the trigger needs a moment to start the run)."""
    log = get_run_logger()
    out = preflight.writable_out(settings.out)
    with locked(active_lock(out), shared=True), open_memo(out) as memo:
        inputs = Inputs(settings.data or demo_data(), settings.images, settings.weights_choice, settings.backbone, memo)
        runner = Runner(settings, out, inputs)
        runner.run(selected("split"))
        data = runs.fingerprint(inputs, runner.results, out)
    drawn = runner.results["split"]["summary"]["per_class"]
    last = Variable.get(runs.state_variable(settings), default=None)
    report = {"fingerprint": data, "drawn": drawn, "previous": last, "emitted": False}
    if last and last.get("fingerprint") == data:
        log.info("data unchanged since the last successful run (%s): %s", data[:8], drawn)
        return report
    asked = Variable.get(runs.emitted_variable(settings), default=None)
    if asked and asked.get("fingerprint") == data and time.time() - asked.get("time", 0) < min_interval:
        log.info("retraining on data %s was asked for %.0f s ago; waiting for it", data[:8], time.time() - asked["time"])
        return report
    if pipeline_busy(pipeline, settings):
        log.info("a run of %s with these settings is already scheduled or running; not asking again", pipeline)
        return report
    emit_event(event=EVENT, resource={"prefect.resource.id": f"agelens.data.{runs.settings_digest(settings)}",
                                      "prefect.resource.name": settings.data or "demo", "agelens.pipeline": pipeline},
               payload={"settings": settings.dump(), "fingerprint": data, "drawn": drawn,
                        "previous": last and last.get("fingerprint")})
    runs.set_variable(runs.emitted_variable(settings), {"fingerprint": data, "time": time.time()})
    log.info("data changed (%s -> %s), drawn per class %s: asked %s to retrain", (last or {}).get("fingerprint", "none")[:8],
             data[:8], drawn, pipeline)
    return {**report, "emitted": True}
