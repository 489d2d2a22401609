"""The `agelens-sweep` Prefect flow (the logic is in flows/sweep.py)."""

from __future__ import annotations

from prefect import flow

from flows.settings import RunSettings
from flows.sweep import sweep_flow_fn


@flow(name="agelens-sweep", log_prints=True)
def agelens_sweep(settings: list[RunSettings]) -> dict:
    """Several settings of the study, run together and compared (flows/sweep.py)."""
    return sweep_flow_fn(settings)


def with_task_runner(task_runner: str = "thread", dask_address: str | None = None):
    if task_runner == "thread":
        return agelens_sweep
    from prefect_dask import DaskTaskRunner

    runner = DaskTaskRunner(address=dask_address) if dask_address else DaskTaskRunner(
        cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True})
    return agelens_sweep.with_options(task_runner=runner)
