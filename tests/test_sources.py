from pathlib import Path

import pandas as pd
import pytest

from tasks.core.errors import DataError
from tasks.data.validation import validate
from tasks.data.sources import detect_format, list_images, read_source
from tests.conftest import write_mat_v73


def test_mat_v5_reads_every_image_with_person_names(small_cacd, small_rows):
    meta = small_cacd / "celebrity2000_meta.mat"
    assert detect_format(meta) == "mat-v5"
    table = read_source(meta, "mat-v5")
    assert len(table) == len(small_rows)
    assert table["path"].tolist() == [r["file"] for r in small_rows]
    assert table["age"].tolist() == [r["age"] for r in small_rows]
    assert table["name"].tolist() == [r["name"] for r in small_rows]
    assert {"identity", "year", "birth", "rank", "lfw"} <= set(table.columns)


def test_mat_v73_is_detected_by_content_and_matches_v5(small_cacd, small_rows, tmp_path):
    v73 = tmp_path / "celebrity2000.data"  # extension says nothing
    write_mat_v73(v73, small_rows)
    assert detect_format(v73) == "mat-v73"
    table = read_source(v73, "mat-v73")
    v5 = read_source(small_cacd / "celebrity2000_meta.mat", "mat-v5")
    pd.testing.assert_frame_equal(table, v5)


def test_csv_source_with_and_without_identity(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    csv = tmp_path / "labels.txt"
    csv.write_text("path,age,identity\na.jpg,23,p1\n")
    assert detect_format(csv) == "csv"
    table = read_source(csv, "csv")
    assert table.to_dict("records") == [{"path": "a.jpg", "age": 23, "identity": "p1"}]
    csv.write_text("age,path\n31,a.jpg\n")
    assert read_source(csv, "csv")["age"].tolist() == [31]


def test_label_folders_map_decade_names(tmp_path):
    for label, n in (("20s", 2), ("60s", 1)):
        (tmp_path / label).mkdir()
        for i in range(n):
            (tmp_path / label / f"{i}.jpg").write_bytes(b"x")
    (tmp_path / "20s" / "notes.txt").write_text("not an image")
    assert detect_format(tmp_path) == "folders"
    raw = read_source(tmp_path, "folders")
    table, summary = validate(raw, list_images(tmp_path))
    assert summary["classes"] == ["20s", "60s"]
    assert sorted(table["path"]) == ["20s/0.jpg", "20s/1.jpg", "60s/0.jpg"]
    assert table.set_index("path")["class_index"].to_dict() == {"20s/0.jpg": 0, "20s/1.jpg": 0, "60s/0.jpg": 1}


@pytest.mark.parametrize("content, message", [
    (b"hello world\n", "unrecognised metadata"),
    (b"MATLAB 5.0 MAT-file, damaged" + b"\x00" * 200, "cannot read MATLAB file"),
])
def test_unusable_metadata_gives_one_clear_error(tmp_path, content, message):
    bad = tmp_path / "meta.mat"
    bad.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_source(bad, detect_format(bad))


def test_missing_metadata_and_unknown_struct(tmp_path):
    import numpy as np
    import scipy.io

    with pytest.raises(DataError, match="metadata not found"):
        detect_format(tmp_path / "nope.mat")
    other = tmp_path / "other.mat"
    scipy.io.savemat(other, {"somethingElse": np.ones(3)})
    with pytest.raises(DataError, match="no struct 'celebrityImageData'.*somethingElse"):
        read_source(other, detect_format(other))


def test_real_cacd_metadata_when_present():
    from tests.conftest import REAL_META

    if not REAL_META.exists():
        pytest.skip("the real CACD metadata is not in ../shared")
    table = read_source(REAL_META, "mat-v5")
    assert len(table) == 163_446
    assert (table["age"].min(), table["age"].max()) == (14, 62)
    assert table["path"].iloc[0] == "53_Robin_Williams_0001.jpg"
    assert table["name"].iloc[0] == "Robin_Williams"
    decades = (table["age"] // 10 * 10).value_counts().sort_index().tolist()
    assert decades == [7057, 39069, 43104, 40344, 30960, 2912]


def test_list_images_is_relative_and_recursive(tmp_path):
    (tmp_path / "x" / "y").mkdir(parents=True)
    (tmp_path / "x" / "y" / "a.jpg").write_bytes(b"")
    (tmp_path / "b.jpg").write_bytes(b"")
    assert list_images(tmp_path).files == {"x/y/a.jpg", "b.jpg"}
    assert list_images(Path(tmp_path / "x")).files == {"y/a.jpg"}


def test_symlinks_are_followed_only_inside_the_image_root(tmp_path):
    """A symlinked class folder inside the root is read; one leading outside is reported."""
    root, elsewhere = tmp_path / "faces", tmp_path / "elsewhere"
    for folder in (root / "20s", root / "shared", elsewhere):
        folder.mkdir(parents=True)
    for path in (root / "20s" / "a.jpg", root / "shared" / "b.jpg", elsewhere / "c.jpg"):
        path.write_bytes(b"x")
    (root / "30s").symlink_to(root / "shared")  # inside the root: followed
    (root / "40s").symlink_to(elsewhere)  # outside: reported, never read
    (root / "20s" / "d.jpg").symlink_to(elsewhere / "c.jpg")
    listing = list_images(root)
    assert listing.files == {"20s/a.jpg", "shared/b.jpg", "30s/b.jpg"}
    assert listing.outside_root == {"40s", "20s/d.jpg"}
    raw = read_source(root, "folders")
    table, summary = validate(raw, listing)
    assert sorted(table["path"]) == ["20s/a.jpg", "30s/b.jpg", "shared/b.jpg"]
    assert summary["dropped"]["symlink_outside_root"] == 2 and summary["dropped"]["missing_image"] == 0
    assert sorted(summary["dropped_examples"]["symlink_outside_root"]) == ["20s/d.jpg", "40s/c.jpg"]
