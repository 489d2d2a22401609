"""Deployments: `prefect.yaml` is their one declaration (schedules, trigger, descriptions).

`prefect deploy --all` deploys it as written: the demo, named `demo`. `agelens deploy` deploys
the same two on the user's data under a name of their choosing, both with the same settings;
`agelens serve` serves them from one process under the name `served`. A watcher only triggers
its own pipeline (the event carries the pipeline's name), so these coexist on one server.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from agelens.flows.pipeline.settings import RunSettings
from agelens.tasks.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]  # the checkout, or the installed package (prefect.yaml is in both)
PREFECT_YAML = REPO / "prefect.yaml"
PIPELINE_ENTRYPOINT = "flows/pipeline/flow.py:age_pipeline"
WATCH_ENTRYPOINT = "flows/service/watch.py:watch_data"
PIPELINE_FLOW = "age-pipeline"


def specs(settings: RunSettings | None, name: str | None, spec_path: Path = PREFECT_YAML) -> list[dict]:
    """prefect.yaml's deployments (the pipeline, its watcher, batch prediction), renamed to `name`
    and given `settings` (None keeps the file's own), with the watcher pointed at its pipeline
    and the trigger at the watcher."""
    entries = copy.deepcopy(yaml.safe_load(spec_path.read_text())["deployments"])
    pipeline_name = name or next(e["name"] for e in entries if e["entrypoint"] == PIPELINE_ENTRYPOINT)
    for entry in entries:
        entry["name"] = name or entry["name"]
        if settings is not None:
            entry["parameters"]["settings"] = settings.dump()
        if entry["entrypoint"] == PIPELINE_ENTRYPOINT:
            for trigger in entry.get("triggers", []):
                trigger["match"]["agelens.pipeline"] = f"{PIPELINE_FLOW}/{pipeline_name}"
        elif entry["entrypoint"] == WATCH_ENTRYPOINT:
            entry["parameters"]["pipeline"] = f"{PIPELINE_FLOW}/{pipeline_name}"
        elif settings is not None:
            # The demo's folder of drawn faces means nothing on other data: the photos to score are
            # named when the run is asked for (--param folder=...), and found by detection.
            entry["parameters"] = {"settings": entry["parameters"]["settings"]}
    return entries


def _schedules(entry: dict) -> list:
    from prefect.schedules import Cron, Interval

    return [Cron(s["cron"], timezone=s.get("timezone")) if "cron" in s else Interval(s["interval"])
            for s in entry.get("schedules", [])]


def _triggers(entry: dict) -> list:
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    return [DeploymentEventTrigger(**{k: v for k, v in t.items() if k != "type"}) for t in entry.get("triggers", [])]


def load_flow(entrypoint: str):
    import importlib

    path, name = entrypoint.split(":")
    return getattr(importlib.import_module("agelens." + path.removesuffix(".py").replace("/", ".")), name)


def served_deployments(settings: RunSettings | None = None, name: str = "served") -> list:
    """RunnerDeployments served from this process (no code storage needed)."""
    return [load_flow(e["entrypoint"]).to_deployment(
        name=e["name"], description=e.get("description"), parameters=e["parameters"], schedules=_schedules(e),
        triggers=_triggers(e)) for e in specs(settings, name)]


def settle(settings: RunSettings) -> RunSettings:
    """Settings for a deployment: paths absolute (a worker runs elsewhere), the data readable
    and the weights on disk now, rather than an error at 03:00."""
    from agelens.flows.pipeline.inputs import Inputs
    from agelens.tasks.core.hashing import HashMemo

    def absolute(path: str | None) -> str | None:
        return str(Path(path).expanduser().resolve()) if path else path

    settled = settings.model_copy(update={"data": absolute(settings.data), "images": absolute(settings.images),
                                          "out": absolute(settings.out)})
    if settled.data is not None:
        inputs = Inputs.of(settled, HashMemo(None))
        inputs.located  # noqa: B018 - raises a DataError naming a missing file or folder
        if settled.runs("train"):
            inputs.weights  # noqa: B018 - raises a DataError naming missing weights
    return settled


def ensure_pool(name: str) -> bool:
    """Create the process work pool `name` if it does not exist; True when created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return True


def deploy(settings: RunSettings, name: str, pool: str) -> list[str]:
    """Create or update the three deployments under `name` with the same settings; their names."""
    from prefect.deployments.runner import RunnerDeployment
    from prefect.runner.storage import LocalStorage

    if name == "served":
        raise ConfigError("--name served is used by `agelens serve`; choose another name")
    settled = settle(settings)
    ensure_pool(pool)
    names = []
    for entry in specs(settled, name):
        deployment = RunnerDeployment.from_storage(
            LocalStorage(str(REPO)), entry["entrypoint"], name=entry["name"], description=entry.get("description"),
            parameters=entry["parameters"], schedules=_schedules(entry), triggers=_triggers(entry),
            work_pool_name=pool)
        deployment.apply(work_pool_name=pool)
        names.append(f"{deployment.flow_name}/{deployment.name}")
    return names


def serve_all(settings: RunSettings | None) -> None:
    from prefect import serve

    serve(*served_deployments(settle(settings) if settings else None))
