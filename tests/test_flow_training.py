"""Train and everything after it inside the flow: it learns, reruns only what a change touches,
and concurrent stages write exactly what a serial run writes."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from agelens.flows.pipeline.flow import age_pipeline
from agelens.flows.pipeline.runner import Runner, run_stage
from agelens.flows.pipeline.graph import BY_NAME, selected
from agelens.flows.pipeline.inputs import Inputs, open_memo
from agelens.flows.pipeline.settings import RunSettings
from tests.conftest import TINY_TRAINING


def states(result):
    return {name: stage["state"] for name, stage in result["stages"].items()}


EXPLAIN = dict(feature_images=1, explain_images=2, explain_classes="10s,60s", attention_images=3, faithfulness_steps=2,
               embed_images=60, tsne_perplexity=10.0)
UPSTREAM = {"extract": "Cached", "split": "Cached", "framing": "Cached", "decode": "Cached", "train": "Cached",
            "calibrate": "Cached"}


@pytest.fixture(scope="module")
def run(prefect_backend, learnable_cacd, tmp_path_factory):
    """The pipeline on one output folder, so later tests reuse the trained model."""
    out = tmp_path_factory.mktemp("trained")

    def run_flow(until="evaluate", **changes):
        settings = RunSettings(data=str(learnable_cacd / "celebrity2000_meta.mat"), out=str(out), until=until,
                               **{**TINY_TRAINING, **EXPLAIN, **changes})
        result = age_pipeline(settings=settings)
        result["settings_object"] = settings
        return result

    run_flow.out = out
    return run_flow


def test_tiny_model_learns_and_caching_follows_the_settings(run):
    first = run()
    assert set(states(first).values()) == {"Completed"}
    summary = first["stages"]["evaluate"]["summary"]
    evaluation, test = summary["val"], summary["test"]
    # Chance is 1/6; over seeds 0-4 this configuration reached 0.49-0.66 on val (measured).
    assert evaluation["accuracy"] > 0.40, evaluation
    assert evaluation["mae_decades"] < 1.0
    # The test split: other people, never seen in training or in choosing the epoch.
    split = pd.read_parquet(first["stages"]["split"]["outputs"]["manifest"])
    assert test["images"] == (split["split"] == "test").sum() > 0
    assert set(split.loc[split["split"] == "test", "identity"]).isdisjoint(split.loc[split["split"] != "test", "identity"])
    assert test["accuracy_ci"][0] <= test["accuracy"] <= test["accuracy_ci"][1]
    train = first["stages"]["train"]
    history = pd.read_csv(train["outputs"]["history"])
    assert len(history) == 10 and history["kept"].sum() == 1
    assert history.loc[history["kept"], "val_loss"].iloc[0] == history["val_loss"].min()
    assert train["summary"]["best_epoch"] == int(history.loc[history["kept"], "epoch"].iloc[0])
    assert Path(train["outputs"]["curves"]).stat().st_size > 10_000  # drawn by train
    predictions = pd.read_parquet(first["stages"]["evaluate"]["outputs"]["predictions"])
    assert predictions["split"].value_counts().to_dict() == {"val": evaluation["images"], "test": test["images"]}
    probs = predictions.filter(like="prob_")
    assert list(probs.columns) == [f"prob_{d}0s" for d in range(1, 7)]
    assert ((probs.sum(axis=1) - 1).abs() < 1e-4).all()

    assert set(states(run()).values()) == {"Cached"}
    # A changed training setting retrains (cheaply here: one batch per epoch) and re-evaluates.
    assert states(run(max_steps=1)) == {**UPSTREAM, "train": "Completed", "calibrate": "Completed",
                                        "evaluate": "Completed"}
    # Noise stays out of keys: batch size of inference, the device.
    assert set(states(run(eval_batch_size=7, device="cpu")).values()) == {"Cached"}


def test_a_retraining_with_identical_weights_leaves_everything_downstream_cached(run):
    before = run()
    retrained = run(max_steps=1000)  # a new training setting that does not change what is trained
    assert states(retrained) == {**UPSTREAM, "train": "Completed", "evaluate": "Cached"}  # calibrate too
    assert retrained["stages"]["train"]["key"] != before["stages"]["train"]["key"]
    assert retrained["stages"]["evaluate"]["key"] == before["stages"]["evaluate"]["key"]


def test_embedding_feature_maps_attention_and_explanations(run):
    run()
    result = run(until="explain")
    assert states(result) == {**UPSTREAM, "evaluate": "Cached", "compare": "Completed", "embed": "Completed",
                              "featuremaps": "Completed", "attention": "Completed", "explain": "Completed"}
    embed = result["stages"]["embed"]
    coords = pd.read_parquet(embed["outputs"]["coordinates"])
    assert embed["summary"]["feature_dim"] == 192  # penultimate, not the 6 logits
    assert set(coords["split"]) == {"train", "val"} and len(coords) == embed["summary"]["images"]
    assert coords[["pca_x", "pca_y", "tsne_x", "tsne_y"]].notna().all().all()

    maps_root = Path(result["stages"]["featuremaps"]["outputs"]["feature_maps"])
    for decade in ("10s", "20s", "30s", "40s", "50s", "60s"):
        for layer in ("features.0", "features.5", "features.-1"):
            assert sorted(p.name for p in (maps_root / decade / layer).iterdir()) == \
                ["feature_map_0.png"]

    attention = np.load(result["stages"]["attention"]["outputs"]["maps"])
    assert sorted(k for k in attention.files if k.startswith("heat_")) == [f"heat_{d}0s" for d in range(1, 7)]
    assert attention["heat_10s"].shape == (32, 32) and 0 <= attention["heat_10s"].min() <= attention["heat_10s"].max() <= 1

    explain = result["stages"]["explain"]
    strips = Path(explain["outputs"]["explanations"])
    for decade in ("10s", "60s"):
        assert sorted(p.name for p in (strips / decade).iterdir()) == \
            ["maps_0.npz", "maps_1.npz", "strip_0.png", "strip_1.png"]
    assert Path(explain["outputs"]["cam_methods"]).stat().st_size > 10_000
    raw = np.load(strips / "60s" / "maps_0.npz")
    assert raw["grad_cam"].shape == (32, 32) and raw["guided_backprop"].shape == (3, 32, 32)
    faith = pd.read_csv(explain["outputs"]["faithfulness"])
    methods = ["grad_cam", "hirescam", "grad_cam_plus_plus", "xgrad_cam", "layer_cam", "guided_backprop",
               "guided_grad_cam", "random"]
    assert list(dict.fromkeys(faith["method"])) == methods and set(faith["class"]) == {"10s", "60s"}
    assert (faith["images"] == 2).all()  # every method scored on the same two images per class
    # The maps differ between methods (a CAM layer of 1x1 made them all one blob, scored alike).
    assert faith.groupby("class")["deletion_auc"].nunique().min() >= 4
    steps = pd.read_csv(explain["outputs"]["randomisation"])
    assert list(dict.fromkeys(steps["reinitialised"])) == ["classifier", "features.7+features.6", "features.5+features.4",
                                                           "features.3+features.2", "features.1+features.0"]
    # With the classifier re-initialised the maps have enough cells to rank (at a 1x1 CAM layer none
    # had): every method has a defined mean. A re-initialised classifier can leave one image's Grad-CAM
    # all zero after its ReLU (and so guided Grad-CAM); such maps are reported as undefined, not scored.
    first = steps[steps["step"] == 1].set_index("method")
    assert len(first) == 7 and first["mean"].notna().all()
    assert (first.loc[["xgrad_cam", "layer_cam", "guided_backprop"], "undefined"] == 0).all()
    assert (first["undefined"] <= 1).all()
    logit = pd.read_csv(explain["outputs"]["random_logit"])
    assert list(logit["method"]) == methods[:-1]
    assert set(explain["summary"]["seconds"]) >= {"guided_backprop", "faithfulness (deletion + insertion)",
                                                  "cascading randomisation", "random-logit test"}

    assert result["stages"]["compare"]["summary"]["decision"] == "promote"  # the configuration's first model
    # The champion is now this very model, judged as it was: the same run again is all cached.
    again = run(until="explain")
    assert set(states(again).values()) == {"Cached"}
    assert again["stages"]["compare"]["summary"]["decision"] == "promote"
    changed = run(until="explain", explain_images=1)
    assert {k: v for k, v in states(changed).items() if v != "Cached"} == {"explain": "Completed"}


CONCURRENT = ("embed", "featuremaps", "attention", "explain")


def test_concurrent_stages_write_what_a_serial_run_writes(run):
    """embed, featuremaps, attention and explain run on threads at once in the flow: their outputs
    (plots included) must equal those of the same stages run one after another."""
    first = run(until="explain")
    assert all(first["stages"][s]["state"] in ("Completed", "Cached") for s in CONCURRENT)
    keyed = {s: _outputs(run.out, s, first["stages"][s]["key"]) for s in CONCURRENT}
    settings = first["settings_object"]
    # Serially, in this process, without Prefect.
    with open_memo(run.out) as memo:
        runner = Runner(settings, run.out, Inputs.of(settings, memo))
        for stage in selected("train"):
            runner.results[stage.name] = json.loads((run.out / stage.name / first["stages"][stage.name]["key"]
                                                     / "result.json").read_text())
        for stage in CONCURRENT:
            job = runner.job(BY_NAME[stage])
            shutil.rmtree(job.folder)
            assert run_stage(job.__dict__)["outputs"] == keyed[stage], stage


def _outputs(out: Path, stage: str, key: str) -> dict:
    return json.loads((out / stage / key / "result.json").read_text())["outputs"]


def test_corrupt_image_is_excluded_when_first_decoded(prefect_backend, small_cacd, tmp_path):
    victim = sorted((small_cacd / "CACD2000").iterdir())[0]
    victim.write_bytes(b"\xff\xd8 this is not a jpeg")
    result = age_pipeline(settings=RunSettings(data=str(small_cacd / "celebrity2000_meta.mat"), out=str(tmp_path / "a"),
                                               until="decode", per_class="all", image_size=32))
    decode = result["stages"]["decode"]["summary"]
    assert decode["undecodable"] == 1 and decode["undecodable_examples"] == [victim.name]
    assert decode["images"] == result["stages"]["split"]["summary"]["images"] - 1
    assert victim.read_bytes() == b"\xff\xd8 this is not a jpeg"  # the user's file is left alone


def test_every_run_publishes_its_report_and_tables_even_when_cached(run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    run(until="report")
    result = run(until="report")  # every stage cached
    assert set(states(result).values()) == {"Cached"}
    flow_run_id = result["run"]["run_id"]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_key = {a.key: a for a in found}
    assert {"agelens-run-report", "agelens-extract-summary", "agelens-split-counts", "agelens-training-history",
            "agelens-classification-report-val", "agelens-confusion-matrix-val", "agelens-faithfulness",
            "agelens-randomisation", "agelens-runs"} <= set(by_key)
    report = by_key["agelens-run-report"].data
    study = Path(result["stages"]["report"]["outputs"]["report"]).read_text()
    assert report.startswith(study.rstrip()) and "## Since the last run" in report
    assert Path(result["run"]["report"]).read_text() == report  # the file has what the UI shows
    assert "## Runs in this output folder (newest first)" in report
    # curves, heatmap, PCA, t-SNE, attention, 4 strips, faithfulness, randomisation
    assert report.count("data:image/png;base64,") >= 11
    drawn = result["stages"]["split"]["summary"]["per_class"]
    assert "Drawn per class: " + ", ".join(f"{c} {n}" for c, n in drawn.items()) in study
    rows = json.loads(by_key["agelens-training-history"].data)
    assert {"epoch", "train_loss", "val_loss", "val_acc", "kept"} <= set(rows[0]) and sum(r["kept"] for r in rows) == 1
    runs_table = json.loads(by_key["agelens-runs"].data)
    assert runs_table[0]["run"] == flow_run_id[:8]


@pytest.mark.slow
def test_independent_stages_run_on_a_dask_cluster(run, learnable_cacd):
    from distributed import Client, LocalCluster

    from agelens.flows.pipeline.flow import with_task_runner

    run()  # the trained model, cached
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        flow = with_task_runner("dask", cluster.scheduler_address)
        # Settings no other test uses, so the independent stages run (on the cluster).
        settings = RunSettings(data=str(learnable_cacd / "celebrity2000_meta.mat"), out=str(run.out), until="explain",
                               **{**TINY_TRAINING, **EXPLAIN, "explain_images": 3, "feature_images": 2,
                                  "tsne_perplexity": 8.0, "attention_images": 3})
        result = flow(settings=settings)
        with Client(cluster.scheduler_address) as client:
            ran = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert [states(result)[s] for s in ("embed", "featuremaps", "explain")] == ["Completed"] * 3
    assert states(result)["train"] == "Cached", states(result)
    assert ran == ["run_stage"], ran  # every stage's work went through the cluster's scheduler


def _model_digest(out: Path, result: dict) -> str:
    return _outputs(out, "train", result["stages"]["train"]["key"])["model"]["sha256"]


def test_a_worse_retraining_keeps_the_champion_and_predict_uses_it(run, learnable_cacd, capsys, tmp_path):
    """Against the real server: the champion only improves. A deliberately worse retraining (one
    batch) is rejected and named so; `agelens models` shows both; `predict` uses the champion;
    `promote` overrides by hand; the better model then wins back on the same test images."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from agelens.flows.cli.main import main

    good = run(until="compare")
    good_digest = _model_digest(run.out, good)
    assert good["stages"]["compare"]["summary"]["decision"] in ("promote", "same")
    worse = run(until="compare", epochs=1, max_steps=1)
    compare = worse["stages"]["compare"]["summary"]
    assert compare["decision"] == "keep", compare
    assert compare["challenger"]["accuracy"] < compare["champion"]["accuracy"]
    # The champion was scored again on exactly the images the challenger was scored on.
    assert compare["images"] == worse["stages"]["evaluate"]["summary"]["test"]["images"]
    assert compare["champion"]["accuracy"] == pytest.approx(good["stages"]["evaluate"]["summary"]["test"]["accuracy"])
    assert worse["run"]["decision"]["decision"] == "keep"
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[worse["run"]["run_id"]])))
    decision = next(a for a in found if a.key.endswith("model-decision"))
    assert decision.data.startswith("# Kept the champion") and "both now on the same" in decision.data

    assert main(["models", "--out", str(run.out), "--json"]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert entry["champion"]["model_digest"] == good_digest
    rejected = [d for d in entry["decisions"] if d["decision"] == "keep"]
    assert rejected[-1]["model_digest"] == _model_digest(run.out, worse)
    assert main(["models", "--out", str(run.out)]) == 0
    listing = capsys.readouterr().out
    # The champion is named by the run that promoted it (an earlier run of the same model, here).
    assert f"champion  run {entry['champion']['run_id'][:8]}" in listing
    assert f"rejected  run {worse['run']['run_id'][:8]}" in listing

    # predict: the champion's calibrated probabilities, equal to what evaluate wrote for the same images.
    predictions = pd.read_parquet(good["stages"]["evaluate"]["outputs"]["predictions"]).head(5)
    files = [str(learnable_cacd / "CACD2000" / p) for p in predictions["path"]]
    assert main(["predict", *files, "--no-detect", "--models", str(run.out), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["skipped"] == [] and [r["file"] for r in scored["faces"]] == files
    assert {r["model"] for r in scored["faces"]} == {good_digest[:16]}
    mine = np.array([[r[f"prob_{d}0s"] for d in range(1, 7)] for r in scored["faces"]])
    np.testing.assert_allclose(mine, predictions.filter(like="prob_").to_numpy(), atol=2e-4)
    assert [r["decade"] for r in scored["faces"]] == list(predictions["predicted"])
    # The `predict` flow (the deployment's): the same rows, a table file and an artifact.
    from agelens.flows.predict.flow import predict_folder

    folder = tmp_path / "photos"
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder)
    (folder / "notes.txt").write_text("not a photo")
    batch = predict_folder(folder=str(folder), settings=good["settings_object"], detect=False)
    assert (batch["faces"], batch["skipped"]) == (5, 1)
    table = pd.read_parquet(batch["table"]).sort_values("file")
    np.testing.assert_allclose(table.filter(like="prob_").to_numpy(), mine[np.argsort([Path(f).name for f in files])],
                               atol=1e-6)
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["agelens-predictions"])))
    assert len(json.loads(found[0].data)) == 5

    # By hand the worse model becomes champion; the good one, compared again, wins it back.
    assert main(["promote", worse["run"]["run_id"][:8], "--out", str(run.out)]) == 0
    assert "is now the champion" in capsys.readouterr().out
    back = run(until="compare")
    assert states(back)["train"] == "Cached" and back["stages"]["compare"]["summary"]["decision"] == "promote"
    assert json.loads((run.out / "models" / entry["config"] / "champion.json").read_text())["model_digest"] == good_digest


def test_predict_never_serves_a_damaged_champion(run, learnable_cacd, capsys, tmp_path):
    """Random bytes in the champion's weights: predict says so in one warning line and serves the
    best verified model left (or, with none left, stops with one error line), never a traceback."""
    from agelens.flows.cli.main import main
    from agelens.flows.registry import models

    good = run(until="compare")
    worse = run(until="compare", epochs=1, max_steps=1)  # stored only if it was ever promoted
    out = tmp_path / "o"
    shutil.copytree(run.out / "models", out / "models")
    [config] = models.configs(out)
    stored = models.stored(out, config)
    champion = models.serving(out, config).record
    weights = models.weights_of(out, config, champion)
    weights.write_bytes(weights.read_bytes()[:100] + np.random.default_rng(0).bytes(weights.stat().st_size - 100))
    files = [str(learnable_cacd / "CACD2000" / p)
             for p in pd.read_parquet(good["stages"]["evaluate"]["outputs"]["predictions"])["path"].head(3)]
    code = main(["predict", *files, "--no-detect", "--models", str(out), "--json"])
    captured = capsys.readouterr()
    said = [line for line in captured.err.splitlines() if line.startswith("agelens: ")]
    assert len(said) == 1 and "is damaged" in said[0] and "Traceback" not in captured.err
    if len(stored) > 1:  # the earlier champion stands in
        assert code == 0 and said[0].startswith("agelens: warning:")
        served = {r["model"] for r in json.loads(captured.out)["faces"]}
        assert served == {next(r for r in stored if r["model_digest"] != champion["model_digest"])["model_digest"][:16]}
    else:
        assert code == 1 and said[0].startswith("agelens: error:") and "no verified champion" in said[0]
    assert worse["stages"]["compare"]["summary"]["decision"] == "keep"
