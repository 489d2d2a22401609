"""Shared fixtures: an isolated Prefect backend and small generated datasets."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # the suite runs on as many workers as cores: one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# The suite never reaches the internet: the face detector comes from ../shared/models where that
# folder is (the project's CI), else from nowhere (framing then takes its default; detection tests skip).
SHARED_MODELS = Path(__file__).resolve().parents[1] / ".." / "shared" / "models"
os.environ.setdefault("AGELENS_MODELS_URL", str(SHARED_MODELS if SHARED_MODELS.is_dir() else Path(__file__).parent / "no-mirror"))

from agelens.tasks.data.demo import DemoSpec, plan_demo, write_demo  # noqa: E402


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


# The files that take longest go to the workers first (xdist hands out whole files in this
# order), so that no worker is left alone with a long file at the end.
LONGEST_FIRST = ("test_flow_training.py", "test_flow.py", "test_deployments.py", "test_cache.py", "test_attribution.py")


def pytest_collection_modifyitems(config, items):
    """Longest files first; tests marked slow (a real server and worker, minutes each) run in CI,
    or with CI=1."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order stays
    if os.environ.get("CI"):
        return
    skip = pytest.mark.skip(reason="slow: runs in CI; CI=1 make test runs it here")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

REAL_META = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cacd" / "celebrity2000_meta.mat"
SMALL = DemoSpec(identities=24, images_per_identity=6, seed=3)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real Prefect server (a process of its own, like a user's), shared by the tests that need one."""
    from tests.harness import PrefectServer

    with PrefectServer(tmp_path_factory.mktemp("prefect-home")) as running:
        yield running


@pytest.fixture(scope="session")
def prefect_backend(server):
    """Flows run in the test process against the shared real server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.url}):
        yield


@pytest.fixture(scope="session")
def small_cacd_master(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cacd-master")
    write_demo(root, SMALL)
    return root


@pytest.fixture
def small_cacd(small_cacd_master, tmp_path) -> Path:
    """A private copy of a 144-image CACD-format dataset (v5 .mat + CACD2000/)."""
    import shutil

    root = tmp_path / "cacd"
    shutil.copytree(small_cacd_master, root)
    return root


def write_mat_v73(path: Path, rows: list[dict]) -> None:
    """A MATLAB v7.3 file the way MATLAB writes one: HDF5 behind a 512-byte header,
    numbers as doubles, strings as uint16 (UTF-16) arrays behind object references."""
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created by: agelens tests HDF5 schema 1.00 ."
    with h5py.File(path, "w", userblock_size=512) as h5:
        refs = h5.create_group("#refs#")
        counter = iter(range(10**9))

        def strings(values):
            out = np.empty((1, len(values)), dtype=h5py.ref_dtype)
            for i, text in enumerate(values):
                ds = refs.create_dataset(f"s{next(counter)}", data=np.frombuffer(text.encode("utf-16-le"), "<u2")[:, None])
                ds.attrs["MATLAB_class"] = np.bytes_("char")
                out[0, i] = ds.ref
            return out

        images = h5.create_group("celebrityImageData")
        for field in ("age", "identity", "year", "rank", "lfw", "birth"):
            images.create_dataset(field, data=np.array([[r[field] for r in rows]], dtype=np.float64))
        images.create_dataset("feature", data=np.zeros((0, 0)))
        images.create_dataset("name", data=strings([r["file"] for r in rows]))
        people = {r["identity"]: r["name"] for r in rows}
        celebs = h5.create_group("celebrityData")
        celebs.create_dataset("identity", data=np.array([list(people)], dtype=np.float64))
        celebs.create_dataset("name", data=strings(list(people.values())))
    with open(path, "r+b") as handle:
        handle.write(header.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02IM")


@pytest.fixture
def small_rows():
    return plan_demo(SMALL)


LEARNABLE = DemoSpec(identities=72, images_per_identity=8, seed=1)
# The reference recipe: at 32 px from scratch the modern recipe's strong augmentation costs more than
# it brings (test accuracy 0.29-0.32 against 0.40-0.50 over seeds 0-1, measured).
TINY_TRAINING = dict(backbone="convnext_narrow", weights="none", image_size=32, epochs=10, lr=1e-3, per_class=60,
                     val_frac=0.25, recipe="reference")


@pytest.fixture(scope="session")
def learnable_cacd(tmp_path_factory) -> Path:
    """576 drawn faces of 72 people: enough for a tiny ConvNeXt to learn decades in seconds."""
    root = tmp_path_factory.mktemp("cacd-learnable")
    write_demo(root, LEARNABLE)
    return root
