"""Class labels: decades from ages, their order, and their numeric values."""

from __future__ import annotations

import re

DECADE = re.compile(r"^(\d+)0s$")


def decade_label(age: int) -> str:
    """14 -> '10s'; every age of 100 or more folds into '100s'."""
    return f"{min(int(age), 100) // 10 * 10}s"


def label_order(labels) -> list[str]:
    """Decades in numeric order, any other labels after them alphabetically."""
    labels = set(labels)
    decades = sorted((label for label in labels if DECADE.match(label)), key=lambda label: int(label[:-1]))
    return decades + sorted(labels - set(decades))


def decade_values(classes: list[str]) -> list[float] | None:
    """Numeric decade of each class ('20s' -> 20), or None when the labels are not decades."""
    if not all(DECADE.match(c) for c in classes):
        return None
    return [float(c[:-1]) for c in classes]
