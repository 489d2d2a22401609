"""The cache as users meet it: `agelens status`, `agelens gc`, and two runs into one folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from flows.locks import active_lock, locked
from tests.harness import PrefectServer
from flows.status import reasons

SPLIT_ONLY = ["--until", "split", "--per-class", "15"]


def agelens(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def status_rows(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["status", *args, "--json"]) == 0
    return {row["stage"]: row for row in json.loads(capsys.readouterr().out)}


def test_status_says_what_would_run_and_why(prefect_backend, small_cacd, tmp_path, capsys):
    meta, out = str(small_cacd / "celebrity2000_meta.mat"), str(tmp_path / "o")
    before = status_rows(capsys, "--data", meta, "--out", out, *SPLIT_ONLY)
    assert not before["extract"]["cached"] and "no earlier run" in before["extract"]["reasons"][0]
    assert before["split"]["reasons"] == ["upstream extract must run first"]
    assert main(["run", "--data", meta, "--out", out, *SPLIT_ONLY]) == 0
    assert all(row["cached"] for row in status_rows(capsys, "--data", meta, "--out", out, *SPLIT_ONLY).values())
    changed = status_rows(capsys, "--data", meta, "--out", out, "--until", "split", "--per-class", "20")
    assert changed["extract"]["cached"] and changed["split"]["reasons"] == ["setting per_class: 15 -> 20"]
    (small_cacd / "CACD2000" / sorted(os.listdir(small_cacd / "CACD2000"))[0]).unlink()
    edited = status_rows(capsys, "--data", meta, "--out", out, *SPLIT_ONLY)
    assert edited["extract"]["reasons"] == ["input listing changed (content)"]


def test_reasons_name_settings_code_inputs_and_upstream():
    before = {"settings": {"epochs": 5}, "code": {"tasks/train.py": "a", "tasks/models.py": "b"},
              "inputs": {"weights": "w"}, "upstream": {"decode": {"key": "k", "content": "c"}}}
    now = {"settings": {"epochs": 9}, "code": {"tasks/train.py": "a2", "tasks/models.py": "b"},
           "inputs": {"weights": "w2"}, "upstream": {"decode": {"key": "k2", "content": "c2"}}}
    assert reasons(now, before) == ["setting epochs: 5 -> 9", "code changed: tasks/train.py",
                                    "input weights changed (content)", "output of decode changed"]
    assert reasons(before, before) == ["its output folder was removed"]


def test_status_imports_neither_torch_nor_prefect(small_cacd, tmp_path):
    code = ("import sys; from flows.cli import main; "
            f"main(['status', '--data', {str(small_cacd / 'celebrity2000_meta.mat')!r}, '--out', {str(tmp_path)!r}]); "
            "print(sorted(m for m in ('torch', 'prefect', 'matplotlib', 'pandas') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_gc_keeps_what_recent_runs_used_and_removes_leftovers(prefect_backend, small_cacd, tmp_path, capsys):
    meta, out = str(small_cacd / "celebrity2000_meta.mat"), tmp_path / "o"
    for per_class in ("10", "12", "14"):
        assert main(["run", "--data", meta, "--out", str(out), "--until", "split", "--per-class", per_class]) == 0
    splits = sorted(p.name for p in (out / "split").iterdir() if p.is_dir() and "." not in p.name)
    assert len(splits) == 3
    (out / "split" / f"{splits[0]}.tmp-deadbeef").mkdir()  # a killed run's leftover
    (out / "0123456789abcdef0123456789abcdef").write_text("{}")  # a failed task's record
    last = json.loads((out / "runs" / "runs.jsonl").read_text().splitlines()[-1])["stages"]["split"]
    capsys.readouterr()
    assert main(["gc", "--out", str(out), "--keep-last", "1", "--dry-run"]) == 0
    # 2 older split folders and their lock files, the leftover, the record
    assert "would remove 6 items" in capsys.readouterr().out
    assert len(list((out / "split").iterdir())) >= 4
    assert main(["gc", "--out", str(out), "--keep-last", "1"]) == 0
    assert "removed 6 items" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "split").iterdir() if "." not in p.name) == [last]
    assert not (out / "0123456789abcdef0123456789abcdef").exists()
    assert len([p for p in (out / "extract").iterdir() if "." not in p.name]) == 1
    with locked(active_lock(out), shared=True):  # as a running flow holds it
        assert main(["gc", "--out", str(out), "--keep-last", "0"]) == 1
    assert "a run is using" in capsys.readouterr().err
    assert (out / "split" / last).exists()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with PrefectServer(tmp_path_factory.mktemp("prefect-home")) as running:
        yield running


def test_two_runs_into_one_folder_both_succeed_with_what_a_solo_run_makes(server, small_cacd, tmp_path):
    meta = str(small_cacd / "celebrity2000_meta.mat")
    options = ["--data", meta, "--until", "train", "--backbone", "convnext_narrow", "--image-size", "32",
               "--epochs", "3", "--weights", "none", "--per-class", "20", "--json"]
    shared, solo = tmp_path / "shared", tmp_path / "solo"
    runs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "run", *options, "--out", str(shared)],
                             env=server.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    alone = agelens("run", *options, "--out", str(solo), env=server.env)
    assert alone.returncode == 0, alone.stderr[-2000:]
    reference = json.loads(alone.stdout.strip().splitlines()[-1])
    for result in results:
        for stage, expected in reference["stages"].items():
            got = result["stages"][stage]
            assert got["key"] == expected["key"], stage
            assert Path(got["outputs"]["model" if stage == "train" else next(iter(got["outputs"]))]).exists()
    trained = [json.loads((shared / "train" / r["stages"]["train"]["key"] / "result.json").read_text()) for r in results]
    solo_model = json.loads((solo / "train" / reference["stages"]["train"]["key"] / "result.json").read_text())
    assert trained[0]["outputs"]["model"]["sha256"] == solo_model["outputs"]["model"]["sha256"]
    # Each stage was computed once: one run computed it, the other waited and found it done.
    for stage in reference["stages"]:
        assert sorted(r["stages"][stage]["state"] for r in results) == ["Cached", "Completed"], stage
    assert not list(shared.glob("*/*.tmp-*")) and not list(shared.glob("train/*.partial"))
    rows = (shared / "runs" / "runs.jsonl").read_text().splitlines()
    assert len(rows) == 2 and {json.loads(r)["run_id"] for r in rows} == {r["run"]["run_id"] for r in results}
