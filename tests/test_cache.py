"""The cache as users meet it: `agelens status`, `agelens gc`, and two runs into one folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agelens.flows.cli.main import main
from agelens.flows.service.locks import active_lock, locked
from agelens.flows.service.status import reasons

SPLIT_ONLY = ["--until", "split", "--per-class", "15"]


def agelens(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agelens", *args], capture_output=True, text=True, timeout=timeout,
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
    code = ("import sys; from agelens.flows.cli.main import main; "
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


@pytest.mark.slow
def test_two_runs_into_one_folder_both_succeed_with_what_a_solo_run_makes(server, small_cacd, tmp_path):
    meta = str(small_cacd / "celebrity2000_meta.mat")
    options = ["--data", meta, "--until", "train", "--backbone", "convnext_narrow", "--image-size", "32",
               "--epochs", "3", "--weights", "none", "--per-class", "20", "--json"]
    shared, solo = tmp_path / "shared", tmp_path / "solo"
    runs = [subprocess.Popen([sys.executable, "-m", "agelens", "run", *options, "--out", str(shared)],
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


def csv_dataset(small_cacd: Path, root: Path) -> Path:
    """The CACD fixture as images + CSV in `root` (path, age, identity)."""
    import scipy.io

    meta = scipy.io.loadmat(small_cacd / "celebrity2000_meta.mat")["celebrityImageData"][0, 0]
    root.mkdir(parents=True)
    os.rename(small_cacd / "CACD2000", root / "faces")
    lines = ["path,age,identity"] + [f"faces/{n[0]},{int(a)},{int(i)}" for n, a, i in
                                     zip(meta["name"].ravel(), meta["age"].ravel(), meta["identity"].ravel())]
    (root / "data.csv").write_text("\n".join(lines) + "\n")
    return root / "data.csv"


def test_out_inside_the_image_root_is_cached(prefect_backend, small_cacd, tmp_path, monkeypatch, capsys):
    """`cd ds; agelens run --data data.csv`: the default --out (artifacts) lies inside the image root."""
    csv = csv_dataset(small_cacd, tmp_path / "ds")
    monkeypatch.chdir(tmp_path / "ds")
    for _ in range(3):
        assert main(["run", "--data", "data.csv", *SPLIT_ONLY]) == 0
    assert all(row["cached"] for row in status_rows(capsys, "--data", str(csv), *SPLIT_ONLY).values())
    rows = [json.loads(line) for line in (tmp_path / "ds" / "artifacts" / "runs" / "runs.jsonl").read_text().splitlines()]
    assert [r["states"] for r in rows[1:]] == [{"extract": "Cached", "split": "Cached"}] * 2


TRAIN_TINY = ["--until", "train", "--backbone", "convnext_narrow", "--image-size", "32", "--epochs", "1",
              "--weights", "none", "--per-class", "12"]


def test_damaged_outputs_are_noticed_and_recomputed(prefect_backend, small_cacd, tmp_path, capsys):
    meta, out = str(small_cacd / "celebrity2000_meta.mat"), tmp_path / "o"
    options = ["--data", meta, "--out", str(out), *TRAIN_TINY]
    assert main(["run", *options, "--json"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = Path(first["stages"]["train"]["outputs"]["model"])
    manifest = Path(first["stages"]["split"]["outputs"]["manifest"])
    weights = model.read_bytes()

    model.unlink()  # a deleted output
    assert status_rows(capsys, *options)["train"]["reasons"] == ["damaged: its output model.safetensors is missing"]
    manifest.write_bytes(bytes(len(manifest.read_bytes())))  # corrupt: same name and size, other bytes
    (out / ".cache" / "file-hashes.sqlite").write_bytes(b"garbage, not a database" * 100)  # a damaged memo
    with open(out / "runs" / "runs.jsonl", "a") as handle:
        handle.write('["a line of the wrong shape"]\n{"run_id": 3}\n')
    rows = status_rows(capsys, *options)
    assert rows["split"]["reasons"] == ["damaged: its output manifest.parquet was changed after it was written"]
    assert main(["run", *options, "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {s: again["stages"][s]["state"] for s in again["stages"]} == \
        {"extract": "Cached", "split": "Completed", "framing": "Cached", "decode": "Cached", "train": "Completed"}
    assert model.read_bytes() == weights  # recomputed to the same weights
    assert all(row["cached"] for row in status_rows(capsys, *options).values())
    assert main(["runs", "--out", str(out)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3  # header and the two runs


def test_new_bytes_under_a_restored_mtime_are_noticed(prefect_backend, small_cacd, tmp_path):
    from agelens.flows.pipeline.flow import age_pipeline
    from agelens.flows.pipeline.settings import RunSettings

    settings = RunSettings(data=str(small_cacd / "celebrity2000_meta.mat"), out=str(tmp_path / "o"), until="decode",
                           per_class="all", image_size=16)
    first = age_pipeline(settings=settings)
    image = sorted((small_cacd / "CACD2000").iterdir())[0]
    before = image.stat()
    data = bytearray(image.read_bytes())
    data[200:260] = bytes(255 - b for b in data[200:260])  # new bytes, same size
    image.write_bytes(bytes(data))
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime restored, as `touch -r` would
    assert image.stat().st_size == before.st_size and image.stat().st_mtime_ns == before.st_mtime_ns
    second = age_pipeline(settings=settings)
    assert second["stages"]["decode"]["state"] == "Completed"
    assert second["stages"]["decode"]["key"] != first["stages"]["decode"]["key"]


@pytest.fixture
def read_only(tmp_path):
    """Make folders immutable (even for root) with chattr; undone afterwards."""
    made = []

    def make(path: Path) -> None:
        proc = subprocess.run(["chattr", "-R", "+i", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"chattr cannot make {path} read-only here: {proc.stderr.strip()}")
        made.append(path)

    yield make
    for path in made:
        subprocess.run(["chattr", "-R", "-i", str(path)], check=True)


def test_a_read_only_out_can_be_read(prefect_backend, small_cacd, tmp_path, capsys, read_only):
    meta, out = str(small_cacd / "celebrity2000_meta.mat"), tmp_path / "o"
    assert main(["run", "--data", meta, "--out", str(out), *SPLIT_ONLY]) == 0
    read_only(out)
    assert all(row["cached"] for row in status_rows(capsys, "--data", meta, "--out", str(out), *SPLIT_ONLY).values())
    assert main(["gc", "--out", str(out), "--keep-last", "0", "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out
    assert main(["gc", "--out", str(out), "--keep-last", "0"]) == 1
    assert capsys.readouterr().err.strip().endswith("gc removes nothing")
    assert main(["runs", "--out", str(out)]) == 0


def test_gc_keep_last_zero_removes_every_stage_folder(prefect_backend, small_cacd, tmp_path, capsys):
    meta, out = str(small_cacd / "celebrity2000_meta.mat"), tmp_path / "o"
    assert main(["run", "--data", meta, "--out", str(out), *SPLIT_ONLY]) == 0
    capsys.readouterr()
    assert main(["gc", "--out", str(out), "--keep-last", "1", "--dry-run"]) == 0
    assert "would remove 0 items" in capsys.readouterr().out
    assert main(["gc", "--out", str(out), "--keep-last", "0"]) == 0
    assert "removed 4 items" in capsys.readouterr().out  # two stage folders and their lock files
    assert not [p for p in (out / "split").iterdir()] and not [p for p in (out / "extract").iterdir()]
