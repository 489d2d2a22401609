"""Every Prefect artifact agelens publishes, with its stable key (versions accumulate across runs).

The flow publishes a run's tables and its report from the stored outputs at the end of every
run, cached stages included, so each flow run carries its own artifacts. Progress artifacts
are the exception: the decode and train stages update them while they work.
"""

from __future__ import annotations

import time

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

KEYS = {
    "extract": "agelens-extract-summary",
    "split": "agelens-split-counts",
    "history": "agelens-training-history",
    "training_progress": "agelens-training-progress",
    "decode_progress": "agelens-decode-progress",
    "classification": "agelens-classification-report-{split}",
    "confusion": "agelens-confusion-matrix-{split}",
    "faithfulness": "agelens-faithfulness",
    "randomisation": "agelens-randomisation",
    "runs": "agelens-runs",
    "report": "agelens-run-report",
}


def rounded(value, digits: int = 4):
    return round(value, digits) if isinstance(value, float) else value


class Progress:
    """A progress artifact, updated at most every `every` seconds (and at the end)."""

    def __init__(self, key: str, description: str, total: int, every: float = 2.0):
        self.total, self.every, self.last = max(total, 1), every, 0.0
        self.id = create_progress_artifact(progress=0.0, key=KEYS[key], description=description)

    def __call__(self, done: int, description: str) -> None:
        now = time.monotonic()
        if done >= self.total or now - self.last >= self.every:
            self.last = now
            update_progress_artifact(self.id, progress=100.0 * min(done, self.total) / self.total,
                                     description=description)


def extract_rows(summary: dict) -> list[dict]:
    return [{"measure": "rows in metadata", "value": summary["rows_in"]},
            {"measure": "rows kept", "value": summary["rows_out"]},
            *({"measure": f"dropped: {reason.replace('_', ' ')}", "value": n} for reason, n in summary["dropped"].items()),
            {"measure": "identities", "value": summary["identities"]},
            {"measure": "source format", "value": summary["source_format"]}]


def split_rows(summary: dict) -> list[dict]:
    per_split = summary["per_class_per_split"]
    classes = list(next(iter(per_split.values())))
    return [{"class": c, **{split: counts[c] for split, counts in per_split.items()}} for c in classes]


def class_report_rows(metrics: dict) -> list[dict]:
    return [{"class": c, **{k: rounded(v) for k, v in m.items()}} for c, m in metrics["per_class"].items()]


def confusion_rows(metrics: dict, classes: list[str]) -> list[dict]:
    return [{"actual": a, **{f"predicted {p}": round(metrics["confusion"][i][j], 3) for j, p in enumerate(classes)}}
            for i, a in enumerate(classes)]


def _decades(value) -> str:
    return "n/a (labels are not decades)" if value is None else f"{value:.3f}"


def publish_run(tables: dict, report: str | None) -> None:
    """This run's artifacts. `tables` holds what the run reached: extract and split summaries,
    training history rows, evaluation metrics and classes, explanation tables, run rows."""
    if "extract" in tables:
        create_table_artifact(extract_rows(tables["extract"]), key=KEYS["extract"],
                              description="Metadata extraction: rows kept and dropped by reason")
    if "split" in tables:
        summary = tables["split"]
        create_table_artifact(split_rows(summary), key=KEYS["split"],
                              description=f"Images drawn per class per split (split by {summary['split_by']}; "
                                          f"identities shared between splits: {summary['shared_identities']})")
    if "history" in tables:
        create_table_artifact([{k: rounded(v) for k, v in row.items()} for row in tables["history"]],
                              key=KEYS["history"], description="Loss and accuracy per epoch; `kept` marks the epoch "
                                                               "with the lowest validation loss")
    for split, m in tables.get("metrics", {}).items():
        create_table_artifact(class_report_rows(m), key=KEYS["classification"].format(split=split),
                              description=f"{split}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}, "
                                          f"MAE {_decades(m['mae_decades'])} decades")
        create_table_artifact(confusion_rows(m, tables["classes"]), key=KEYS["confusion"].format(split=split),
                              description=f"{split} confusion matrix, normalised per actual class")
    if "faithfulness" in tables:
        create_table_artifact(tables["faithfulness"], key=KEYS["faithfulness"],
                              description="Deletion (lower is better) and insertion (higher is better) areas per "
                                          "method and class, with a random-map baseline")
    if "randomisation" in tables:
        create_table_artifact(tables["randomisation"], key=KEYS["randomisation"],
                              description="Rank correlation with the trained model's maps after each cascading "
                                          "re-initialisation step (near 1: the method ignores the model)")
    if "runs" in tables:
        create_table_artifact(tables["runs"], key=KEYS["runs"], description="Completed runs in this output folder, "
                                                                            "newest first")
    if report is not None:
        create_markdown_artifact(report, key=KEYS["report"], description="agelens run report with plots")
