"""The run table: what changed since the last run, learning-curve points, `agelens runs`."""

import json

import pytest

from agelens.flows.pipeline import publish, runs
from agelens.flows.cli.main import main
from agelens.flows.service.preflight import writable_out
from agelens.flows.pipeline.settings import RunSettings
from agelens.tasks.core.errors import ConfigError


def row(run_id, per_class, accuracy, train_images, fingerprint="f1", **settings):
    return {"run_id": run_id, "time": "2026-11-28T10:00:00+00:00", "fingerprint": fingerprint,
            "settings": RunSettings(per_class=per_class, **settings).dump(),
            "drawn": {"10s": per_class, "20s": per_class}, "train_images": train_images,
            "val": {"accuracy": accuracy + 0.1, "macro_f1": accuracy, "within_one": 0.9, "mae_years": None},
            "test": {"accuracy": accuracy, "macro_f1": accuracy - 0.1, "within_one": 0.9, "mae_years": 6.5},
            "best_epoch": 3, "training_seconds": 12.0, "stages": {"train": run_id * 3}, "states": {"train": "Completed"}}


def test_since_the_last_run_names_changed_settings_counts_and_metric_deltas():
    before, now = row("aaaaaaaa1", 20, 0.50, 32), row("bbbbbbbb2", 40, 0.62, 64, fingerprint="f2")
    lines = publish.since_last(before, now)
    assert lines[0].startswith("Compared with run aaaaaaaa")
    assert lines[1] == "- settings: per_class 20 → 40"
    assert lines[2] == "- images drawn per class: 10s 20 → 40; 20s 20 → 40 (the data changed)"
    assert lines[3] == "- val: accuracy 0.720 (+0.120), macro_f1 0.620 (+0.120), within_one 0.900 (+0.000)"
    assert lines[4] == ("- test: accuracy 0.620 (+0.120), macro_f1 0.520 (+0.120), within_one 0.900 (+0.000), "
                        "mae_years 6.500 (+0.000)")
    assert publish.since_last(None, now) == ["First recorded run in this output folder."]


def test_learning_curve_points_come_from_runs_with_otherwise_equal_settings():
    history = [row("a", 20, 0.5, 32), row("b", 40, 0.6, 64, fingerprint="f2"), row("c", 40, 0.6, 64, fingerprint="f2"),
               row("d", 40, 0.9, 64, epochs=50), row("e", 80, 0.7, 128, device="cpu", fingerprint="f3")]
    points = publish.learning_points(history[:-1], history[-1])
    # Points are test accuracies (the split that did not choose the epoch) where there is one.
    assert sorted((p["train_images"], p["split"], p["accuracy"]) for p in points) == [
        (32, "test", 0.5), (64, "test", 0.6), (128, "test", 0.7)]


def test_runs_command_and_a_crash_cut_line(tmp_path, capsys):
    out = tmp_path / "out"
    runs.append_run(out, row("a1b2c3d4e5", 20, 0.5, 32))
    runs.append_run(out, row("f6a7b8c9d0", 40, 0.625, 64))
    with open(runs.table_path(out), "a") as handle:
        handle.write('{"run_id": "cut sho')  # a run killed while appending
    assert [r["run_id"] for r in runs.read_runs(out)] == ["a1b2c3d4e5", "f6a7b8c9d0"]
    assert main(["runs", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["run", "time", "data"] and lines[1].startswith("f6a7b8c9 ") and "0.625" in lines[1]
    assert main(["runs", "--out", str(out), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_out_that_cannot_be_written_is_one_clear_error(tmp_path, monkeypatch):
    from pathlib import Path

    def refuse(self, *args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(ConfigError, match="cannot be written: Read-only file system"):
        writable_out(str(tmp_path / "new"))


def test_the_terminal_table_names_what_tells_runs_apart_and_folds_cached_reruns(tmp_path, capsys):
    out = tmp_path / "out"
    first = row("a1b2c3d4e5", 20, 0.5, 32, backbone="resnet10", epochs=12, lr=0.002, recipe="modern")
    runs.append_run(out, first)
    for k in range(2):  # the same command again: every stage cached
        runs.append_run(out, {**first, "run_id": f"c{k}" * 5, "states": {"train": "Cached"}})
    runs.append_run(out, row("f6a7b8c9d0", 20, 0.625, 32, epochs=24, lr=0.001))
    assert main(["runs", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and max(map(len, lines)) <= 140
    newest, oldest = lines[1].split(), lines[2].split()
    assert newest[0] == "f6a7b8c9" and "24ep" in newest and "0.001" in newest and newest[-1] == "0"
    assert oldest[0] == "a1b2c3d4" and "resnet10" in oldest and "modern" in oldest and oldest[-1] == "2"
    assert "20 each" in lines[2]
