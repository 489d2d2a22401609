"""The command line as a hostile or careless user meets it: bounded options, one-line errors
(also as JSON), errors before any server is started, unreachable servers, closed pipes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agelens.flows.cli.main import main

REPO = Path(__file__).resolve().parents[1]


def agelens(*args: str, env: dict | None = None, cwd=None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agelens", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)


def no_server_env(tmp_path: Path) -> dict:
    """No Prefect server configured, and a Prefect home of its own (so a started server shows)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


@pytest.mark.parametrize("argv, message", [
    (["--seed", "-1"], "--seed: Input should be greater than or equal to 0"),
    (["--seed", str(2**70)], "--seed: Input should be less than 4294967296"),
    (["--lr", "inf"], "--lr: Input should be a finite number"),
    (["--lr", "nan"], "--lr: Input should be a finite number"),
    (["--image-size", "4097"], "--image-size: Input should be less than or equal to 1024"),
    (["--tsne-perplexity", "inf"], "--tsne-perplexity: Input should be a finite number"),
    (["--epochs", "1000000"], "--epochs: Input should be less than or equal to 10000"),
])
def test_out_of_range_options_are_one_line_before_any_work(argv, message, tmp_path, capsys):
    assert exit_code(["run", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_a_backbone_that_cannot_run_at_the_size_says_why(small_cacd, tmp_path, capsys):
    code = main(["run", "--data", str(small_cacd / "celebrity2000_meta.mat"), "--out", str(tmp_path / "o"),
                 "--backbone", "vit_b_16", "--image-size", "20", "--weights", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "vit_b_16 needs an image size that is a multiple of its patch size 16 (e.g. 16 or 32)" in err[0]
    assert not (tmp_path / "o" / "extract").exists()


def test_a_text_file_as_weights_is_named_before_any_work(small_cacd, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello, these are my notes\n")
    code = main(["run", "--data", str(small_cacd / "celebrity2000_meta.mat"), "--out", str(tmp_path / "o"),
                 "--backbone", "convnext_narrow", "--image-size", "32", "--weights", str(notes)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"--weights: weights file {notes} is not a PyTorch state dict" in err[0] and "looks like text" in err[0]
    assert not (tmp_path / "o" / "extract").exists()


def test_errors_come_before_any_server_and_json_gets_an_error_object(tmp_path):
    env = no_server_env(tmp_path)
    proc = agelens("run", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o"), "--json", env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"agelens: error: metadata not found: {tmp_path / 'missing.csv'}"
    assert json.loads(proc.stdout) == {"error": f"metadata not found: {tmp_path / 'missing.csv'}", "kind": "DataError",
                                       "exit_code": 1}
    assert not (tmp_path / "prefect-home" / "agelens-server").exists()  # no server was started for it
    bad = agelens("run", "--epochs", "0", "--json", env=env)
    assert bad.returncode == 2 and json.loads(bad.stdout)["kind"] == "ConfigError"
    unknown = agelens("run", "--no-such-option", "--json", env=env)
    assert unknown.returncode == 2 and json.loads(unknown.stdout)["kind"] == "ConfigError"


def test_status_fails_when_the_data_is_missing(tmp_path):
    proc = agelens("status", "--data", str(tmp_path / "gone.mat"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"agelens: error: metadata not found: {tmp_path / 'gone.mat'}"
    assert "cannot run" in proc.stdout


def test_deploy_needs_a_server(tmp_path):
    proc = agelens("deploy", "--data", str(tmp_path / "x.csv"), env=no_server_env(tmp_path))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("agelens: error: agelens deploy needs a running Prefect server")
    assert not (tmp_path / "prefect-home" / "agelens-server").exists()


def test_an_unreachable_server_is_one_line(tmp_path, small_cacd):
    env = {**no_server_env(tmp_path), "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    for command in (["run", "--data", str(small_cacd / "celebrity2000_meta.mat"), "--until", "extract"],
                    ["deploy", "--data", str(small_cacd / "celebrity2000_meta.mat")]):
        proc = agelens(*command, "--out", str(tmp_path / "o"), env=env)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("agelens: error: cannot reach the Prefect server at "
                                                       "http://127.0.0.1:9/api"), lines


def test_a_closed_pipe_is_not_an_error(tmp_path):
    from agelens.flows.pipeline import runs
    from tests.test_runs import row

    for i in range(1500):  # more than a pipe's buffer
        runs.append_run(tmp_path, row(f"run{i:05d}x", 20, 0.5, 32))
    for command in (f"runs --out {tmp_path}", f"status --out {tmp_path} --data {tmp_path / 'gone.csv'}"):
        proc = subprocess.run(f"{sys.executable} -m agelens {command} | head -1", shell=True, capture_output=True,
                              text=True, timeout=120)
        assert "BrokenPipe" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stdout.splitlines()) == 1


def test_readme_options_table_is_the_settings():
    """The README's options table is generated from RunSettings, so no default can drift."""
    from agelens.flows.pipeline.settings import options_table

    readme = (REPO / "README.md").read_text()
    assert options_table() in readme, ("the README's options table differs from the settings; regenerate it with "
                                       "python -c 'from agelens.flows.pipeline.settings import options_table; print(options_table())'")
