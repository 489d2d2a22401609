import pandas as pd
import pytest

from agelens.tasks.core.errors import DataError
from agelens.tasks.data.validation import validate
from agelens.tasks.data.labels import decade_label, label_order
from agelens.tasks.data.sources import Listing


def table(rows):
    return pd.DataFrame(rows, columns=["path", "age", "identity"])


def test_decade_labels_fold_100_and_over():
    assert [decade_label(a) for a in (0, 9, 14, 19, 20, 62, 99, 100, 120)] == \
        ["0s", "0s", "10s", "10s", "20s", "60s", "90s", "100s", "100s"]
    assert label_order({"100s", "20s", "10s", "young"}) == ["10s", "20s", "100s", "young"]


def test_each_validation_reason_is_counted_and_rows_kept_in_order():
    raw = table([
        ["a.jpg", 23, 1], ["/etc/passwd", 30, 1], ["../up.jpg", 30, 2], ["x/../../y.jpg", 30, 2],
        ["old.jpg", 121, 3], ["neg.jpg", -1, 3], ["nan.jpg", None, 3], ["a.jpg", 23, 1],
        ["gone.jpg", 40, 4], ["b.jpg", 61, 5],
    ])
    available = {"a.jpg", "b.jpg", "old.jpg", "neg.jpg", "nan.jpg"}
    kept, summary = validate(raw, Listing(available, set()))
    assert kept["path"].tolist() == ["a.jpg", "b.jpg"]
    assert kept["label"].tolist() == ["20s", "60s"]
    assert kept["class_index"].tolist() == [0, 1]
    assert summary["dropped"] == {"unsafe_path": 3, "age_out_of_range": 3, "duplicate_path": 1,
                                  "symlink_outside_root": 0, "not_a_regular_file": 0, "missing_image": 1}
    assert summary["dropped_examples"]["missing_image"] == ["gone.jpg"]
    assert summary["rows_in"] == 10 and summary["rows_out"] == 2
    assert summary["per_class"] == {"20s": 1, "60s": 1}


def test_zero_usable_rows_stops_with_the_reasons():
    raw = table([["a.jpg", 200, 1], ["b.jpg", 30, 1]])
    with pytest.raises(DataError, match="no usable rows among 2: 1 age out of range, 1 missing image"):
        validate(raw, Listing({"a.jpg"}, set()))


def test_identity_falls_back_to_cacd_file_names_then_to_each_image():
    raw = pd.DataFrame({"path": ["23_Ann_Lee_0001.jpg", "35_Ann_Lee_0002.jpg"], "age": [23, 35]})
    kept, summary = validate(raw, Listing(set(raw["path"]), set()))
    assert kept["identity"].tolist() == ["Ann_Lee", "Ann_Lee"] and summary["identity_source"] == "file name"
    raw = pd.DataFrame({"path": ["a.jpg", "b.jpg"], "age": [23, 35]})
    kept, summary = validate(raw, Listing(set(raw["path"]), set()))
    assert kept["identity"].tolist() == ["a.jpg", "b.jpg"] and summary["identity_source"].startswith("none")


def test_a_single_class_is_an_error_that_says_why():
    raw = table([["a.jpg", 23, 1], ["b.jpg", 27, 2], ["c.jpg", 120, 3]])
    with pytest.raises(DataError, match="every usable image is in class 20s: a classifier needs at least two classes"):
        validate(raw, Listing({"a.jpg", "b.jpg"}, set()))
