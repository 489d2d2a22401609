"""Model files obtained on first use: from a mirror over HTTP into an empty cache, checked against
their sha256, moved into place whole; one line naming every way out when they cannot be had."""

import contextlib
import functools
import hashlib
import http.server
import json
import socket
import threading
from pathlib import Path

import pytest

from agelens.tasks.core import downloads
from agelens.tasks.core.downloads import YUNET, ModelFile, locate
from agelens.tasks.core.errors import DataError
from agelens.tasks.core.hashing import sha256_file

SHARED_YUNET = Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / YUNET.name


@contextlib.contextmanager
def serving(folder: Path):
    """A local HTTP server of `folder` (the mirror a site without internet would run)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/models"
        finally:
            server.shutdown()


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("AGELENS_FACE_MODEL", raising=False)
    return tmp_path / "cache" / "agelens" / "models"


def a_model_file(tmp_path: Path, content: bytes = b"weights " * 5000) -> ModelFile:
    site = tmp_path / "site" / "models"
    site.mkdir(parents=True)
    (site / "tiny.onnx").write_bytes(content)
    return ModelFile("tiny.onnx", hashlib.sha256(content).hexdigest(), "https://example.invalid/tiny.onnx",
                     "a test model", "AGELENS_TEST_MODEL")


def test_a_mirror_over_http_fills_an_empty_cache_once(tmp_path, empty_cache, monkeypatch):
    model = a_model_file(tmp_path)
    with serving(tmp_path / "site") as url:
        monkeypatch.setenv("AGELENS_MODELS_URL", url)
        path = locate(model)
    assert path == empty_cache / "tiny.onnx" and path.read_bytes() == (tmp_path / "site/models/tiny.onnx").read_bytes()
    assert [p.name for p in empty_cache.iterdir()] == ["tiny.onnx"]  # nothing half-written left beside it
    monkeypatch.setenv("AGELENS_MODELS_URL", "http://127.0.0.1:9/nothing")  # cached: never asked again
    assert locate(model) == path


def test_a_folder_mirror_and_a_local_file_are_used_as_named(tmp_path, empty_cache, monkeypatch):
    model = a_model_file(tmp_path)
    monkeypatch.setenv("AGELENS_MODELS_URL", str(tmp_path / "site" / "models"))
    assert locate(model).read_bytes() == (tmp_path / "site/models/tiny.onnx").read_bytes()
    own = tmp_path / "mine.onnx"
    own.write_bytes(b"my own export")
    monkeypatch.setenv("AGELENS_TEST_MODEL", str(own))
    assert locate(model) == own
    assert locate(model, given=str(own)) == own
    with pytest.raises(DataError, match="missing.onnx .from the option. is not a file"):
        locate(model, given=str(tmp_path / "missing.onnx"))


def test_a_tampered_file_is_refused_and_nothing_is_cached(tmp_path, empty_cache, monkeypatch):
    model = a_model_file(tmp_path)
    (tmp_path / "site" / "models" / "tiny.onnx").write_bytes(b"weights " * 4999 + b"evil")
    with serving(tmp_path / "site") as url:
        monkeypatch.setenv("AGELENS_MODELS_URL", url)
        with pytest.raises(DataError, match=r"refused http://127.0.0.1:\d+/models/tiny.onnx: its sha256 is"):
            locate(model)
    assert not empty_cache.exists() or list(empty_cache.iterdir()) == []
    # A cached copy changed later is not used: it is fetched again.
    good = a_model_file(tmp_path / "again")
    empty_cache.mkdir(parents=True, exist_ok=True)
    (empty_cache / "tiny.onnx").write_bytes(b"changed on disk")
    monkeypatch.setenv("AGELENS_MODELS_URL", str(tmp_path / "again" / "site" / "models"))
    assert locate(good).read_bytes() == b"weights " * 5000


def test_offline_without_the_file_is_one_line_naming_every_way(tmp_path, empty_cache, monkeypatch):
    model = a_model_file(tmp_path)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("AGELENS_MODELS_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(DataError) as error:
        locate(model)
    message = str(error.value)
    assert "\n" not in message and f"http://127.0.0.1:{port}/tiny.onnx" in message
    assert str(empty_cache / "tiny.onnx") in message and "AGELENS_MODELS_URL" in message and "AGELENS_TEST_MODEL" in message
    monkeypatch.delenv("AGELENS_MODELS_URL")
    assert downloads.source_url(YUNET).startswith("https://github.com/opencv/opencv_zoo/")


@pytest.mark.skipif(not SHARED_YUNET.is_file(), reason="YuNet's ONNX file is not in ../shared/models here")
def test_fetch_models_fetches_yunet_from_a_local_mirror_into_an_empty_cache(empty_cache, monkeypatch, capsys):
    from agelens.flows.cli.main import main

    with serving(SHARED_YUNET.parent.parent) as url:
        monkeypatch.setenv("AGELENS_MODELS_URL", url)
        assert main(["fetch-models", "--json"]) == 0
    [found] = json.loads(capsys.readouterr().out)
    assert found == {"file": YUNET.name, "path": str(empty_cache / YUNET.name)}
    assert sha256_file(empty_cache / YUNET.name) == YUNET.sha256
