"""prefect.yaml against a real local server: the watcher's event starts age-pipeline runs."""

import sys
import time

import pytest

from flows.server import REPO, PrefectServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with PrefectServer(tmp_path_factory.mktemp("prefect-home")) as running:
        yield running


def pipeline_runs(server) -> list[dict]:
    deployment = server.api("GET", "/deployments/name/age-pipeline/age-pipeline")
    return server.api("POST", "/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment["id"]]}},
                                                          "sort": "EXPECTED_START_TIME_ASC"})


def triggered_runs(server) -> list[dict]:
    return [r for r in pipeline_runs(server) if "per_class" in r["parameters"]]


def watch(server, data, out, per_class) -> None:
    code = ("import json, sys; from flows.watch import watch_sample_size; "
            f"print(json.dumps(watch_sample_size(data={str(data)!r}, out={str(out)!r}, per_class={per_class})))")
    server.run(sys.executable, "-c", code)


def wait_for(condition, seconds=90):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(1)
    return False


def test_changed_sample_size_triggers_a_pipeline_run_and_unchanged_does_not(server, small_cacd, tmp_path):
    server.prefect("work-pool", "create", "agelens-process", "--type", "process")
    deployed = server.prefect("--no-prompt", "deploy", "--all")
    assert "age-pipeline/age-pipeline" in deployed.stdout and "watch-sample-size/watch-sample-size" in deployed.stdout
    deployment = server.api("GET", "/deployments/name/age-pipeline/age-pipeline")
    assert deployment["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
    workdir = deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    assert workdir == str(REPO)  # where a process worker runs the flow
    assert triggered_runs(server) == []

    data = small_cacd / "celebrity2000_meta.mat"
    watch(server, data, tmp_path / "out", per_class=5)
    assert wait_for(lambda: len(triggered_runs(server)) == 1), "no run was created for the changed sample size"
    assert int(triggered_runs(server)[0]["parameters"]["per_class"]) == 5

    watch(server, data, tmp_path / "out", per_class=5)  # unchanged: nothing emitted
    events = server.api("POST", "/events/filter", json={"filter": {"event": {"name": ["agelens.sample-size.changed"]}}})
    assert events["total"] == 1
    time.sleep(5)
    assert len(triggered_runs(server)) == 1

    watch(server, data, tmp_path / "out", per_class=7)
    assert wait_for(lambda: len(triggered_runs(server)) == 2)
    assert sorted(int(r["parameters"]["per_class"]) for r in triggered_runs(server)) == [5, 7]
    variable = server.api("GET", "/variables/name/agelens_sample_size")
    assert variable["value"]["per_class"] == 7 and set(variable["value"]["sample_size"].values()) == {7}


def test_serve_uses_the_same_deployments_as_prefect_yaml():
    from flows.deployments import served_deployments

    pipeline, watcher = served_deployments()
    assert (pipeline.name, watcher.name) == ("age-pipeline", "watch-sample-size")
    assert pipeline.schedules[0].schedule.cron == "0 3 * * *"
    trigger = pipeline.triggers[0]
    assert trigger.expect == {"agelens.sample-size.changed"}
    assert trigger.parameters == {"per_class": "{{ event.payload.per_class }}"}
    assert watcher.schedules[0].schedule.interval.total_seconds() == 600
    assert pipeline.parameters["backbone"] == "convnext_narrow"
