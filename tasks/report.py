"""Reporting: Prefect artifacts (stable keys, so versions accumulate across runs) and the run report.

Stages call the `publish_*` functions after writing their outputs; the `report` stage
assembles one markdown page whose plots are embedded as downscaled base64 PNGs, which
Prefect's UI renders inline.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from tasks.plots import png_bytes
from tasks.stage import StageKey, task_output

KEYS = {
    "extract": "agelens-extract-summary",
    "split": "agelens-split-counts",
    "history": "agelens-training-history",
    "progress": "agelens-training-progress",
    "report_table": "agelens-classification-report",
    "confusion": "agelens-confusion-matrix",
    "report": "agelens-run-report",
}


def _round(value, digits=4):
    return round(value, digits) if isinstance(value, float) else value


def _decades(value) -> str:
    return "n/a (labels are not decades)" if value is None else f"{value:.3f}"


def publish_extract(summary: dict) -> None:
    rows = [{"measure": "rows in metadata", "value": summary["rows_in"]},
            {"measure": "rows kept", "value": summary["rows_out"]},
            *({"measure": f"dropped: {reason.replace('_', ' ')}", "value": n} for reason, n in summary["dropped"].items()),
            {"measure": "identities", "value": summary["identities"]},
            {"measure": "source format", "value": summary["source_format"]}]
    create_table_artifact(rows, key=KEYS["extract"], description="Metadata extraction: rows kept and dropped by reason")


def split_rows(summary: dict) -> list[dict]:
    per_split = summary["per_class_per_split"]
    classes = list(next(iter(per_split.values())))
    return [{"class": c, **{split: counts[c] for split, counts in per_split.items()}} for c in classes]


def publish_split(summary: dict) -> None:
    create_table_artifact(split_rows(summary), key=KEYS["split"],
                          description=f"Images per class per split (split by {summary['split_by']}; identities "
                                      f"shared between splits: {summary['shared_identities']})")


class TrainingProgress:
    """A progress artifact updated after every epoch."""

    def __init__(self, epochs: int, start_epoch: int = 0):
        self.epochs = epochs
        self.id = create_progress_artifact(progress=100.0 * start_epoch / epochs, key=KEYS["progress"],
                                           description=f"Training progress ({epochs} epochs)")

    def __call__(self, epoch: int, row: dict) -> None:
        update_progress_artifact(self.id, progress=100.0 * epoch / self.epochs,
                                 description=f"epoch {epoch}/{self.epochs}: val loss {row['val_loss']:.4f}, "
                                             f"val acc {row['val_acc']:.3f}")


def publish_history(history: pd.DataFrame) -> None:
    rows = [{k: _round(v) for k, v in row.items()} for row in history.to_dict("records")]
    create_table_artifact(rows, key=KEYS["history"], description="Loss and accuracy per epoch; `kept` marks the "
                                                                 "epoch with the lowest validation loss")


def report_rows(metrics: dict) -> list[dict]:
    return [{"class": c, **{k: _round(v) for k, v in m.items()}} for c, m in metrics["per_class"].items()]


def publish_evaluation(metrics: dict, classes: list[str]) -> None:
    for split, m in metrics.items():
        create_table_artifact(report_rows(m), key=f"{KEYS['report_table']}-{split}",
                              description=f"{split}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}, "
                                          f"MAE {_decades(m['mae_decades'])} decades")
        rows = [{"actual": a, **{f"predicted {p}": round(m["confusion"][i][j], 3) for j, p in enumerate(classes)}}
                for i, a in enumerate(classes)]
        create_table_artifact(rows, key=f"{KEYS['confusion']}-{split}",
                              description=f"{split} confusion matrix, normalised per actual class")


def image_markdown(path: str | Path, alt: str, max_width: int = 480) -> str:
    data = base64.b64encode(png_bytes(path, max_width)).decode()
    return f"![{alt}](data:image/png;base64,{data})"


def _table(rows: list[dict]) -> str:
    if not rows:
        return ""
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(_round(r[h], 3)) for h in head) + " |" for r in rows]
    return "\n".join(lines)


def run_report(config: dict, stages: dict) -> str:
    """The markdown run report: settings, numbers, the plots themselves and where every file is."""
    split, train, evaluation = stages["split"], stages["train"], stages["evaluate"]
    embed, explain = stages["embed"], stages["explain"]
    val = evaluation["metrics"]["val"]
    parts = [
        "# agelens run report",
        f"**{config['backbone']}** at {config['image_size']} px, {config['epochs']} epochs (kept epoch "
        f"{train['summary']['best_epoch']}, lowest val loss), per class {config['per_class']}, split by "
        f"{config['split_by']}, seed {config['seed']}.",
        f"Validation: accuracy **{val['accuracy']:.3f}**, macro-F1 **{val['macro_f1']:.3f}**, "
        f"MAE **{_decades(val['mae_decades'])}** decades. Identities shared between splits: "
        f"{split['summary']['shared_identities']}.",
        "## Data", _table(split_rows(split["summary"])),
        "## Training curves", image_markdown(evaluation["outputs"]["curves"]["path"], "loss and accuracy curves", 640),
        "## Confusion matrix (normalised per actual class)",
        image_markdown(evaluation["outputs"]["confusion_val"]["path"], "confusion heatmap"),
        _table(report_rows(val)),
        "## Embedding of penultimate features",
        image_markdown(embed["outputs"]["pca"]["path"], "PCA"), image_markdown(embed["outputs"]["tsne"]["path"], "t-SNE"),
        "## Explanations (original | Grad-CAM | guided backprop | guided Grad-CAM)",
        *(image_markdown(path, Path(path).stem, 640) for path in explain["strip_files"][:4]),
    ]
    if "sanity" in explain["outputs"]:
        sanity = pd.read_csv(explain["outputs"]["sanity"]["path"]).to_dict("records")
        parts += ["Sanity check: Spearman rank correlation between the maps of the trained model and of one "
                  "whose last stage and classifier are re-initialised (near 1 = the method ignores the model).",
                  _table(sanity)]
    parts.append("## Where the outputs are")
    for name, stage in stages.items():
        for label, handle in stage.get("outputs", {}).items():
            path = handle["path"] if isinstance(handle, dict) else handle
            parts.append(f"- `{name}` {label}: `{path}`")
    return "\n\n".join(parts) + "\n"


@task(name="report", cache_key_fn=StageKey("report", ("tasks.report", "tasks.plots")), persist_result=True,
      result_serializer="json")
def make_report(config: dict, stages: dict, out: str) -> dict:
    markdown = run_report(config, stages)
    with task_output() as out_dir:
        out_dir.path("report.md").write_text(markdown)
        create_markdown_artifact(markdown, key=KEYS["report"], description="agelens run report with plots")
        get_run_logger().info("run report: %s (%d kB)", out_dir.final_path("report.md"), len(markdown) // 1024)
        return {"summary": {"images": markdown.count("data:image/png;base64,"), "bytes": len(markdown)},
                "outputs": {"report": out_dir.handle("report.md")}}
