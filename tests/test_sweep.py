"""`agelens sweep`: a grid or a file of settings, shared stages computed once, trainings run
together, one comparison; cached like any run; on a Dask cluster too."""

import json
from pathlib import Path

import pytest

from agelens.flows.sweep.grid import expand, read_settings_file, varied
from agelens.tasks.core.errors import ConfigError

TINY = {"backbone": "convnext_narrow", "image_size": "32", "weights": "none", "per_class": "20", "until": "compare"}


def test_options_with_commas_are_a_grid_in_order_without_duplicates():
    settings = expand({"lr": "1e-3,3e-4", "epochs": "1,2", "seed": "4", "explain_classes": "10s,60s"})
    assert [(s.lr, s.epochs) for s in settings] == [(1e-3, 1), (1e-3, 2), (3e-4, 1), (3e-4, 2)]
    assert {s.seed for s in settings} == {4} and {tuple(s.explain_classes) for s in settings} == {("10s", "60s")}
    assert varied(settings) == ["epochs", "lr"]
    assert len(expand({"lr": "1e-3,0.001"})) == 1  # the same setting twice runs once
    assert [s.recipe for s in expand({"recipe": "reference,modern"})] == ["reference", "modern"]


def test_a_bad_value_names_its_setting_and_limits_hold(tmp_path):
    with pytest.raises(ConfigError, match=r"setting --epochs 0: --epochs: Input should be greater than or equal to 1"):
        expand({"lr": "1e-3", "epochs": "2,0"})
    with pytest.raises(ConfigError, match="65 settings; at most 64"):
        expand({"seed": ",".join(map(str, range(65)))})
    with pytest.raises(ConfigError, match="an empty value"):
        expand({"lr": "1e-3,,3e-4"})
    with pytest.raises(ConfigError, match="same --out"):
        expand({"out": "a"}, [{"out": "b"}, {"lr": 0.1}])


def test_a_settings_file_of_json_or_yaml(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps([{"lr": 1e-4}, {"lr": 3e-4, "per-class": 40}]))
    (tmp_path / "s.yaml").write_text("settings:\n  - {lr: 0.0001}\n  - {lr: 0.0003, per_class: 40}\n")
    for name in ("s.json", "s.yaml"):
        settings = expand({"epochs": "2,3"}, read_settings_file(str(tmp_path / name)))
        assert [(s.lr, s.per_class, s.epochs) for s in settings] == [
            (1e-4, 200, 2), (1e-4, 200, 3), (3e-4, 40, 2), (3e-4, 40, 3)]
    (tmp_path / "bad.yaml").write_text("- {learning_rate: 1}\n")
    with pytest.raises(ConfigError, match="setting 1: no option learning_rate"):
        read_settings_file(str(tmp_path / "bad.yaml"))
    (tmp_path / "map.yaml").write_text("lr: 1\n")
    with pytest.raises(ConfigError, match="must hold a non-empty list"):
        read_settings_file(str(tmp_path / "map.yaml"))
    with pytest.raises(ConfigError, match="No such file"):
        read_settings_file(str(tmp_path / "missing.yaml"))


def sweep(capsys, *options) -> dict:
    from agelens.flows.cli.main import main

    code = main(["sweep", *options, "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, result
    return result


@pytest.mark.slow
def test_four_settings_share_their_upstream_and_a_rerun_is_cached(prefect_backend, small_cacd, tmp_path, capsys):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from agelens.flows.pipeline.runs import read_runs

    data = ["--data", str(small_cacd / "celebrity2000_meta.mat"), "--out", str(tmp_path / "out")]
    options = [*data, *(f"--{k.replace('_', '-')}={v}" for k, v in TINY.items())]
    first = sweep(capsys, *options, "--epochs", "1,2", "--lr", "1e-3,3e-4")
    assert first["distinct_keys"] == {"extract": 1, "split": 1, "framing": 1, "decode": 1, "train": 4, "calibrate": 4,
                                      "evaluate": 4, "compare": 4}
    # decode was computed once: one stage folder, its result shared by the four runs.
    assert len([p for p in (tmp_path / "out" / "decode").iterdir() if p.is_dir()]) == 1
    assert sorted((r["epochs"], r["lr"]) for r in first["rows"]) == [(1, 3e-4), (1, 1e-3), (2, 3e-4), (2, 1e-3)]
    best = max(first["rows"], key=lambda r: r["accuracy"])
    assert first["best"] == best["setting"] and all(r["error"] is None for r in first["rows"])
    assert all(r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1] for r in first["rows"])
    assert len(read_runs(tmp_path / "out")) == 4  # each setting is a recorded run
    with get_client(sync_client=True) as client:
        table = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["agelens-sweep"])))
        plot = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["agelens-sweep-plot"])))
    assert len(json.loads(table[0].data)) == 4 and "data:image/png;base64," in plot[0].data

    again = sweep(capsys, *options, "--epochs", "1,2,3", "--lr", "1e-3,3e-4")
    trained = [s["train"] for s in again["states"]]
    assert [s for s, r in zip(trained, again["rows"]) if r["epochs"] == 3] == ["Completed", "Completed"]
    assert [s for s, r in zip(trained, again["rows"]) if r["epochs"] < 3] == ["Cached"] * 4  # only the added value ran
    assert {s["decode"] for s in again["states"]} == {"Cached"}
    assert again["computed"]["train"] == 2 and again["distinct_keys"]["train"] == 6  # cached trainings not counted
    assert again["plot"] and Path(again["plot"]).is_file()
    before = {(r["epochs"], r["lr"]): r["accuracy"] for r in first["rows"]}
    assert {(r["epochs"], r["lr"]): r["accuracy"] for r in again["rows"] if r["epochs"] < 3} == before


@pytest.mark.slow
def test_a_sweep_on_a_two_process_dask_cluster(prefect_backend, small_cacd, tmp_path, capsys):
    from distributed import Client, LocalCluster

    data = ["--data", str(small_cacd / "celebrity2000_meta.mat"), "--out", str(tmp_path / "out")]
    options = [*data, *(f"--{k.replace('_', '-')}={v}" for k, v in TINY.items())]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        result = sweep(capsys, *options, "--epochs", "1,2", "--task-runner", "dask", "--dask-address",
                       cluster.scheduler_address)
        with Client(cluster.scheduler_address) as client:
            ran = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
            workers = client.run(lambda: __import__("os").getpid())
    assert len(set(workers.values())) == 2 and ran == ["run_stage"]
    assert result["distinct_keys"]["decode"] == 1 and result["distinct_keys"]["train"] == 2
    assert [s["train"] for s in result["states"]] == ["Completed", "Completed"]
    assert sweep(capsys, *options, "--epochs", "1,2")["states"][1]["train"] == "Cached"  # the same cache, on threads
