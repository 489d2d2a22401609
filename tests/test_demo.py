import hashlib

import numpy as np
import scipy.io

from agelens.tasks.data.demo import DemoSpec, draw_face, plan_demo, write_demo
from agelens.tasks.data.labels import decade_label
from tests.conftest import REAL_META, SMALL

IMAGE_FIELDS = [("age", "uint8"), ("identity", "uint16"), ("year", "uint16"), ("feature", "uint8"),
                ("rank", "uint8"), ("lfw", "uint8"), ("birth", "uint16"), ("name", "object")]
PEOPLE_FIELDS = [("name", "object"), ("identity", "int32"), ("birth", "int32"), ("rank", "int32"), ("lfw", "int32")]


def schema(path):
    mat = scipy.io.loadmat(path)
    out = {}
    for struct in ("celebrityImageData", "celebrityData"):
        record = mat[struct][0, 0]
        out[struct] = [(f, str(record[f].dtype)) for f in record.dtype.names]
    return out


def test_demo_mat_has_the_cacd_schema(small_cacd):
    demo = schema(small_cacd / "celebrity2000_meta.mat")
    assert demo == {"celebrityImageData": IMAGE_FIELDS, "celebrityData": PEOPLE_FIELDS}
    if REAL_META.exists():  # the documented schema is the real file's
        assert schema(REAL_META) == demo


def test_demo_is_deterministic_and_named_like_cacd(small_cacd_master, tmp_path):
    write_demo(tmp_path, SMALL)
    first = sorted(p.name for p in (tmp_path / "CACD2000").iterdir())
    assert first == sorted(p.name for p in (small_cacd_master / "CACD2000").iterdir())
    for name in first[:5]:
        a = (tmp_path / "CACD2000" / name).read_bytes()
        b = (small_cacd_master / "CACD2000" / name).read_bytes()
        assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest()
    age, first_name, last_name, number = first[0][:-4].split("_")
    assert age.isdigit() and number.isdigit() and len(number) == 4


def test_default_demo_fills_all_six_decades():
    counts = {}
    for row in plan_demo(DemoSpec()):
        counts[decade_label(row["age"])] = counts.get(decade_label(row["age"]), 0) + 1
    assert sorted(counts, key=lambda c: int(c[:-1])) == ["10s", "20s", "30s", "40s", "50s", "60s"]
    assert min(counts.values()) >= 200  # the reference's per_class


def test_people_span_ages_and_pictures_change_with_age(small_rows):
    by_person = {}
    for row in small_rows:
        by_person.setdefault(row["identity"], set()).add(row["age"])
    assert np.mean([max(a) - min(a) >= 3 for a in by_person.values()]) > 0.5
    young = np.asarray(draw_face(15, 1, np.random.default_rng(0)), float)
    old = np.asarray(draw_face(65, 1, np.random.default_rng(0)), float)
    assert young.shape == (250, 250, 3)
    assert np.abs(young - old).mean() > 5  # same person, same pose: age alone changes the picture
