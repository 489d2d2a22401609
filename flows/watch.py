"""`watch-sample-size`: emit an event when the sample the pipeline would draw changes.

The sample size is what `split` would draw per class: min(per_class, images available)
for each decade of the configured data. The last value seen is kept in a Prefect
Variable; the event `agelens.sample-size.changed` (payload: per_class, sample_size,
previous) is emitted only when the new value differs. The `age-pipeline` deployment's
trigger turns that event into a run with the new `per_class`.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.variables import Variable

from flows.age_pipeline import StageRunner, extract_stage
from flows.config import RunConfig
from flows.inputs import open_memo

EVENT = "agelens.sample-size.changed"
RESOURCE = "agelens.sample-size"
VARIABLE = "agelens_sample_size"


def sample_size(per_class_available: dict[str, int], per_class: int) -> dict[str, int]:
    return {label: min(per_class, n) for label, n in per_class_available.items()}


@flow(name="watch-sample-size")
def watch_sample_size(data: str | None = None, images: str | None = None, per_class: int = 200,
                      out: str = "artifacts", variable: str = VARIABLE) -> dict:
    config = RunConfig(data=data, images=images, per_class=per_class, out=str(Path(out).resolve()), until="extract")
    with open_memo(config.out) as memo:
        metadata = extract_stage(config, StageRunner(config.out), memo)
    size = sample_size(metadata["summary"]["per_class"], per_class)
    current = {"data": data, "per_class": per_class, "sample_size": size}
    previous = Variable.get(variable, default=None)
    changed = previous != current
    log = get_run_logger()
    if changed:
        emit_event(event=EVENT, resource={"prefect.resource.id": RESOURCE, "prefect.resource.name": data or "demo"},
                   payload={**current, "previous": previous})
        Variable.set(variable, current, overwrite=True)
        log.info("sample size changed to %s (was %s): emitted %s", size, previous and previous["sample_size"], EVENT)
    else:
        log.info("sample size unchanged: %s", size)
    return {"changed": changed, **current}
