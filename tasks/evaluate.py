"""Stage: score the kept model on val (and test): metrics, predictions and the confusion heatmap."""

from __future__ import annotations

from tasks.core.stage import Job, Stage, Summary, logger


class SplitMetrics(Summary):
    images: int
    accuracy: float
    macro_f1: float
    mae_decades: float | None


class EvaluateSummary(Summary):
    val: SplitMetrics
    test: SplitMetrics | None = None


STAGE = Stage("evaluate", EvaluateSummary, needs=("decode", "train"), uses=("device", "eval_batch_size"),
              outputs=("predictions", "metrics", "confusion_val", "confusion_test"))


def run(job: Job) -> dict:
    import numpy as np
    import pandas as pd

    from tasks.core.stage import write_json
    from tasks.data.arrays import open_decoded, rows_of
    from tasks.model.inference import load_trained, predict, runtime_for
    from tasks.model.metrics import classification_metrics
    from tasks.reporting.plots import base, evaluation

    log = logger()
    index, array = open_decoded(job)
    classes = job.context["classes"]
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
        return out.finish(EvaluateSummary(**{split: SplitMetrics(**{k: m[k] for k in SplitMetrics.model_fields})
                                             for split, m in metrics.items()}))


def describe(s: EvaluateSummary) -> str:
    return ", ".join(f"{split} acc {m.accuracy:.3f} macro-F1 {m.macro_f1:.3f}"
                     for split, m in (("val", s.val), ("test", s.test)) if m is not None)


def report_section(view) -> list[str]:
    import json

    from tasks.reporting.markdown import image, table
    from tasks.reporting.tables import class_report_rows, decades

    val = view.summary.val
    metrics = json.loads(view.path("metrics").read_text())
    return [f"Validation: accuracy **{val.accuracy:.3f}**, macro-F1 **{val.macro_f1:.3f}**, MAE "
            f"**{decades(val.mae_decades)}** decades.",
            "## Confusion matrix (normalised per actual class)", image(view.path("confusion_val"), "confusion heatmap"),
            "## Per-class report (val)", table(class_report_rows(metrics["val"]))]


def tables(view) -> list:
    import json

    from tasks.reporting.tables import Table, class_report_rows, confusion_rows, decades

    out = []
    for split, m in json.loads(view.path("metrics").read_text()).items():
        out += [Table(f"classification-report-{split}", class_report_rows(m),
                      f"{split}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}, MAE "
                      f"{decades(m['mae_decades'])} decades"),
                Table(f"confusion-matrix-{split}", confusion_rows(m, view.context["classes"]),
                      f"{split} confusion matrix, normalised per actual class")]
    return out
