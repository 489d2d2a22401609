"""Stage 1: metadata -> one validated Parquet row per image."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import get_run_logger, task

from tasks.report import publish_extract
from tasks.sources import CACD_FILE, DECADE, DataError, read_source
from tasks.stage import StageKey, task_output, write_json

MAX_AGE = 120
UNSAFE = re.compile(r"(?:^|[/\\])\.\.(?:[/\\]|$)")


def decade_label(age: int) -> str:
    """14 -> '10s'; every age of 100 or more folds into '100s'."""
    return f"{min(int(age), 100) // 10 * 10}s"


def label_order(labels) -> list[str]:
    """Decades in numeric order, any other labels after them alphabetically."""
    labels = set(labels)
    decades = sorted((label for label in labels if DECADE.match(label)), key=lambda label: int(label[:-1]))
    return decades + sorted(labels - set(decades))


def list_images(root: Path) -> set[str]:
    """Every file below `root`, as '/'-separated relative paths; one walk, no stat per file."""
    found = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        prefix = os.path.relpath(folder, root).replace(os.sep, "/")
        prefix = "" if prefix == "." else prefix + "/"
        found.update(prefix + name for name in files)
    return found


def _identities(table: pd.DataFrame) -> tuple[pd.Series, str]:
    if "identity" in table.columns and table["identity"].notna().all():
        return table["identity"].astype(str), "metadata"
    names = table["path"].str.rsplit("/", n=1).str[-1].str.extract(CACD_FILE)[1]
    if names.notna().all():
        return names, "file name"
    return table["path"], "none: each image is its own identity"


def validate(raw: pd.DataFrame, available: set[str]) -> tuple[pd.DataFrame, dict]:
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
    reasons["missing_image"] = ~path.isin(available)

    keep = pd.Series(True, index=table.index)
    dropped, examples = {}, {}
    for reason, bad in reasons.items():  # each row is counted under its first reason only
        hit = bad & keep
        dropped[reason] = int(hit.sum())
        examples[reason] = path[hit].head(5).tolist()
        keep &= ~hit
    table = table[keep].reset_index(drop=True)
    if table.empty:
        raise DataError(
            "no usable rows: " + ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in dropped.items() if n)
        )
    if "label" not in table.columns:
        table["age"] = table["age"].astype(np.int64)
        table["label"] = [decade_label(a) for a in table["age"]]
    classes = label_order(table["label"])
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
    }
    return table, summary


@task(name="extract", cache_key_fn=StageKey("extract", ("tasks.extract", "tasks.sources")),
      persist_result=True, result_serializer="json")
def extract_metadata(source: dict, images: dict, fmt: str, out: str) -> dict:
    """Read the metadata, validate it against the image folder, write `metadata.parquet`."""
    log = get_run_logger()
    raw = read_source(Path(source["path"]), fmt)
    table, summary = validate(raw, list_images(Path(images["path"])))
    summary["source_format"] = fmt
    for reason, count in summary["dropped"].items():
        if count:
            log.warning("dropped %d rows: %s (e.g. %s)", count, reason.replace("_", " "),
                        ", ".join(summary["dropped_examples"][reason][:3]))
    log.info("kept %d of %d rows, %d classes, %d identities", summary["rows_out"], summary["rows_in"],
             len(summary["classes"]), summary["identities"])
    with task_output() as out_dir:
        table.to_parquet(out_dir.path("metadata.parquet"), index=False)
        write_json(out_dir.path("summary.json"), summary)
        publish_extract(summary)
        return {"summary": summary, "outputs": {"metadata": out_dir.handle("metadata.parquet")},
                "image_root": images["path"], "dir": str(out_dir.final)}
