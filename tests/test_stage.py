"""Atomic stage folders and the file-hash memo."""

import json

import pytest

from agelens.tasks.core.hashing import HashMemo
from agelens.tasks.core.stage import Job, read_result
from agelens.tasks.train import TrainSummary

SUMMARY = TrainSummary(best_epoch=1, best_val_loss=0.5, best_val_acc=0.8, epochs=1, resumed_from_epoch=0,
                       train_images=10, val_images=4, device="cpu", bf16=False, training_seconds=1.0,
                       train_images_per_s=10.0)


def test_stage_folder_appears_complete_or_not_at_all(tmp_path):
    job = Job(stage="train", key="abc", out=str(tmp_path), components={"settings": {"epochs": 3}})
    with pytest.raises(RuntimeError):
        with job.output() as out:
            out.path("model.pt").write_bytes(b"half")
            raise RuntimeError("killed")
    assert not job.folder.exists() and list((tmp_path / "train").iterdir()) == []

    job.scratch.mkdir()
    (job.scratch / "checkpoint.pt").write_bytes(b"resume me")
    with job.output() as out:
        out.path("model.pt").write_bytes(b"weights")
        out.path("timings.csv").write_text("epoch,seconds\n1,2.5\n")
        out.add("model", "model.pt")
        out.add("timings", "timings.csv", keyed=False)
        result = out.finish(SUMMARY, meta={"classes": ["a", "b"]})
        assert not job.folder.exists()
    assert (job.folder / "model.pt").read_bytes() == b"weights" and not job.scratch.exists()
    assert json.loads((job.folder / "parameters.json").read_text()) == {"settings": {"epochs": 3}}
    assert read_result(tmp_path, "train", "abc") == result
    assert "sha256" in result["outputs"]["model"] and "sha256" not in result["outputs"]["timings"]


def test_file_hashes_are_remembered_by_size_and_mtime(tmp_path, monkeypatch):
    import agelens.tasks.core.hashing as hashing

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
