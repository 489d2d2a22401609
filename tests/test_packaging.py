"""What `pip install` puts on a user's machine: one import package, `agelens`, holding everything
the commands need (nothing named `flows` or `tasks` in site-packages), working from any folder."""

import os
import re
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_package_of_the_checkout_is_installed_under_agelens():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = {"agelens"} | {"agelens." + str(p.parent.relative_to(REPO)).replace("/", ".")
                           for top in ("flows", "tasks") for p in (REPO / top).rglob("__init__.py")}
    assert set(declared) == found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(folder), str(REPO)], check=True, capture_output=True, timeout=300)
    [built] = folder.glob("agelens-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_holds_one_package_with_what_the_commands_read(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"agelens", re.sub(r"-py3.*", ".dist-info", wheel.name)}
    assert {"agelens/__main__.py", "agelens/prefect.yaml", "agelens/flows/pipeline/flow.py",
            "agelens/tasks/framing.py"} <= set(names)
    assert not [n for n in names if "/tests/" in n or "/bench/" in n or n.startswith("agelens/data/")]


@pytest.mark.slow
def test_an_installed_package_runs_the_demo_and_predicts_from_an_empty_folder(wheel, tmp_path, server):
    """Not editable, in a fresh virtual environment (its dependencies are this environment's), from
    an empty folder: the demo runs, predict finds faces with the detector fetched from a mirror,
    and nothing called `flows` can be imported."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # a path, not its .pth files
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    (venv / "bin" / "agelens").write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom agelens.flows.cli.main "
                                          "import main\nsys.exit(main())\n")
    (venv / "bin" / "agelens").chmod(0o755)
    empty = tmp_path / "somewhere"
    empty.mkdir()
    env = {**server.env, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONPATH": ""}

    def agelens(*args, timeout=900):
        proc = subprocess.run([str(venv / "bin" / "agelens"), *args], cwd=empty, env=env, capture_output=True,
                              text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import agelens.flows as f; print(f.__file__)"],
                           cwd=empty, env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(site)), where
    assert subprocess.run([str(venv / "bin" / "python"), "-c", "import flows"], cwd=empty, env=env).returncode == 1
    summary = agelens("run", "--preset", "demo", "--out", "o")
    assert re.search(r"^compare +Completed +promoted", summary, re.M), summary
    assert (tmp_path / "cache" / "agelens" / "demo" / "celebrity2000_meta.mat").is_file()  # not in site-packages
    fairface = REPO.parent / "shared" / "data" / "fairface" / "images"
    if not fairface.is_dir() or not os.environ.get("AGELENS_MODELS_URL", "").endswith("models"):
        pytest.skip("no real faces or no face detector mirror here: the demo ran; predict is not tried")
    photos = sorted(fairface.glob("*.jpg"))[:30]
    scored = agelens("predict", *map(str, photos), "--models", "o", "--out", "p.csv")
    assert re.search(r"^30 faces scored by the champion .*; 0 files skipped", scored, re.M), scored
    assert (tmp_path / "cache" / "agelens" / "models" / "face_detection_yunet_2026may.onnx").is_file()
    assert len((empty / "p.csv").read_text().splitlines()) == 31
    assert not (site / "agelens" / "data").exists()
