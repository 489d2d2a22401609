"""Ctrl-C, SIGTERM and kill -9 against a run, and the local Prefect server that runs without a
configured server share (flows/service/interrupt.py, flows/service/localserver.py)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--until", "train", "--backbone", "convnext_narrow", "--image-size", "32", "--weights", "none",
         "--per-class", "20"]


def start(args: list[str], env: dict) -> subprocess.Popen:
    """`agelens ...` in a process group of its own, as a terminal runs a command."""
    return subprocess.Popen([sys.executable, "-m", "agelens", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(condition, seconds: float = 180, what: str = "condition"):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def saved_epoch(out: Path, since: float = 0.0) -> int:
    """The epoch the training checkpoint under `out` holds (saved after `since`, a Unix time), or 0."""
    for marker in out.glob("train/*.partial/checkpoint.json"):
        try:
            if marker.stat().st_mtime >= since:
                return json.loads(marker.read_text())["epoch"]
        except (OSError, ValueError):
            pass
    return 0


def this_run(server, launched: float) -> dict:
    """The flow run `agelens run` started at `launched` on the shared test server: other tests' deployments
    leave scheduled runs there, so the newest run by start time alone may not be ours."""
    since = datetime.fromtimestamp(launched - 1, timezone.utc).isoformat()
    found = server.api("POST", "/flow_runs/filter", json={
        "flow_runs": {"start_time": {"after_": since}, "deployment_id": {"is_null_": True}},
        "sort": "START_TIME_DESC"})
    assert len(found) == 1, [(r["name"], r["state_type"]) for r in found]
    return found[0]


@pytest.mark.slow
def test_ctrl_c_and_sigterm_stop_a_run_within_seconds_and_say_where_training_resumes(server, small_cacd, tmp_path):
    meta = str(small_cacd / "celebrity2000_meta.mat")
    out, stopped = tmp_path / "o", 0
    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        launched = time.time()
        run = start(["run", "--data", meta, "--out", str(out), *TRAIN, "--epochs", "40"], server.env)
        first = wait_for(lambda: saved_epoch(out, launched), what="a newly saved epoch")
        assert first > stopped  # the second run went on from the epoch the first one saved
        epoch = wait_for(lambda: saved_epoch(out) >= first + 1 and saved_epoch(out), what="another saved epoch")
        began = time.monotonic()
        if signum == signal.SIGINT:
            os.killpg(run.pid, signum)  # Ctrl-C reaches the whole foreground process group
        else:
            run.send_signal(signum)
        _, err = run.communicate(timeout=60)
        assert time.monotonic() - began < 20, "the run did not stop within seconds"
        assert run.returncode == code, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        said = [line for line in err.splitlines() if line.startswith("agelens:")]
        assert len(said) == 1, said
        told = re.fullmatch(r"agelens: interrupted; rerun the same command to resume training from epoch (\d+) "
                            r"\(epoch (\d+) is saved\)", said[0])
        assert told and int(told[1]) == int(told[2]) + 1, said
        stopped = int(told[2])
        assert stopped >= epoch
        newest = this_run(server, launched)
        assert newest["state_type"] == "CANCELLED", newest["state"]
        assert not [p for p in (out / "train").iterdir() if p.is_dir() and "." not in p.name]  # nothing served
    # What the next run does with the saved epoch is tested in tests/test_training.py (exact resume).


@pytest.mark.slow
def test_runs_without_a_server_share_one_that_outlives_them_by_the_linger_only(small_cacd, tmp_path):
    """Three runs at once with no server configured: one local server, started once, serves them
    all; a run killed with -9 does not keep it alive; a Ctrl-C is recorded on it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), AGELENS_SERVER_LINGER="15", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    meta = str(small_cacd / "celebrity2000_meta.mat")
    runs = [start(["run", "--data", meta, "--out", str(tmp_path / f"o{i}"), "--until", "split", "--per-class", "10"],
                  env) for i in range(3)]
    outcomes = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], [err[-2000:] for _, err in outcomes]
    state = tmp_path / "home" / "agelens-server"
    info = json.loads((state / "server.json").read_text())
    found = httpx.post(f"{info['url']}/flow_runs/filter", json={}).json()
    assert sorted(r["state_type"] for r in found) == ["COMPLETED"] * 3  # one server saw all three

    run = start(["run", "--data", meta, "--out", str(tmp_path / "k"), *TRAIN, "--epochs", "40"], env)
    wait_for(lambda: saved_epoch(tmp_path / "k") >= 1, what="a saved epoch")
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait(60) == 130
    newest = httpx.post(f"{info['url']}/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 1}).json()[0]
    assert newest["state_type"] == "CANCELLED"

    run = start(["run", "--data", meta, "--out", str(tmp_path / "k"), *TRAIN, "--epochs", "40"], env)
    wait_for(lambda: saved_epoch(tmp_path / "k") >= 3, what="a saved epoch")
    os.killpg(run.pid, signal.SIGKILL)
    run.wait(30)

    def gone() -> bool:
        try:
            httpx.get(f"{info['url']}/health", timeout=1)
            return False
        except httpx.HTTPError:
            return not _alive(info["pid"])

    wait_for(gone, 60, "the server to stop after its last user was killed")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())
