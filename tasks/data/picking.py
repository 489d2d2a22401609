"""Which decoded images a stage looks at (rows of the decoded array)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def first_per_class(index: pd.DataFrame, split: str, classes: list[str], per_class: int) -> dict[str, np.ndarray]:
    """Rows of the first `per_class` images (by path) of each class in `split`; classes
    without such images are left out."""
    rows = index[index["split"] == split].sort_values("path")
    picked = {c: rows.index[rows["label"] == c].to_numpy()[:per_class] for c in classes}
    return {c: r for c, r in picked.items() if len(r)}


def stratified(index: pd.DataFrame, splits: tuple[str, ...], limit: int, seed: int) -> np.ndarray:
    """Sorted rows of at most `limit` images of `splits`, each class in proportion, drawn by `seed`."""
    pool = index[index["split"].isin(splits)]
    if len(pool) <= limit:
        return pool.index.to_numpy()
    drawn = pool.groupby("label", group_keys=False).sample(frac=limit / len(pool), random_state=seed)
    return np.sort(drawn.index.to_numpy())
