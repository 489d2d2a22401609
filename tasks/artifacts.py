"""Every Prefect artifact agelens publishes, with its stable key (versions accumulate across runs).

The flow publishes a run's tables and its report from the stored outputs at the end of every
run, cached stages included, so each flow run carries its own artifacts. Progress artifacts are
the exception: the decode and train stages update them while they work (tasks/progress.py).
"""

from __future__ import annotations

import asyncio

from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.utilities.asyncutils import run_coro_as_sync

from tasks import progress
from tasks.tables import class_report_rows, confusion_rows, decades, extract_rows, rounded, split_rows

KEYS = {
    "extract": "agelens-extract-summary",
    "split": "agelens-split-counts",
    "history": "agelens-training-history",
    "training_progress": progress.TRAINING,  # updated by the train stage while it runs
    "decode_progress": progress.DECODE,
    "classification": "agelens-classification-report-{split}",
    "confusion": "agelens-confusion-matrix-{split}",
    "faithfulness": "agelens-faithfulness",
    "randomisation": "agelens-randomisation",
    "runs": "agelens-runs",
    "report": "agelens-run-report",
}


def publish_run(tables: dict, report: str | None) -> None:
    """This run's artifacts, created concurrently. `tables` holds what the run reached: extract and
    split summaries, training history rows, evaluation metrics and classes, explanation tables,
    run rows."""
    pending = []

    def table(rows: list[dict], key: str, description: str) -> None:
        pending.append(acreate_table_artifact(rows, key=key, description=description))

    if "extract" in tables:
        table(extract_rows(tables["extract"]), KEYS["extract"], "Metadata extraction: rows kept and dropped by reason")
    if "split" in tables:
        summary = tables["split"]
        table(split_rows(summary), KEYS["split"], f"Images drawn per class per split (split by {summary['split_by']}; "
                                                  f"identities shared between splits: {summary['shared_identities']})")
    if "history" in tables:
        table([{k: rounded(v) for k, v in row.items()} for row in tables["history"]], KEYS["history"],
              "Loss and accuracy per epoch; `kept` marks the epoch with the lowest validation loss")
    for split, m in tables.get("metrics", {}).items():
        table(class_report_rows(m), KEYS["classification"].format(split=split),
              f"{split}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}, MAE {decades(m['mae_decades'])} "
              "decades")
        table(confusion_rows(m, tables["classes"]), KEYS["confusion"].format(split=split),
              f"{split} confusion matrix, normalised per actual class")
    if "faithfulness" in tables:
        table(tables["faithfulness"], KEYS["faithfulness"], "Deletion (lower is better) and insertion (higher is "
                                                            "better) areas per method and class, with a random-map "
                                                            "baseline")
    if "randomisation" in tables:
        table(tables["randomisation"], KEYS["randomisation"], "Rank correlation with the trained model's maps after "
                                                              "each cascading re-initialisation step (near 1: the "
                                                              "method ignores the model)")
    if "runs" in tables:
        table(tables["runs"], KEYS["runs"], "Completed runs in this output folder, newest first")
    if report is not None:
        pending.append(acreate_markdown_artifact(report, key=KEYS["report"], description="agelens run report with plots"))

    async def all_of_them():
        await asyncio.gather(*pending)

    run_coro_as_sync(all_of_them())
