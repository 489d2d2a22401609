"""Nothing a user does breaks agelens, round two: predict, promote, sweep, deploy, a full disk, an
early Ctrl-C. Every expected error is one line (`agelens: error: ...`), exit 2 for a bad option
and 1 otherwise, found before any work where it can be."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from agelens.flows.cli.main import main
from tests.test_predict import face, scorer

REPO = Path(__file__).resolve().parents[1]


def code_of(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("agelens: ")]
    assert len(said) == 1 and "Traceback" not in err, err
    return said[0]


@pytest.fixture
def champion(monkeypatch):
    """predict with a small untrained model standing in for a champion."""
    from agelens.flows.predict import scoring

    monkeypatch.setattr(scoring, "load_scorer", lambda *args, **kwargs: scorer())


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_in_the_first_seconds_is_one_line_and_its_exit_code(tmp_path, signum, code):
    """Ctrl-C or SIGTERM while the run still checks and starts its local server (before any flow runs)."""
    proc = subprocess.Popen([sys.executable, "-m", "agelens", "run", "--out", str(tmp_path / "o")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "AGELENS_SERVER_LINGER": "1"})
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not any("starting the local Prefect server" in line for line in said):  # its first words
        assert proc.poll() is None and time.monotonic() < deadline, said
        time.sleep(0.05)
    began = time.monotonic()
    proc.send_signal(signum)
    proc.wait(timeout=30)
    reader.join(10)
    err = "".join(said)
    assert proc.returncode == code and time.monotonic() - began < 5, err
    assert "agelens: interrupted" in err and "Traceback" not in err, err


def test_a_stop_during_predict_keeps_what_was_scored(tmp_path, champion, capsys, monkeypatch):
    from agelens.tasks.model import inference

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(200):
        face(folder / f"{i:03d}.png", seed=i)
    scored = inference.predict
    monkeypatch.setattr(inference, "predict", lambda *a, **k: (time.sleep(0.2), scored(*a, **k))[1])  # a slow model
    stopper = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT))
    stopper.start()
    began = time.monotonic()
    code = main(["predict", str(folder), "--no-detect", "--batch-size", "8", "--out", str(tmp_path / "ages.csv")])
    stopper.cancel()
    assert code == 130 and time.monotonic() - began < 15
    captured = capsys.readouterr()
    said = [line for line in captured.err.splitlines() if line.startswith("agelens: ")]
    assert len(said) == 1 and said[0].startswith("agelens: interrupted after scoring") and "Traceback" not in captured.err
    table = pd.read_csv(tmp_path / "ages.csv")
    printed = [line for line in captured.out.splitlines() if line.startswith(str(folder))]
    assert 0 < len(table) < 200 and len(printed) == len(table)  # each row printed as it was scored, and kept


def test_predict_checks_where_it_writes_before_any_work(tmp_path, capsys):
    photo = str(face(tmp_path / "a.png"))
    (tmp_path / "file").write_text("x")
    for argv, code, message in (
            (["--out", str(tmp_path / "x.txt")], 2, "write .csv or .parquet"),
            (["--out", str(tmp_path / "file" / "x.csv")], 2, "cannot write into"),
            (["--explain", str(tmp_path / "file")], 2, "is a file; name a folder"),
            (["--device", "banana"], 2, "--device: must be auto, cpu")):
        assert code_of(["predict", photo, "--models", str(tmp_path / "none"), *argv]) == code
        assert message in one_line(capsys)


def test_predict_writes_any_file_name_and_says_when_nothing_was_read(tmp_path, champion, capsys):
    (tmp_path / "photos").mkdir()
    name = tmp_path / "photos" / os.fsdecode(b"a\xff\nb.png")
    face(tmp_path / "photos" / "x.png").rename(name)
    assert main(["predict", str(tmp_path / "photos"), "--no-detect", "--out", str(tmp_path / "t.csv")]) == 0
    shown = capsys.readouterr().out.splitlines()[0]
    assert shown.startswith(str(tmp_path / "photos" / "a\\xff\\nb.png")) and ": " in shown
    assert os.fsencode(name) in (tmp_path / "t.csv").read_bytes()  # the name's own bytes
    assert main(["predict", str(name), "--no-detect", "--out", str(tmp_path / "t.parquet")]) == 0
    assert pd.read_parquet(tmp_path / "t.parquet")["file"].tolist() == [str(tmp_path / "photos" / "a\\xff\nb.png")]
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "missing"), "--no-detect", "--out", str(tmp_path / "e.csv")]) == 1
    assert "no face was scored" in one_line(capsys)
    table = pd.read_csv(tmp_path / "e.csv")
    assert list(table.columns[:3]) == ["file", "face", "x"] and table["skipped"].tolist() == ["no such file or folder"]


def test_a_full_disk_in_any_stage_is_one_line(tmp_path, monkeypatch):
    """torch's checkpoint writer reports a full disk as a RuntimeError; every stage says it in one line."""
    import shutil
    from collections import namedtuple

    from agelens.flows.pipeline import runner
    from agelens.tasks.core.errors import DataError

    class Stage:
        @staticmethod
        def run(job):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3225856 vs 3225744")

    monkeypatch.setattr(runner.importlib, "import_module", lambda name: Stage)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(4 << 20, 4 << 20, 0))
    with pytest.raises(DataError, match=f"the disk holding {tmp_path} is full"):
        runner.run_stage({"stage": "train", "key": "k", "out": str(tmp_path)})
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 30, 1 << 39))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with room on the disk it is some other fault
        runner.run_stage({"stage": "train", "key": "k", "out": str(tmp_path)})


def test_promote_where_no_lock_can_be_taken_is_one_line(tmp_path, capsys):
    (tmp_path / "out").write_text("a file where a folder should be")
    from agelens.flows.service.locks import locked
    from agelens.tasks.core.errors import AgelensError

    with pytest.raises(AgelensError, match="cannot take the lock"):
        with locked(tmp_path / "out" / "models" / ".lock"):
            pass


def test_the_dask_runner_without_its_extra_says_which_to_install(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prefect_dask" else real(name, *a))
    assert code_of(["run", "--task-runner", "dask", "--until", "extract"]) == 2
    assert "pip install 'agelens[dask]'" in one_line(capsys)


def test_an_unreachable_server_is_said_before_the_slow_checks(tmp_path):
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "agelens", "run", "--out", str(tmp_path / "o"), "--until", "split"],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert proc.returncode == 2 and time.monotonic() - began < 10, proc.stderr
    assert proc.stderr.startswith("agelens: error: cannot reach the Prefect server at http://127.0.0.1:9/api")


def test_paths_that_are_not_utf8_are_one_line(tmp_path, capsys):
    from agelens.tasks.core.hashing import HashMemo

    odd = os.fsdecode(bytes(tmp_path) + b"/d\xffta.csv")
    assert code_of(["status", "--data", odd, "--out", str(tmp_path / "o")]) == 2
    assert "holds bytes that are not UTF-8" in one_line(capsys)
    Path(odd).write_text("path,age\n")
    with HashMemo(tmp_path / "memo.sqlite") as memo:  # the memo itself takes any name a file system holds
        assert len(memo.file(odd)) == 64 and memo.file(odd) == memo.file(odd)


@pytest.mark.parametrize("content", [b"\xff\xfe[\x00]\x00", bytes(range(256))])
def test_a_settings_file_that_is_not_text_is_one_line(tmp_path, capsys, content):
    (tmp_path / "s.yaml").write_bytes(content)
    assert code_of(["sweep", "--settings-file", str(tmp_path / "s.yaml")]) == 2
    assert "is not JSON or YAML" in one_line(capsys)


def test_a_sweep_that_stops_before_evaluate_is_refused_before_any_work(capsys):
    assert code_of(["sweep", "--lr", "1e-3,3e-4", "--until", "train"]) == 2
    assert "--until train: a sweep compares" in one_line(capsys)


@pytest.mark.parametrize("name", ["bad/name <x>", "<img src=x onerror=alert(1)>", "x%2Fy", "", " ", "a b "])
def test_deployment_names_are_checked_before_the_server_is_asked(name, capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert code_of(["deploy", "--name", name]) == 2
    assert "a name is letters, digits" in one_line(capsys)


def test_gc_refuses_a_folder_agelens_did_not_make(tmp_path, capsys):
    (tmp_path / "0123456789abcdef0123456789abcdef").write_text("someone's file")
    (tmp_path / "decode").mkdir()
    (tmp_path / "decode" / "foo.tmp-1").write_text("someone's file too")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert code_of(["gc", "--out", str(tmp_path)]) == 1
    assert "not an agelens output folder" in one_line(capsys)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_a_huge_photo_is_read_reduced_without_pil_warnings(tmp_path, recwarn):
    from PIL import Image

    from agelens.tasks.model.faces import MAX_SIDE, read_image

    Image.fromarray(np.zeros((9500, 9500, 3), np.uint8)).save(tmp_path / "big.jpg", quality=50)
    pixels = read_image(tmp_path / "big.jpg")
    assert max(pixels.shape[:2]) < 9500 and max(pixels.shape[:2]) >= MAX_SIDE
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]


@pytest.mark.slow  # a local Prefect server of its own
def test_a_server_that_dies_during_a_run_is_one_line_within_seconds(tmp_path, small_cacd):
    import json

    import psutil

    home = tmp_path / "prefect"
    proc = subprocess.Popen([sys.executable, "-m", "agelens", "run", "--data", str(small_cacd / "celebrity2000_meta.mat"),
                             "--out", str(tmp_path / "o"), "--backbone", "convnext_narrow", "--weights", "none",
                             "--image-size", "32", "--epochs", "50", "--per-class", "20", "--until", "train"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
                                 "PREFECT_HOME": str(home)})
    deadline = time.monotonic() + 240
    while not list((tmp_path / "o").glob("train/*.partial/checkpoint.json")):  # training has begun
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    supervisor = psutil.Process(json.loads((home / "agelens-server" / "server.json").read_text())["pid"])
    for server in supervisor.children():
        server.kill()
    began = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and time.monotonic() - began < 20, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith("agelens: error:")]
    assert len(said) == 1 and "stopped answering during the run" in said[0] and "Traceback" not in err
