"""Stage: score the kept model on val (and test): metrics, predictions and the confusion heatmap."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from tasks.plots import base, evaluation
from tasks.arrays import open_decoded, rows_of
from tasks.inference import load_trained, predict, runtime_for
from tasks.labels import decade_values
from tasks.stage import Job, logger, write_json


def classification_metrics(actual: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/support, MAE in decades, and the
    confusion matrix normalised per actual class (rows = actual)."""
    labels = np.arange(len(classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        actual, predicted, labels=labels, zero_division=0)
    decades = decade_values(classes)
    mae = None if decades is None else float(np.abs(np.array(decades)[actual] - np.array(decades)[predicted]).mean() / 10)
    return {
        "images": int(len(actual)),
        "accuracy": float(accuracy_score(actual, predicted)),
        "macro_f1": float(f1_score(actual, predicted, labels=labels, average="macro", zero_division=0)),
        "mae_decades": mae,
        "per_class": {c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for c, p, r, f, s in zip(classes, precision, recall, f1, support)},
        "confusion": confusion_matrix(actual, predicted, labels=labels, normalize="true").tolist(),
        "confusion_counts": confusion_matrix(actual, predicted, labels=labels).tolist(),
    }


def run(job: Job) -> dict:
    log = logger()
    index, array = open_decoded(job)
    classes = job.upstream["train"]["meta"]["classes"]
    runtime = runtime_for(job)
    model = load_trained(job, runtime)
    metrics, tables = {}, []
    for split in ("val", "test"):
        rows = rows_of(index, split)
        if not len(rows):
            continue
        probs = predict(model, array, rows, runtime, job.settings["eval_batch_size"])
        actual = index.loc[rows, "class_index"].to_numpy()
        predicted = probs.argmax(1)
        metrics[split] = classification_metrics(actual, predicted, classes)
        table = pd.DataFrame({"path": index.loc[rows, "path"].to_numpy(), "split": split,
                              "actual": [classes[i] for i in actual], "predicted": [classes[i] for i in predicted]})
        for i, name in enumerate(classes):
            table[f"prob_{name}"] = probs[:, i]
        tables.append(table)
        log.info("%s: accuracy %.3f, macro-F1 %.3f, MAE %s decades", split, metrics[split]["accuracy"],
                 metrics[split]["macro_f1"], metrics[split]["mae_decades"])
    with job.output() as out:
        pd.concat(tables, ignore_index=True).to_parquet(out.path("predictions.parquet"), index=False)
        write_json(out.path("metrics.json"), metrics)
        out.add("predictions", "predictions.parquet")
        out.add("metrics", "metrics.json")
        for split, m in metrics.items():
            name = f"confusion_{split}.png"
            base.save(evaluation.confusion_heatmap(np.array(m["confusion"]), classes, f"{split} confusion (per actual)"),
                       out.path(name))
            out.add(f"confusion_{split}", name)
        summary = {split: {k: m[k] for k in ("images", "accuracy", "macro_f1", "mae_decades")} for split, m in metrics.items()}
        return out.finish(summary, meta={"classes": classes})
