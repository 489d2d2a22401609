"""The flow's caching contract, run twice against a real (temporary) Prefect backend."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import scipy.io

from flows.age_pipeline import age_pipeline
from flows.cli import main


def states(result):
    return {name: stage["state"] for name, stage in result["stages"].items()}


def run(small_cacd, out, **options):
    return age_pipeline(data=str(small_cacd / "celebrity2000_meta.mat"), out=str(out), until="split",
                        per_class=15, **options)


def test_rerun_is_cached_and_each_change_reruns_only_what_it_touches(prefect_backend, small_cacd, tmp_path):
    out = tmp_path / "artifacts"
    first = run(small_cacd, out)
    assert states(first) == {"extract": "Completed", "split": "Completed"}
    assert states(run(small_cacd, out)) == {"extract": "Cached", "split": "Cached"}

    changed = run(small_cacd, out, seed=5)
    assert states(changed) == {"extract": "Cached", "split": "Completed"}

    # Edit the metadata in place: drop the last image's row.
    meta = small_cacd / "celebrity2000_meta.mat"
    mat = scipy.io.loadmat(meta)
    record = mat["celebrityImageData"]
    for field in record.dtype.names:
        if record[0, 0][field].size:
            record[0, 0][field] = record[0, 0][field][:-1]
    scipy.io.savemat(meta, {"celebrityImageData": record, "celebrityData": mat["celebrityData"]})
    edited = run(small_cacd, out)
    assert states(edited) == {"extract": "Completed", "split": "Completed"}
    assert edited["stages"]["extract"]["summary"]["rows_out"] == first["stages"]["extract"]["summary"]["rows_out"] - 1

    # Outputs live in folders named by the key, so earlier results are untouched.
    first_manifest = first["stages"]["split"]["outputs"]["manifest"]
    assert first_manifest != edited["stages"]["split"]["outputs"]["manifest"]
    assert pd.read_parquet(first_manifest)["split"].isin(["train", "val"]).all()


def test_deleted_output_folder_makes_the_stage_run_again(prefect_backend, small_cacd, tmp_path):
    import shutil
    from pathlib import Path

    out = tmp_path / "artifacts"
    first = run(small_cacd, out)
    shutil.rmtree(Path(first["stages"]["split"]["outputs"]["manifest"]).parent)
    assert states(run(small_cacd, out)) == {"extract": "Cached", "split": "Completed"}


def test_missing_images_are_reported_and_the_rest_kept(prefect_backend, small_cacd, tmp_path):
    images = sorted((small_cacd / "CACD2000").iterdir())
    for image in images[::3]:
        image.unlink()
    result = run(small_cacd, tmp_path / "a")
    summary = result["stages"]["extract"]["summary"]
    assert summary["dropped"]["missing_image"] == len(images[::3])
    assert summary["rows_out"] == len(images) - len(images[::3])
    assert result["stages"]["split"]["summary"]["shared_identities"] == 0


@pytest.mark.parametrize("argv, message", [
    (["run", "--per-class", "0"], "--per-class must be at least 1"),
    (["run", "--val-frac", "0.7", "--test-frac", "0.4"], "must leave images to train on"),
    (["run", "--split-by", "person"], "invalid choice"),
    (["run", "--per-class", "many"], "invalid int value"),
])
def test_bad_options_give_one_line_and_nonzero_exit(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("agelens: error: ") and message in err[0], err


def test_missing_data_file_is_one_clear_error(prefect_backend, tmp_path, capsys):
    code = main(["run", "--data", str(tmp_path / "nope.mat"), "--out", str(tmp_path / "o"), "--until", "split"])
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"agelens: error: metadata not found: {tmp_path / 'nope.mat'}"


def test_unusable_device_or_weights_stop_before_any_work(prefect_backend, small_cacd, tmp_path, capsys):
    meta = str(small_cacd / "celebrity2000_meta.mat")
    for options, message in ((["--device", "tpu9"], "unknown device 'tpu9'"),
                             (["--weights", str(tmp_path / "w.pth")], "weights file not found")):
        code = main(["run", "--data", meta, "--out", str(tmp_path / "o"), "--until", "train", *options])
        assert code == 1
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
        assert not (tmp_path / "o" / "extract").exists()


def test_json_output_from_the_command(prefect_backend, small_cacd, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "flows.age_pipeline", "--data", str(small_cacd / "celebrity2000_meta.mat"),
         "--out", str(tmp_path / "o"), "--until", "split", "--per-class", "10", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["stages"]) == {"extract", "split"}
    split = result["stages"]["split"]
    assert split["state"] == "Completed" and split["summary"]["shared_identities"] == 0
    assert sum(split["summary"]["per_class_per_split"]["val"].values()) > 0
    assert result["config"]["per_class"] == 10


def test_demo_data_is_made_once_and_never_over_a_users_folder(prefect_backend, tmp_path, monkeypatch):
    from pathlib import Path

    from tasks.sources import DataError

    monkeypatch.chdir(tmp_path)  # the demo goes to ./data/demo
    first = age_pipeline(out="a", until="extract")
    assert states(first) == {"demo": "Completed", "extract": "Completed"}
    assert first["stages"]["extract"]["summary"]["rows_out"] == first["stages"]["demo"]["summary"]["images"] == 1560
    image = next(Path("data/demo/CACD2000").iterdir())
    made = image.stat().st_mtime_ns
    assert states(age_pipeline(out="a", until="extract")) == {"demo": "Cached", "extract": "Cached"}
    other = age_pipeline(out="b", until="extract")  # a new output folder reuses the demo on disk
    assert other["stages"]["demo"]["summary"] == first["stages"]["demo"]["summary"]
    assert image.stat().st_mtime_ns == made

    Path("data/demo").rename("data/mine")
    Path("data/demo").mkdir()
    (Path("data/demo") / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="was not made by agelens"):
        age_pipeline(out="c", until="extract")
    assert (Path("data/demo") / "precious.txt").read_text() == "keep me"
