"""Retraining that follows the data, against a real Prefect server with a process worker:
`agelens deploy` on a CSV dataset, the watcher's event, the triggered run, retries, configurations
side by side, and `agelens serve` beside deployed deployments."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from agelens.flows.pipeline.settings import RunSettings
from tests.harness import REPO

TINY = ["--until", "train", "--backbone", "convnext_narrow", "--image-size", "32", "--epochs", "2", "--weights", "none"]


@pytest.fixture(scope="module")
def dataset(small_cacd_master, tmp_path_factory) -> dict:
    """The CACD fixture as images + CSV; `grow(n)` rewrites the CSV with n images per decade."""
    import scipy.io

    root = tmp_path_factory.mktemp("csv-data")
    shutil.copytree(small_cacd_master / "CACD2000", root / "faces")
    meta = scipy.io.loadmat(small_cacd_master / "celebrity2000_meta.mat")["celebrityImageData"][0, 0]
    table = pd.DataFrame({"path": [f"faces/{n[0][0]}" for n in meta["name"]], "age": meta["age"].ravel().astype(int),
                          "identity": meta["identity"].ravel().astype(int)})
    table["decade"] = table["age"].clip(upper=100) // 10

    def grow(per_decade: int) -> None:
        table.groupby("decade").head(per_decade).drop(columns="decade").to_csv(root / "labels.csv", index=False)

    return {"csv": root / "labels.csv", "faces": root / "faces", "grow": grow, "root": root}


def agelens(server, *args) -> subprocess.CompletedProcess:
    return server.run(str(Path(sys.executable).with_name("agelens")), *args)


def deployment(server, name: str) -> dict:
    return server.api("GET", f"/deployments/name/{name}")


def flow_runs(server, name: str) -> list[dict]:
    """Runs of a deployment other than those its schedule created (the nightly run)."""
    found = server.api("POST", "/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment(server, name)["id"]]}},
                                                           "sort": "EXPECTED_START_TIME_ASC"})
    return [r for r in found if not r["auto_scheduled"]]


def wait_for(condition, seconds=240, what="condition"):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def finished(server, run_id: str) -> dict:
    return wait_for(lambda: (r := server.api("GET", f"/flow_runs/{run_id}"))["state_type"] in
                    ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") and r, what=f"flow run {run_id}")


def watch(server, name: str, **parameters) -> dict:
    """Run the watcher deployment once (through the worker) and return its finished flow run."""
    run = server.api("POST", f"/deployments/{deployment(server, name)['id']}/create_flow_run",
                     json={"parameters": parameters})
    done = finished(server, run["id"])
    assert done["state_type"] == "COMPLETED", done["state"]
    return done


def emitted(server) -> list[dict]:
    return server.api("POST", "/events/filter", json={"filter": {"event": {"name": ["agelens.data.changed"]}},
                                                       "limit": 50})["events"]


def triggered(server, name: str, count: int) -> list[dict]:
    """Wait until `name` has `count` runs and the newest has finished; return them all."""
    runs = wait_for(lambda: len(r := flow_runs(server, name)) >= count and r, what=f"run {count} of {name}")
    finished(server, runs[-1]["id"])
    return flow_runs(server, name)


def run_table(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "runs" / "runs.jsonl").read_text().splitlines()]


def test_deploy_settles_everything_before_any_run(prefect_backend, server, dataset, tmp_path, monkeypatch, capsys):
    from agelens.flows.cli.main import main

    dataset["grow"](21)
    assert main(["deploy", "--data", str(tmp_path / "no.csv")]) == 1
    assert capsys.readouterr().err.strip() == f"agelens: error: metadata not found: {tmp_path / 'no.csv'}"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    assert main(["deploy", "--data", str(dataset["csv"]), "--backbone", "resnet18", "--name", "offline"]) == 1
    err = capsys.readouterr().err
    assert "ImageNet weights for resnet18 are not cached" in err and err.count("\n") == 1
    names = [d["name"] for d in server.api("POST", "/deployments/filter", json={})]
    assert "offline" not in names


@pytest.mark.slow
def test_growth_below_the_cap_retrains_on_the_grown_data(server, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("grow-out")
    dataset["grow"](21)  # 21 images per decade on disk, 20 drawn
    agelens(server, "deploy", "--data", str(dataset["csv"]), "--out", str(out), "--per-class", "20", "--name", "grow", *TINY)
    pipeline, watcher = deployment(server, "age-pipeline/grow"), deployment(server, "watch-data/grow")
    assert pipeline["parameters"]["settings"] == watcher["parameters"]["settings"]
    assert pipeline["parameters"]["settings"]["data"] == str(dataset["csv"])
    assert watcher["parameters"]["pipeline"] == "age-pipeline/grow"
    with server.worker("agelens-process"):
        first_watch = watch(server, "watch-data/grow")
        runs = triggered(server, "age-pipeline/grow", 1)
        assert runs[0]["state_type"] == "COMPLETED", runs[0]["state"]
        # The triggered run's parameters are exactly the watcher's.
        assert runs[0]["parameters"] == {"settings": first_watch["parameters"]["settings"]}

        watch(server, "watch-data/grow")  # nothing changed: nothing emitted, no run
        time.sleep(3)
        assert len(emitted(server)) == 1 and len(flow_runs(server, "age-pipeline/grow")) == 1

        dataset["grow"](24)  # more images, still 20 drawn per decade: a different sample
        watch(server, "watch-data/grow")
        runs = triggered(server, "age-pipeline/grow", 2)
        assert runs[1]["state_type"] == "COMPLETED", runs[1]["state"]
    rows = run_table(out)
    assert len(rows) == 2 and rows[0]["fingerprint"] != rows[1]["fingerprint"]
    assert rows[1]["drawn"] == rows[0]["drawn"] == {f"{d}0s": 20 for d in range(1, 7)}
    assert rows[1]["states"]["train"] == "Completed"  # trained on the grown data
    event = emitted(server)[0]
    assert event["payload"]["fingerprint"] == rows[1]["fingerprint"]
    # Artifacts of this deployment's runs have keys of their own, apart from other configurations'.
    reports = server.api("POST", "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [runs[1]["id"]]}}})
    assert "agelens-grow-run-report" in {a["key"] for a in reports}
    assert "agelens-run-report" not in {a["key"] for a in reports}


@pytest.mark.slow
def test_a_failing_retraining_is_asked_for_again_then_given_up_until_the_data_changes(server, dataset,
                                                                                       tmp_path_factory):
    """Every image unreadable: each retraining fails. The watcher sees the failed run (it does not
    wait for it), asks again, gives up after max_attempts and says so in an artifact; the worker's
    log shows the expected error as one line; fixed data is retrained at once."""
    out = tmp_path_factory.mktemp("retry-out")
    dataset["grow"](21)
    agelens(server, "deploy", "--data", str(dataset["csv"]), "--out", str(out), "--per-class", "20", "--name", "retry",
            *TINY[:1], "decode", *TINY[2:])
    saved = dataset["root"] / "faces-saved"
    shutil.copytree(dataset["faces"], saved)
    try:
        for image in dataset["faces"].iterdir():
            image.write_bytes(b"broken")
        with server.worker("agelens-process"):
            for attempt in (1, 2, 3):
                watch(server, "watch-data/retry", max_attempts=3)  # no waiting for a run that failed
                assert triggered(server, "age-pipeline/retry", attempt)[-1]["state_type"] == "FAILED"
            watch(server, "watch-data/retry", max_attempts=3)
            time.sleep(3)
            assert len(flow_runs(server, "age-pipeline/retry")) == 3  # given up
            failing = server.api("POST", "/artifacts/filter", json={"artifacts": {"key": {"any_": [
                "agelens-retry-retraining"]}}})
            assert failing and "3 attempts" in failing[0]["data"] and "could be decoded" in failing[0]["data"]
            shutil.rmtree(dataset["faces"])
            shutil.copytree(saved, dataset["faces"])  # fixed: the data changed, so it is asked for again
            watch(server, "watch-data/retry", max_attempts=3)
            assert triggered(server, "age-pipeline/retry", 4)[-1]["state_type"] == "COMPLETED"
            watch(server, "watch-data/retry", max_attempts=3)  # retrained: quiet again
            time.sleep(3)
            assert len(flow_runs(server, "age-pipeline/retry")) == 4
        log = (server.home / "worker-agelens-process.log").read_text()
        assert log.count("agelens: error: no image of the sample could be decoded") == 3
        assert "Traceback" not in log and "DataError:" not in log
    finally:
        shutil.rmtree(dataset["faces"])
        shutil.copytree(saved, dataset["faces"])
        shutil.rmtree(saved)


@pytest.mark.slow
def test_two_watcher_configurations_do_not_interfere(server, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("configs-out")
    dataset["grow"](21)
    for name, per_class in (("ten", "10"), ("twelve", "12")):
        agelens(server, "deploy", "--data", str(dataset["csv"]), "--out", str(out), "--per-class", per_class,
                "--name", name, *TINY)
    with server.worker("agelens-process"):
        watch(server, "watch-data/ten")
        assert triggered(server, "age-pipeline/ten", 1)[0]["state_type"] == "COMPLETED"
        watch(server, "watch-data/twelve")
        assert triggered(server, "age-pipeline/twelve", 1)[0]["state_type"] == "COMPLETED"
        for name in ("ten", "twelve", "ten"):  # each has its own state: no flip-flopping
            watch(server, f"watch-data/{name}")
        time.sleep(3)
        assert len(flow_runs(server, "age-pipeline/ten")) == len(flow_runs(server, "age-pipeline/twelve")) == 1
    assert sorted(r["drawn"]["10s"] for r in run_table(out)) == [10, 12]


@pytest.mark.slow
def test_serve_beside_deployed_deployments(server, dataset, tmp_path_factory):
    """`agelens serve` registers its own deployments (named `served`): a watcher run on it works,
    and stopping it pauses only those, never the worker's."""
    out = tmp_path_factory.mktemp("serve-out")
    dataset["grow"](21)
    agelens(server, "deploy", "--data", str(dataset["csv"]), "--out", str(out), "--name", "beside", *TINY)
    serve = subprocess.Popen([str(Path(sys.executable).with_name("agelens")), "serve", "--data", str(dataset["csv"]),
                              "--out", str(out), *TINY], cwd=REPO, env=server.env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: sum(d["name"] == "served" for d in server.api("POST", "/deployments/filter", json={})) >= 3,
                 what="the three served deployments")
        served = watch(server, "watch-data/served")
        assert served["parameters"]["pipeline"] == "age-pipeline/served"
        assert triggered(server, "age-pipeline/served", 1)[0]["state_type"] == "COMPLETED"
    finally:
        serve.terminate()
        serve.wait(60)
    assert deployment(server, "watch-data/served")["paused"] and deployment(server, "age-pipeline/served")["paused"]
    assert not deployment(server, "watch-data/beside")["paused"] and not deployment(server, "age-pipeline/beside")["paused"]
    assert flow_runs(server, "age-pipeline/beside") == []  # the served watcher triggered only its own pipeline


def test_prefect_yaml_deploys_the_demo_pair():
    from agelens.flows.service.deployments import served_deployments, specs

    pipeline, watcher, predict = specs(None, None)
    assert (pipeline["name"], watcher["name"]) == ("demo", "demo")
    assert pipeline["parameters"]["settings"] == watcher["parameters"]["settings"] == {"preset": "demo"}
    assert watcher["parameters"]["pipeline"] == "age-pipeline/demo"
    assert pipeline["triggers"][0]["match"]["agelens.pipeline"] == "age-pipeline/demo"
    assert pipeline["triggers"][0]["parameters"] == {"settings": "{{ event.payload.settings }}"}
    raw = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert [d["entrypoint"] for d in raw["deployments"]] == [
        "flows/pipeline/flow.py:age_pipeline", "flows/service/watch.py:watch_data", "flows/predict/flow.py:predict_folder"]
    assert predict["parameters"] == {"settings": {"preset": "demo"}, "folder": "data/demo/CACD2000", "detect": False}
    # On a user's data the folder to score is named per run, not the demo's.
    assert specs(RunSettings(data="/d"), "mine")[2]["parameters"] == {"settings": RunSettings(data="/d").dump()}
    served = served_deployments()
    assert [d.name for d in served] == ["served", "served", "served"]
    assert served[0].schedules[0].schedule.cron == "0 3 * * *"
    assert served[1].schedules[0].schedule.interval.total_seconds() == 600
