"""Stage: score the kept model on val (and test): metrics, predictions and plots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from prefect import get_run_logger, task
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from tasks import plots
from tasks.decode import open_images
from tasks.models import build_model
from tasks.report import publish_evaluation
from tasks.sources import DECADE
from tasks.stage import StageKey, task_output, write_json
from tasks.train import Runtime, predict, prepare


def decade_values(classes: list[str]) -> np.ndarray | None:
    """Numeric decade of each class ('20s' -> 20), or None when the labels are not decades."""
    if not all(DECADE.match(c) for c in classes):
        return None
    return np.array([int(c[:-1]) for c in classes], dtype=float)


def classification_metrics(actual: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/support, MAE in decades, and the
    confusion matrix normalised per actual class (rows = actual)."""
    labels = np.arange(len(classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        actual, predicted, labels=labels, zero_division=0)
    decades = decade_values(classes)
    mae = float(np.abs(decades[actual] - decades[predicted]).mean() / 10) if decades is not None else None
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


def load_trained(trained: dict, runtime: Runtime) -> torch.nn.Module:
    model = build_model(trained["backbone"], len(trained["classes"]))
    model.load_state_dict(torch.load(trained["outputs"]["model"]["path"], map_location="cpu", weights_only=True))
    return prepare(model, runtime).eval()


@task(name="evaluate", cache_key_fn=StageKey("evaluate", ("tasks.evaluate", "tasks.plots")), persist_result=True,
      result_serializer="json")
def evaluate_model(decoded: dict, trained: dict, eval_batch_size: int, device: str, out: str) -> dict:
    log = get_run_logger()
    index, images = open_images(decoded)
    classes = trained["classes"]
    runtime = Runtime.resolve(device, trained["settings"]["precision"], trained["settings"]["channels_last"])
    model = load_trained(trained, runtime)
    history = pd.read_parquet(trained["outputs"]["history"]["path"])
    metrics, tables = {}, []
    for split in ("val", "test"):
        mask = (index["split"] == split).to_numpy()
        if not mask.any():
            continue
        probs = predict(model, images[mask], runtime, eval_batch_size)
        actual = index.loc[mask, "class_index"].to_numpy()
        predicted = probs.argmax(1)
        metrics[split] = classification_metrics(actual, predicted, classes)
        table = pd.DataFrame({"path": index.loc[mask, "path"].to_numpy(), "split": split,
                              "actual": [classes[i] for i in actual], "predicted": [classes[i] for i in predicted]})
        for i, name in enumerate(classes):
            table[f"prob_{name}"] = probs[:, i]
        tables.append(table)
        log.info("%s: accuracy %.3f, macro-F1 %.3f, MAE %s decades", split, metrics[split]["accuracy"],
                 metrics[split]["macro_f1"], metrics[split]["mae_decades"])
    with task_output() as out_dir:
        pd.concat(tables, ignore_index=True).to_parquet(out_dir.path("predictions.parquet"), index=False)
        write_json(out_dir.path("metrics.json"), metrics)
        publish_evaluation(metrics, classes)
        history.to_csv(out_dir.path("history.csv"), index=False)
        history.to_parquet(out_dir.path("history.parquet"), index=False)
        plots.save(plots.training_curves(history), out_dir.path("curves.png"))
        outputs = {"predictions": "predictions.parquet", "metrics": "metrics.json", "history": "history.csv",
                   "history_parquet": "history.parquet", "curves": "curves.png"}
        for split, m in metrics.items():
            name = f"confusion_{split}.png"
            plots.save(plots.confusion_heatmap(np.array(m["confusion"]), classes, f"{split} confusion (per actual)"),
                       out_dir.path(name))
            outputs[f"confusion_{split}"] = name
        summary = {split: {k: m[k] for k in ("images", "accuracy", "macro_f1", "mae_decades")} for split, m in metrics.items()}
        summary["best_epoch"] = int(history.loc[history["kept"], "epoch"].iloc[0])
        return {"summary": summary, "metrics": metrics, "classes": classes,
                "outputs": {k: out_dir.handle(v) for k, v in outputs.items()}}
