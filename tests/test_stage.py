"""Cache keys by content, and atomic stage folders."""

from pathlib import Path

import pytest

from tasks.hashing import HashMemo
from tasks.stage import StageKey, canonical, stage_output


def test_keys_follow_content_and_settings_not_paths_or_summaries():
    key = StageKey("split", ("tasks.split",))
    base = {"metadata": {"outputs": {"m": {"path": "/a/m.parquet", "sha256": "1"}}, "summary": {"t": 1.5}},
            "per_class": 200, "out": "/x"}
    moved = {"metadata": {"outputs": {"m": {"path": "/b/m.parquet", "sha256": "1"}}, "summary": {"t": 9.0}},
             "per_class": 200, "out": "/y"}
    assert key.digest(base) == key.digest(moved)
    assert key.digest(base) != key.digest({**base, "per_class": 100})
    edited = {**base, "metadata": {"outputs": {"m": {"path": "/a/m.parquet", "sha256": "2"}}}}
    assert key.digest(base) != key.digest(edited)
    assert key.digest(base) != StageKey("split", ("tasks.extract",)).digest(base)  # code is part of the key
    assert key(None, base) == f"split/{key.digest(base)}/.prefect-result"
    with pytest.raises(TypeError, match="as handles"):
        canonical({"source": Path("/a")})


def test_stage_folder_appears_complete_or_not_at_all(tmp_path):
    final = tmp_path / "train" / "abc"
    with pytest.raises(RuntimeError):
        with stage_output(final) as out:
            out.path("model.pt").write_bytes(b"half")
            raise RuntimeError("killed")
    assert not final.exists() and list((tmp_path / "train").iterdir()) == []

    with stage_output(final, {"epochs": 3, "out": "/x"}) as out:
        out.scratch.mkdir()
        (out.scratch / "checkpoint.pt").write_bytes(b"resume me")
        out.path("model.pt").write_bytes(b"weights")
        handle = out.handle("model.pt")
        assert not final.exists()
    assert (final / "model.pt").read_bytes() == b"weights" and handle["path"] == str(final / "model.pt")
    assert (final / "parameters.json").read_text().count("epochs") == 1 and not out.scratch.exists()


def test_file_hashes_are_remembered_by_size_and_mtime(tmp_path, monkeypatch):
    import tasks.hashing as hashing

    data = tmp_path / "big.bin"
    data.write_bytes(b"x" * 1000)
    with HashMemo(tmp_path / "memo.sqlite") as memo:
        first = memo.file(data)
    calls = []
    monkeypatch.setattr(hashing, "sha256_file", lambda p: calls.append(p) or "recomputed")
    with HashMemo(tmp_path / "memo.sqlite") as memo:
        assert memo.file(data) == first and calls == []
        data.write_bytes(b"y" * 1001)
        assert memo.file(data) == "recomputed" and len(calls) == 1
