"""A stratified sample per class, split into train/val/test by identity or by image.

The test split is decided first and on its own: an identity (or, split by image, an image) is in
test when a seeded hash of its name falls below `test_frac`. That decision never depends on the
other rows, so a data set that grows never moves a test identity into train or val, and a model
trained earlier never saw any of today's test images. Train and val then divide the rest, each
class close to its share (by identity: a greedy assignment; by image: a stratified shuffle).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

# A test split needs this many drawn images in every class, or its per-class numbers mean little.
MIN_PER_CLASS_FOR_TEST = 20

SPLITS = ("train", "val", "test")


def sample_per_class(table: pd.DataFrame, per_class: int | str, seed: int) -> tuple[pd.DataFrame, list[str]]:
    """`per_class` rows of each label, chosen by `seed`; a smaller class keeps all rows,
    and so does every class with per_class 'all'."""
    table = table.sort_values("path", kind="stable").reset_index(drop=True)  # input order must not matter
    if per_class == "all":
        return table.sort_values(["class_index", "path"], kind="stable").reset_index(drop=True), []
    rng = np.random.default_rng(seed)
    picked, warnings = [], []
    for label, rows in table.groupby("class_index", sort=True):
        name = rows["label"].iloc[0]
        if len(rows) < per_class:
            warnings.append(f"class {name} has {len(rows)} images, fewer than per_class={per_class}: keeping all")
            picked.append(rows)
        else:
            picked.append(rows.iloc[np.sort(rng.choice(len(rows), per_class, replace=False))])
    return pd.concat(picked, ignore_index=True), warnings


def split_fractions(val_frac: float, test_frac: float) -> dict[str, float]:
    return {"train": 1.0 - val_frac - test_frac, "val": val_frac, "test": test_frac}


def hash_unit(seed: int, names: pd.Series) -> np.ndarray:
    """A number in [0, 1) per name, fixed by (seed, name) alone."""
    return np.array([int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "big") / 2**64
                     for name in names.astype(str)])


def in_test(table: pd.DataFrame, split_by: str, test_frac: float, seed: int) -> np.ndarray:
    """Which rows are test rows: their identity's (or image's) hash is below test_frac."""
    names = table["identity"] if split_by == "identity" else table["path"]
    return hash_unit(seed, names) < test_frac


def assign_by_identity(table: pd.DataFrame, fractions: dict[str, float], seed: int) -> np.ndarray:
    """Split label per row such that every identity lies in exactly one split and each
    class is divided close to `fractions`.

    Written here because scikit-learn's StratifiedGroupKFold only makes 1/k folds and
    GroupShuffleSplit ignores the classes. Greedy, largest identities first: each goes
    to the split whose per-class shortfall it fills best.
    """
    splits = [s for s in SPLITS if fractions[s] > 0]
    groups, group_of_row = np.unique(table["identity"].to_numpy(), return_inverse=True)
    n_classes = int(table["class_index"].max()) + 1
    counts = np.zeros((len(groups), n_classes))
    np.add.at(counts, (group_of_row, table["class_index"].to_numpy()), 1)
    class_total = counts.sum(0)
    target = np.array([[fractions[s]] for s in splits]) * class_total
    filled = np.zeros_like(target)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(groups))
    order = order[np.argsort(-counts[order].sum(1), kind="stable")]
    split_of_group = np.empty(len(groups), dtype=int)
    weight = 1.0 / np.maximum(class_total, 1)
    for g in order:
        v = counts[g]
        cost = ((2 * (filled - target) + v) * v * weight).sum(1)
        best = int(np.argmin(cost))
        split_of_group[g] = best
        filled[best] += v
    return np.array(splits)[split_of_group[group_of_row]]


def assign_by_image(table: pd.DataFrame, fractions: dict[str, float], seed: int) -> np.ndarray:
    """The reference's split: images shuffled per class, ignoring who is in them."""
    result = np.full(len(table), "train", dtype=object)
    rest = np.arange(len(table))
    labels = table["class_index"].to_numpy()
    remaining = 1.0
    for name in ("test", "val"):
        if fractions[name] > 0:
            rest, held = train_test_split(rest, test_size=fractions[name] / remaining,
                                          stratify=labels[rest], random_state=seed)
            result[held] = name
            remaining -= fractions[name]
    return result.astype(str)


def split_summary(manifest: pd.DataFrame, classes: list[str]) -> dict:
    per_split = {
        split: {c: int(n) for c, n in rows["label"].value_counts().reindex(classes, fill_value=0).items()}
        for split, rows in manifest.groupby("split", sort=False)
    }
    splits_per_identity = manifest.groupby("identity")["split"].nunique()
    return {
        "images": int(len(manifest)),
        "per_class": {c: int(n) for c, n in manifest["label"].value_counts().reindex(classes, fill_value=0).items()},
        "per_class_per_split": {s: per_split[s] for s in SPLITS if s in per_split},
        "identities_per_split": {s: int(manifest.loc[manifest["split"] == s, "identity"].nunique())
                                 for s in SPLITS if s in per_split},
        "shared_identities": int((splits_per_identity > 1).sum()),
    }


MIN_TRAIN_PER_CLASS = 10  # fewer training images of a class than this is said


def make_manifest(table: pd.DataFrame, classes: list[str], per_class: int | str, seed: int, split_by: str,
                  val_frac: float, test_frac: float) -> tuple[pd.DataFrame, dict]:
    sampled, warnings = sample_per_class(table, per_class, seed)
    counts = sampled["label"].value_counts()
    small = {c: int(counts.get(c, 0)) for c in classes if counts.get(c, 0) < MIN_PER_CLASS_FOR_TEST}
    if test_frac > 0 and small:
        warnings.append(f"no test split: {', '.join(f'class {c} has {n} images' for c, n in small.items())}, fewer "
                        f"than the {MIN_PER_CLASS_FOR_TEST} per class a test split needs; reported metrics are "
                        "validation metrics")
        test_frac = 0.0
    test = in_test(sampled, split_by, test_frac, seed) if test_frac > 0 else np.zeros(len(sampled), bool)
    rest = sampled[~test].reset_index(drop=True)
    fractions = split_fractions(val_frac / (1 - test_frac), 0.0)
    assign = assign_by_identity if split_by == "identity" else assign_by_image
    split = np.full(len(sampled), "test", dtype=object)
    split[~test] = assign(rest, fractions, seed) if len(rest) else []
    sampled["split"] = split.astype(str)
    summary = split_summary(sampled, classes)
    few = {c: n for c, n in summary["per_class_per_split"].get("train", {}).items() if n < MIN_TRAIN_PER_CLASS}
    if few:
        warnings.append(f"only {', '.join(f'{n} training images of class {c}' for c, n in few.items())}: val_frac "
                        f"{val_frac} and test_frac {test_frac} leave little to train on")
    summary.update(split_by=split_by, warnings=warnings, test_frac=test_frac)
    return sampled, summary
