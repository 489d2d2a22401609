import numpy as np
import pandas as pd
import pytest

from agelens.tasks.data.validation import validate
from agelens.tasks.data.sources import Listing
from agelens.tasks.data.splitting import make_manifest

CLASSES = ["10s", "20s", "30s", "40s", "50s", "60s"]


@pytest.fixture(scope="module")
def table():
    """600 images of 60 people; each person spans two neighbouring decades."""
    rng = np.random.default_rng(1)
    rows = []
    for person in range(60):
        start = 14 + (person % 6) * 9
        for k in range(10):
            rows.append({"path": f"p{person}_{k}.jpg", "age": int(start + rng.integers(0, 9)), "identity": person})
    raw = pd.DataFrame(rows)
    kept, _ = validate(raw, Listing(set(raw["path"]), set()))
    return kept


def test_identity_split_is_disjoint_stratified_and_deterministic(table):
    manifest, summary = make_manifest(table, CLASSES, per_class=60, seed=7, split_by="identity",
                                      val_frac=0.2, test_frac=0.0)
    again, _ = make_manifest(table.sample(frac=1, random_state=3), CLASSES, 60, 7, "identity", 0.2, 0.0)
    pd.testing.assert_frame_equal(manifest, again)
    assert manifest.groupby("identity")["split"].nunique().max() == 1
    assert summary["shared_identities"] == 0
    per_class = pd.crosstab(manifest["label"], manifest["split"])
    assert (per_class.sum(axis=1) <= 60).all()
    val_share = per_class["val"] / per_class.sum(axis=1)
    assert val_share.between(0.05, 0.4).all(), val_share  # whole people move, so only roughly 20%
    assert abs(per_class["val"].sum() / len(manifest) - 0.2) < 0.05
    assert summary["per_class_per_split"]["val"] == per_class["val"].reindex(CLASSES, fill_value=0).to_dict()


def test_other_seed_gives_other_sample(table):
    a, _ = make_manifest(table, CLASSES, 40, 1, "identity", 0.2, 0.0)
    b, _ = make_manifest(table, CLASSES, 40, 2, "identity", 0.2, 0.0)
    assert set(a["path"]) != set(b["path"])


def test_small_class_keeps_all_and_warns(table):
    counts = table["label"].value_counts()
    manifest, summary = make_manifest(table, CLASSES, per_class=int(counts.max()), seed=0, split_by="identity",
                                      val_frac=0.2, test_frac=0.0)
    assert len(manifest) == len(table)
    smaller = [c for c in CLASSES if counts[c] < counts.max()]
    assert len(summary["warnings"]) == len(smaller) and all("keeping all" in w for w in summary["warnings"])


def test_image_split_reproduces_reference_leak_and_test_fraction(table):
    manifest, summary = make_manifest(table, CLASSES, 60, 0, "image", val_frac=0.2, test_frac=0.1)
    shares = manifest["split"].value_counts(normalize=True)
    assert abs(shares["val"] - 0.2) < 0.02 and abs(shares["test"] - 0.1) < 0.02
    assert summary["shared_identities"] > 0  # the reference's fault, kept for comparison
    ident, ident_summary = make_manifest(table, CLASSES, 60, 0, "identity", val_frac=0.2, test_frac=0.1)
    assert set(ident["split"]) == {"train", "val", "test"} and ident_summary["shared_identities"] == 0


def test_all_takes_every_image_without_warnings(table):
    manifest, summary = make_manifest(table, CLASSES, "all", 0, "identity", 0.2, 0.0)
    assert len(manifest) == len(table) and summary["warnings"] == []
    assert summary["per_class"] == table["label"].value_counts().reindex(CLASSES).to_dict()


def _people(count: int, images: int, start: int = 0, seed: int = 0) -> pd.DataFrame:
    """`count` people with `images` photos each over a decade or two."""
    rng = np.random.default_rng(seed)
    rows = [{"path": f"p{person}_{k}.jpg", "age": int(14 + (person % 6) * 9 + rng.integers(0, 9)), "identity": person}
            for person in range(start, start + count) for k in range(images)]
    raw = pd.DataFrame(rows)
    return validate(raw, Listing(set(raw["path"]), set()))[0]


@pytest.mark.parametrize("split_by", ["identity", "image"])
def test_the_test_split_is_stable_as_the_data_grows(split_by):
    before = _people(120, 6)
    grown = pd.concat([before, _people(120, 6, start=120, seed=1),  # new people ...
                       _people(120, 3, seed=2).assign(path=lambda t: t["path"].str.replace(".jpg", "_new.jpg"))])
    grown = validate(grown[["path", "age", "identity"]], Listing(set(grown["path"]), set()))[0]  # ... and new photos
    first, summary = make_manifest(before, CLASSES, "all", 3, split_by, 0.2, 0.15)
    second, _ = make_manifest(grown, CLASSES, "all", 3, split_by, 0.2, 0.15)
    key = "identity" if split_by == "identity" else "path"
    was_test = set(first.loc[first["split"] == "test", key])
    now = second.set_index("path")["split"]
    assert was_test and summary["test_frac"] == 0.15
    for name in was_test:  # every test identity's (image's) rows, old and new, are still test
        rows = second[second[key] == name]
        assert len(rows) and (rows["split"] == "test").all(), name
    was_trained = set(first.loc[first["split"] != "test", key])
    assert not was_trained & set(second.loc[second["split"] == "test", key])  # nothing seen in training joins test
    share = (second["split"] == "test").groupby(second["label"]).mean()
    assert share.between(0.05, 0.3).all(), share  # each class keeps about its share
    assert abs((second["split"] == "test").mean() - 0.15) < 0.05
    assert now.loc[first.loc[first["split"] == "test", "path"]].eq("test").all()


def test_small_classes_get_no_test_split_and_say_so():
    manifest, summary = make_manifest(_people(12, 6), CLASSES, 10, 0, "identity", 0.2, 0.15)
    assert "test" not in set(manifest["split"]) and summary["test_frac"] == 0.0
    assert summary["warnings"][-1].startswith("no test split: class 10s has 10 images")
