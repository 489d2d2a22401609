"""The flow's caching contract against a real (temporary) Prefect backend: unchanged stages are
served from the cache, changed ones rerun, and inputs are always read where they are now."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
from PIL import Image

from agelens.flows.pipeline.flow import age_pipeline
from agelens.flows.cli.main import main
from agelens.flows.pipeline.settings import RunSettings
from agelens.tasks.core.errors import DataError


def exit_code(argv: list[str]) -> int:
    """main's exit code, whether argparse exits or main returns."""
    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


def states(result):
    return {name: stage["state"] for name, stage in result["stages"].items()}


def run(data, out, **options):
    options = {"until": "split", "per_class": 15, **options}
    return age_pipeline(settings=RunSettings(data=str(data), out=str(out), **options))


def test_rerun_is_cached_and_each_change_reruns_only_what_it_touches(prefect_backend, small_cacd, tmp_path):
    out, meta = tmp_path / "artifacts", small_cacd / "celebrity2000_meta.mat"
    first = run(meta, out)
    assert states(first) == {"extract": "Completed", "split": "Completed"}
    assert states(run(meta, out)) == {"extract": "Cached", "split": "Cached"}
    assert states(run(meta, out, seed=5)) == {"extract": "Cached", "split": "Completed"}

    # Edit the metadata in place: drop the last image's row.
    mat = scipy.io.loadmat(meta)
    record = mat["celebrityImageData"]
    for field in record.dtype.names:
        if record[0, 0][field].size:
            record[0, 0][field] = record[0, 0][field][:-1]
    scipy.io.savemat(meta, {"celebrityImageData": record, "celebrityData": mat["celebrityData"]})
    edited = run(meta, out)
    assert states(edited) == {"extract": "Completed", "split": "Completed"}
    assert edited["stages"]["extract"]["summary"]["rows_out"] == first["stages"]["extract"]["summary"]["rows_out"] - 1

    # Outputs live in folders named by the key, so earlier results are untouched.
    first_manifest = first["stages"]["split"]["outputs"]["manifest"]
    assert first_manifest != edited["stages"]["split"]["outputs"]["manifest"]
    assert pd.read_parquet(first_manifest)["split"].isin(["train", "val"]).all()


def write_csv_dataset(source: Path, target: Path) -> Path:
    """The CACD fixture as images + CSV (path, age, identity)."""
    meta = scipy.io.loadmat(source / "celebrity2000_meta.mat")["celebrityImageData"][0, 0]
    target.mkdir(parents=True)
    shutil.copytree(source / "CACD2000", target / "faces")
    rows = [{"path": f"faces/{str(n[0][0])}", "age": int(a), "identity": int(i)}
            for n, a, i in zip(meta["name"], meta["age"].ravel(), meta["identity"].ravel())]
    pd.DataFrame(rows).to_csv(target / "labels.csv", index=False)
    return target / "labels.csv"


@pytest.mark.parametrize("head", ["ages", "corn"])
def test_a_head_runs_every_stage_and_a_rerun_skips_every_stage(prefect_backend, small_cacd, tmp_path, head):
    """`--head ages` (one output per year) and `--head corn` (decades as ranks) through every stage
    to the report; the same command again is all cached, compare and report included (the first
    run made its model champion)."""
    from markdown_it import MarkdownIt

    options = dict(until="report", per_class=20, backbone="convnext_narrow", weights="none", image_size=32, epochs=1,
                   head=head, explain_images=1, feature_images=1, attention_images=2, faithfulness_steps=2,
                   embed_images=60, tsne_perplexity=5.0)
    first = run(small_cacd / "celebrity2000_meta.mat", tmp_path / "o", **options)
    assert set(states(first).values()) == {"Completed"}
    assert first["stages"]["compare"]["summary"]["decision"] == "promote"
    explained = first["stages"]["explain"]["summary"]
    assert set(explained["predicted"].values()) <= set(first["stages"]["extract"]["summary"]["per_class"])
    predictions = pd.read_parquet(first["stages"]["evaluate"]["outputs"]["predictions"])
    probs = predictions.filter(like="prob_").to_numpy()
    assert probs.shape[1] == len(first["stages"]["extract"]["summary"]["per_class"])
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)
    again = run(small_cacd / "celebrity2000_meta.mat", tmp_path / "o", **options)
    assert set(states(again).values()) == {"Cached"}, states(again)
    # Text in the report is escaped once: a renderer shows no entity as written (such as &#x27; for ').
    rendered = MarkdownIt("commonmark").enable("table").render(Path(again["run"]["report"]).read_text())
    assert "&amp;#" not in rendered and "&amp;lt;" not in rendered, "escaped twice"


def test_a_changed_image_folder_is_never_served_from_the_cache(prefect_backend, small_cacd, tmp_path):
    out = tmp_path / "artifacts"
    labels = write_csv_dataset(small_cacd, tmp_path / "one")
    first = run(labels, out, until="decode", image_size=16, per_class=1000)
    assert set(states(first).values()) == {"Completed"}

    # A copy with the same names and different bytes, run into the same --out.
    labels_two = write_csv_dataset(small_cacd, tmp_path / "two")
    for image in (tmp_path / "two" / "faces").iterdir():
        Image.new("RGB", (250, 250), (200, 10, 10)).save(image, format="JPEG")
    second = run(labels_two, out, until="decode", image_size=16, per_class=1000)
    # The new bytes are measured for framing and decoded again.
    assert states(second) == {"extract": "Cached", "split": "Cached", "framing": "Completed", "decode": "Completed"}
    index = pd.read_parquet(second["stages"]["decode"]["outputs"]["index"])
    decoded = np.memmap(second["stages"]["decode"]["outputs"]["images"], dtype=np.uint8, mode="r",
                        shape=(len(index), 16, 16, 3))
    assert abs(int(decoded[..., 0].mean()) - 200) < 5  # the new images, not the cached old ones

    # The first dataset moved away with identical bytes: cached, and read from its new place.
    shutil.move(tmp_path / "one", tmp_path / "moved")
    moved = run(tmp_path / "moved" / "labels.csv", out, until="decode", image_size=16, per_class=1000)
    assert set(states(moved).values()) == {"Cached"}
    assert moved["stages"]["decode"]["key"] == first["stages"]["decode"]["key"]
    # ... and a stage that must read the images reads them there (not from the old path).
    reread = run(tmp_path / "moved" / "labels.csv", out, until="decode", image_size=24, per_class=1000)
    assert states(reread) == {"extract": "Cached", "split": "Cached", "framing": "Cached", "decode": "Completed"}
    assert reread["stages"]["decode"]["summary"]["undecodable"] == 0


def test_deleted_output_folder_makes_the_stage_run_again(prefect_backend, small_cacd, tmp_path):
    out = tmp_path / "artifacts"
    first = run(small_cacd / "celebrity2000_meta.mat", out)
    shutil.rmtree(Path(first["stages"]["split"]["outputs"]["manifest"]).parent)
    assert states(run(small_cacd / "celebrity2000_meta.mat", out)) == {"extract": "Cached", "split": "Completed"}


def test_missing_images_are_reported_and_the_rest_kept(prefect_backend, small_cacd, tmp_path):
    images = sorted((small_cacd / "CACD2000").iterdir())
    for image in images[::3]:
        image.unlink()
    result = run(small_cacd / "celebrity2000_meta.mat", tmp_path / "a")
    summary = result["stages"]["extract"]["summary"]
    assert summary["dropped"]["missing_image"] == len(images[::3])
    assert summary["rows_out"] == len(images) - len(images[::3])
    assert result["stages"]["split"]["summary"]["shared_identities"] == 0


@pytest.mark.parametrize("argv, message", [
    (["run", "--per-class", "0"], "--per-class: Input should be greater than or equal to 1"),
    (["run", "--val-frac", "0.7", "--test-frac", "0.4"], "must leave images to train on"),
    (["run", "--split-by", "person"], "invalid choice"),
    (["run", "--per-class", "many"], "--per-class"),
    (["run", "--epochs", "0", "--lr", "-1"], "--epochs: Input should be greater than or equal to 1 (got '0'); --lr: Input should be greater than 0"),
    (["run", "--device", "tpu9"], "--device: must be auto, cpu, cuda, cuda:N or mps"),
    (["run", "--cam-methods", "grad_cam,magic"], "--cam-methods"),
])
def test_bad_options_give_one_line_and_exit_2(argv, message, capsys):
    assert exit_code(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("agelens: error: ") and message in err[0], err


def test_list_options_take_commas_and_presets_yield_to_explicit_options():
    from agelens.flows.cli.main import build_parser, settings_from

    parser = build_parser()
    args = parser.parse_args(["run", "--cam-methods", "grad_cam, layer_cam", "--preset", "demo", "--epochs", "3",
                              "--per-class", "all", "--no-sanity-check"])
    settings = settings_from(args)
    assert settings.cam_methods == ["grad_cam", "layer_cam"] and settings.per_class == "all"
    assert (settings.backbone, settings.image_size, settings.epochs) == ("convnext_narrow", 64, 3)
    assert settings.sanity_check is False
    # The cpu preset trains from scratch even on real data, where --weights auto means ImageNet.
    real = settings_from(parser.parse_args(["run", "--preset", "cpu", "--data", "faces.csv"]))
    assert (real.backbone, real.weights_choice) == ("resnet10", "none")


def test_missing_data_file_is_one_clear_error(prefect_backend, tmp_path, capsys):
    code = main(["run", "--data", str(tmp_path / "nope.mat"), "--out", str(tmp_path / "o"), "--until", "split"])
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"agelens: error: metadata not found: {tmp_path / 'nope.mat'}"


def test_unusable_settings_stop_before_any_work_and_every_bad_item_is_named(prefect_backend, small_cacd, tmp_path, capsys):
    meta = str(small_cacd / "celebrity2000_meta.mat")
    cases = (
        (["--weights", str(tmp_path / "w.pth")], "weights file not found"),
        (["--backbone", "resnet_9000"], "--backbone: unknown backbone 'resnet_9000'"),
        (["--backbone", "convnext_narrow", "--image-size", "20"], "--image-size 20 is too small for convnext_narrow: "
                                                                  "it needs at least 32"),
        (["--backbone", "convnext_narrow", "--image-size", "64", "--start-size", "24"],
         "--start-size 24 is too small for convnext_narrow: it needs at least 32"),
        (["--image-size", "64", "--start-size", "96"], "--start-size: 96 must not exceed --image-size (64)"),
        (["--backbone", "convnext_narrow", "--image-size", "32", "--feature-layers", "features.99,classifier.2",
          "--cam-layer", "nope"], "--feature-layers: layer 'features.99' not found"),
        (["--backbone", "convnext_narrow", "--image-size", "32", "--explain-classes", "10s,70s"],
         "--explain-classes: 70s not among the data's classes"),
    )
    for options, message in cases:
        code = main(["run", "--data", meta, "--out", str(tmp_path / "o"), "--until", "report", "--weights", "none",
                     *options])
        err = capsys.readouterr().err.strip().splitlines()
        assert code in (1, 2) and len(err) == 1 and message in err[0], err
        if "--feature-layers" in message:
            assert "'classifier.2' outputs" in err[0] and "--cam-layer: layer 'nope' not found" in err[0]
        if "--explain-classes" not in message:  # classes are known once the (fast) extract has run
            assert not (tmp_path / "o" / "extract").exists()
        assert not (tmp_path / "o" / "split").exists()


def test_out_that_is_a_file_or_read_only_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["status", "--out", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.strip() == f"agelens: error: --out {tmp_path / 'file'} is a file, not a folder"


def test_expected_errors_print_no_traceback(server, small_cacd, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "agelens", "run", "--data", str(small_cacd / "celebrity2000_meta.mat"),
                           "--out", str(tmp_path / "o"), "--weights", "none", "--backbone", "convnext_narrow",
                           "--image-size", "32", "--explain-classes", "70s"], capture_output=True, text=True, timeout=300,
                          env=server.env)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "Traceback" in line or "agelens: error" in line]
    assert lines == ["agelens: error: --explain-classes: 70s not among the data's classes (10s, 20s, 30s, 40s, 50s, 60s)"]


def test_demo_data_is_made_once_in_the_project_and_never_over_a_users_folder(prefect_backend, tmp_path, monkeypatch):
    from agelens.flows.pipeline.demo import DEMO_FILE, DEMO_ROOT, demo_data
    from agelens.flows.pipeline.inputs import Inputs
    from agelens.tasks.core.hashing import HashMemo
    from tests.conftest import SMALL

    root = tmp_path / "demo"
    assert demo_data(root, SMALL) == str(root / DEMO_FILE)
    image = next((root / "CACD2000").iterdir())
    made = image.stat().st_mtime_ns
    demo_data(root, SMALL)  # current: reused, not redrawn
    assert image.stat().st_mtime_ns == made

    monkeypatch.chdir(tmp_path)  # the project's demo, wherever agelens is started
    assert Inputs.of(RunSettings(), HashMemo(None), make_demo=False).data == str(DEMO_ROOT / DEMO_FILE)

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="was not made by agelens"):
        demo_data(mine, SMALL)
    assert (mine / "precious.txt").read_text() == "keep me"


def test_prefect_ui_offers_every_setting_as_a_form_field():
    schema = age_pipeline.parameters.model_dump()
    assert list(schema["properties"]) == ["settings"]
    fields = schema["definitions"]["RunSettings"]["properties"]
    assert set(fields) == set(RunSettings.model_fields)
    assert fields["cam_methods"]["items"]["enum"][-1] == "score_cam"
    assert fields["split_by"]["enum"] == ["identity", "image"] and "description" in fields["per_class"]
