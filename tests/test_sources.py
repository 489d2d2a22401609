import os
from pathlib import Path

import pandas as pd
import pytest

from agelens.tasks.core.errors import DataError
from agelens.tasks.data.validation import validate
from agelens.tasks.data.sources import detect_format, list_images, read_source
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


def _faces(root: Path, names: list[str]) -> None:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (8, 8), (90, 90, 90)).save(root / name)


def test_file_names_that_are_not_utf8_are_skipped_and_counted(prefect_backend, tmp_path):
    from agelens.flows.pipeline.flow import age_pipeline
    from agelens.flows.pipeline.settings import RunSettings

    for label in ("10s", "20s"):
        _faces(tmp_path / "folders" / label, ["a.png", "b.png"])
    def write_bad(folder: Path) -> None:  # a name in Latin-1, as an old camera or archive may leave
        with open(os.fsencode(folder) + b"/\xff\xfeodd.png", "wb") as handle:
            handle.write(b"x")

    write_bad(tmp_path / "folders" / "10s")
    (tmp_path / "folders" / "30s").mkdir()  # a label folder whose name is fine, holding a bad name only
    write_bad(tmp_path / "folders" / "30s")
    listing = list_images(tmp_path / "folders")
    assert listing.files == {"10s/a.png", "10s/b.png", "20s/a.png", "20s/b.png"}
    assert listing.bad_names == ("10s/\\xff\\xfeodd.png", "30s/\\xff\\xfeodd.png")
    result = age_pipeline(settings=RunSettings(data=str(tmp_path / "folders"), out=str(tmp_path / "o"), until="split",
                                               per_class=2, val_frac=0.5))
    summary = result["stages"]["extract"]["summary"]
    assert summary["rows_out"] == 4 and summary["skipped_name_count"] == 2

    _faces(tmp_path / "csv" / "faces", ["a.png", "b.png", "c.png", "d.png"])
    write_bad(tmp_path / "csv" / "faces")
    (tmp_path / "csv" / "labels.csv").write_text("path,age\nfaces/a.png,15\nfaces/b.png,17\nfaces/c.png,25\n"
                                                 "faces/d.png,27\n")
    result = age_pipeline(settings=RunSettings(data=str(tmp_path / "csv" / "labels.csv"), out=str(tmp_path / "o"),
                                               until="extract"))
    assert result["stages"]["extract"]["summary"]["rows_out"] == 4


def test_a_csv_header_is_read_whatever_the_bytes_after_it(tmp_path):
    """A multi-byte character cut by the amount read to recognise the format must not matter."""
    header = b"path,age,note\n"
    for cut in (4096, 65536):
        for pad in (0, 1):  # one of the two puts the cut inside a two-byte character
            raw = header + b"faces/a.jpg,30," + b"a" * pad + "é".encode() * cut + b"\n"
            if raw[cut] == "é".encode()[1]:
                break
        assert raw[cut - 1:cut + 1] == "é".encode()
        (tmp_path / "labels.csv").write_bytes(raw)
        assert detect_format(tmp_path / "labels.csv") == "csv"


def test_special_files_are_never_read(tmp_path):
    import os

    _faces(tmp_path / "faces", ["a.png", "b.png", "c.png"])
    os.mkfifo(tmp_path / "faces" / "pipe.png")
    (tmp_path / "faces" / "link.png").symlink_to(tmp_path / "faces" / "pipe.png")
    listing = list_images(tmp_path / "faces")
    assert listing.files == {"a.png", "b.png", "c.png"} and listing.special == {"pipe.png", "link.png"}
    raw = pd.DataFrame({"path": ["a.png", "b.png", "c.png", "pipe.png", "link.png"], "age": [15, 25, 35, 45, 55]})
    table, summary = validate(raw, listing)
    assert summary["dropped"]["not_a_regular_file"] == 2 and len(table) == 3
    os.mkfifo(tmp_path / "meta.csv")
    with pytest.raises(DataError, match="is not a regular file"):
        detect_format(tmp_path / "meta.csv")
    from agelens.tasks.core.hashing import HashMemo

    with HashMemo(None) as memo, pytest.raises(OSError, match="not a regular file"):
        memo.file(tmp_path / "faces" / "pipe.png")


def test_output_folders_inside_the_image_root_are_not_listed(tmp_path):
    _faces(tmp_path / "ds" / "faces", ["a.png"])
    _faces(tmp_path / "ds" / "artifacts" / "explain", ["strip_0.png"])
    (tmp_path / "ds" / "artifacts" / ".agelens").mkdir()
    _faces(tmp_path / "ds" / "mine", ["b.png"])
    assert list_images(tmp_path / "ds").files == {"faces/a.png", "mine/b.png"}
    assert list_images(tmp_path / "ds", exclude=[tmp_path / "ds" / "mine"]).files == {"faces/a.png"}


def test_a_header_only_csv_says_so(tmp_path):
    (tmp_path / "labels.csv").write_text("path,age\n")
    with pytest.raises(DataError, match=r"the metadata has no rows \(a header and nothing else\?\)"):
        validate(read_source(tmp_path / "labels.csv", "csv"), list_images(tmp_path))
