"""The `agelens-sweep` Prefect flow (the logic is in flows/sweep/grid.py)."""

from __future__ import annotations

from prefect import flow

from agelens.flows.pipeline.flow import on_task_runner
from agelens.flows.pipeline.settings import RunSettings
from agelens.flows.sweep.grid import sweep_flow_fn


@flow(name="agelens-sweep", log_prints=True)
def agelens_sweep(settings: list[RunSettings]) -> dict:
    """Several settings of the study, run together and compared (flows/sweep/grid.py)."""
    return sweep_flow_fn(settings)


def with_task_runner(task_runner: str = "thread", dask_address: str | None = None):
    return on_task_runner(agelens_sweep, task_runner, dask_address)
