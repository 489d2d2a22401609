"""Validating metadata rows against the image folder: every dropped row counted by reason."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from agelens.tasks.core.errors import DataError
from agelens.tasks.data.labels import decade_label, label_order
from agelens.tasks.data.sources import CACD_FILE, Listing

MAX_AGE = 120
UNSAFE = re.compile(r"(?:^|[/\\])\.\.(?:[/\\]|$)")


def _identities(table: pd.DataFrame) -> tuple[pd.Series, str]:
    if "identity" in table.columns and table["identity"].notna().all():
        return table["identity"].astype(str), "metadata"
    names = table["path"].str.rsplit("/", n=1).str[-1].str.extract(CACD_FILE)[1]
    if names.notna().all():
        return names, "file name"
    return table["path"], "none: each image is its own identity"


def _through(paths: pd.Series, links: set[str]) -> pd.Series:
    """Which paths are one of `links` or lie below one."""
    if not links:
        return pd.Series(False, index=paths.index)
    prefixes = tuple(link + "/" for link in links)
    return paths.isin(links) | paths.str.startswith(prefixes)


def validate(raw: pd.DataFrame, listing: Listing) -> tuple[pd.DataFrame, dict]:
    """Drop unusable rows, counting each by reason; add label, class index and identity."""
    table = raw.copy()
    reasons: dict[str, pd.Series] = {}
    path = table["path"].astype(str)
    reasons["unsafe_path"] = (path == "") | path.str.startswith(("/", "\\")) | path.str.match(r"^[A-Za-z]:") \
        | path.str.contains(UNSAFE)
    if "age" in table.columns:
        age = pd.to_numeric(table["age"], errors="coerce")
        reasons["age_out_of_range"] = ~age.between(0, MAX_AGE)
    reasons["duplicate_path"] = path.duplicated()
    reasons["symlink_outside_root"] = _through(path, listing.outside_root)
    reasons["not_a_regular_file"] = path.isin(listing.special)
    reasons["missing_image"] = ~path.isin(listing.files)

    keep = pd.Series(True, index=table.index)
    dropped, examples = {}, {}
    for reason, bad in reasons.items():  # each row is counted under its first reason only
        hit = bad & keep
        dropped[reason] = int(hit.sum())
        examples[reason] = path[hit].head(5).tolist()
        keep &= ~hit
    table = table[keep].reset_index(drop=True)
    if raw.empty:
        raise DataError("the metadata has no rows (a header and nothing else?)")
    if table.empty:
        raise DataError(
            f"no usable rows among {len(raw)}: " + ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in dropped.items() if n)
        )
    if "label" not in table.columns:
        table["age"] = table["age"].astype(np.int64)
        table["label"] = [decade_label(a) for a in table["age"]]
    classes = label_order(table["label"])
    if len(classes) < 2:
        raise DataError(f"every usable image is in class {classes[0]}: a classifier needs at least two classes "
                        f"({len(table)} rows kept)")
    table["class_index"] = table["label"].map({c: i for i, c in enumerate(classes)}).astype(np.int64)
    table["identity"], identity_source = _identities(table)
    summary = {
        "rows_in": int(len(raw)),
        "rows_out": int(len(table)),
        "dropped": dropped,
        "dropped_examples": {r: e for r, e in examples.items() if e},
        "classes": classes,
        "per_class": {c: int(n) for c, n in table["label"].value_counts().reindex(classes).items()},
        "identities": int(table["identity"].nunique()),
        "identity_source": identity_source,
        "skipped_names": list(listing.bad_names[:5]),
        "skipped_name_count": len(listing.bad_names),
    }
    return table, summary
