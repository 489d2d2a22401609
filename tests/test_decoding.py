"""Decoding into the array in bounded memory, and reading it back in batches."""

import numpy as np
import pytest
import torch
from PIL import Image

from agelens.tasks.data.arrays import batch_rows, batches
from agelens.tasks.data.decoding import decode_into, decode_one
from agelens.tasks.model.training import epoch_plan


@pytest.fixture
def folder(tmp_path):
    """40 PNGs of known pixels (lossless), every 7th replaced by garbage."""
    rng = np.random.default_rng(0)
    names, pixels = [], []
    for i in range(40):
        name = f"img_{i:02d}.png"
        image = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        if i % 7 == 3:
            (tmp_path / name).write_bytes(b"not an image")
        else:
            Image.fromarray(image).save(tmp_path / name)
            pixels.append(image)
        names.append(name)
    return tmp_path, names, pixels


def test_undecodable_images_are_left_out_and_the_rest_keep_order_and_content(folder):
    root, names, pixels = folder
    seen = []
    ok = decode_into(root / "images.u8", names, root, 16, threads=3, on_progress=seen.append)
    assert ok.tolist() == [i % 7 != 3 for i in range(40)]
    array = np.fromfile(root / "images.u8", dtype=np.uint8).reshape(-1, 16, 16, 3)
    assert len(array) == ok.sum() == len(pixels)
    np.testing.assert_array_equal(array, np.stack(pixels))
    assert seen[-1] == 40 and seen == sorted(seen)


def test_jpeg_draft_mode_shrinks_to_the_requested_size(tmp_path):
    face = Image.fromarray(np.random.default_rng(1).integers(0, 255, (250, 250, 3), dtype=np.uint8))
    face.save(tmp_path / "face.jpg", quality=90)
    for size in (224, 112, 64):
        assert decode_one(tmp_path / "face.jpg", size).shape == (size, size, 3)
    assert decode_one(tmp_path / "missing.jpg", 64) is None


def test_batches_yield_exactly_the_rows_asked_for_in_the_seeded_order():
    array = np.arange(50 * 2 * 2 * 3, dtype=np.uint8).reshape(50, 2, 2, 3) % 251
    split_rows = np.array([1, 4, 5, 9, 12, 13, 20, 21, 30, 33, 41, 47, 48])
    plans = [epoch_plan(split_rows, 4, None, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert all(np.array_equal(a, b) for a, b in zip(*plans))  # seeded
    plan = plans[0]
    assert all(np.array_equal(b, np.sort(b)) for b in plan)  # each batch read forwards
    got = list(batches(array, plan, torch.device("cpu"), prefetch=2))
    assert [rows.tolist() for rows, _ in got] == [b.tolist() for b in plan]
    assert sorted(np.concatenate([rows for rows, _ in got]).tolist()) == split_rows.tolist()
    for rows, batch in got:
        assert torch.equal(batch, torch.from_numpy(array[rows]))
    assert len(epoch_plan(split_rows, 4, 2, torch.Generator().manual_seed(7))) == 2  # --max-steps
    assert [len(b) for b in batch_rows(split_rows, 5)] == [5, 5, 3]


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    grey = np.full((20, 20), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert abs(int(decode_one(tmp_path / "g16.png", 8).mean()) - 128) <= 1
    Image.fromarray(np.full((20, 20), 0.25, dtype=np.float32)).save(tmp_path / "f.tiff")
    assert abs(int(decode_one(tmp_path / "f.tiff", 8).mean()) - 64) <= 1


def test_a_full_disk_is_one_clear_error(tmp_path, monkeypatch):
    import errno
    import os
    import shutil
    from collections import namedtuple

    import agelens.tasks.data.decoding as decoding
    from agelens.tasks.core.errors import DataError

    paths = []
    for i in range(40):
        Image.new("RGB", (10, 10), (i, i, i)).save(tmp_path / f"{i}.png")
        paths.append(f"{i}.png")
    real = os.pwrite
    calls = []

    def full(fd, data, offset):
        calls.append(offset)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(decoding.os, "pwrite", full)
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match=f"the disk holding {tmp_path / 'out'} is full: decoding needs 0.00 GB there"):
        decode_into(tmp_path / "out" / "a.u8", paths, tmp_path, 16, 2)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DataError, match=r"not enough disk space in .*: decoding 40 images at 224 px needs 0.01 GB, "
                                        r"0.00 GB are free"):
        decoding.check_space(tmp_path / "out", 40, 224)
