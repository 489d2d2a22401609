"""Stage: score the kept model, with calibrated probabilities. The test split (never seen by
training, nor by the choice of the epoch or the temperature) gives the reported numbers, each
with a 95% bootstrap interval; validation, which chose the epoch, is shown as such. Where ages are
known, also the age in years: MAE and the share within 5 years (CS5)."""

from __future__ import annotations

from agelens.tasks.core.stage import Job, Stage, Summary, logger


class SplitMetrics(Summary):
    images: int
    accuracy: float
    accuracy_ci: list[float]
    macro_f1: float
    macro_f1_ci: list[float]
    within_one: float | None = None
    within_one_ci: list[float] | None = None
    mae_years: float | None = None
    mae_years_ci: list[float] | None = None
    cs5: float | None = None
    cs5_ci: list[float] | None = None
    mae_decades: float | None = None
    ece: float
    ece_uncalibrated: float


class EvaluateSummary(Summary):
    val: SplitMetrics
    test: SplitMetrics | None = None
    temperature: float = 1.0

    @property
    def headline(self) -> tuple[str, SplitMetrics]:
        """The split whose numbers are reported: test, or val (which chose the epoch) without one."""
        return ("test", self.test) if self.test is not None else ("val", self.val)


STAGE = Stage("evaluate", EvaluateSummary, needs=("decode", "train", "calibrate"), uses=("device", "eval_batch_size"),
              reads=("seed",), outputs=("predictions", "metrics", "reliability", "confusion_val", "confusion_test"))


def run(job: Job) -> dict:
    import numpy as np
    import pandas as pd
    import torch

    from agelens.tasks.core.stage import write_json
    from agelens.tasks.data.arrays import open_decoded, rows_of
    from agelens.tasks.model.calibration import ece, reliability
    from agelens.tasks.model.inference import head_of, load_trained, predict_logits, runtime_for
    from agelens.tasks.model.metrics import split_metrics
    from agelens.tasks.reporting.plots import base, evaluation

    log = logger()
    index, array = open_decoded(job)
    classes, head, temperature = job.context["classes"], head_of(job.context), job.context["temperature"]
    runtime = runtime_for(job)
    model = load_trained(job, runtime)
    has_ages = "age" in index.columns and index["age"].notna().all()
    metrics, tables, curves = {}, [], {}
    for split in ("val", "test"):
        rows = rows_of(index, split)
        if not len(rows):
            continue
        logits = torch.from_numpy(predict_logits(model, array, rows, runtime, job.settings["eval_batch_size"],
                                                 job.context["tta"]))
        raw = head.class_probs(head.probabilities(logits).numpy())
        outputs = head.probabilities(logits, temperature).numpy()
        probs = head.class_probs(outputs)
        actual = index.loc[rows, "class_index"].to_numpy()
        ages = index.loc[rows, "age"].to_numpy(dtype=float) if has_ages else None
        expected = head.expected_age(outputs)
        found = split_metrics(actual, probs, classes, ages, expected, seed=job.settings["seed"])
        found.update(ece=ece(probs, actual), ece_uncalibrated=ece(raw, actual))
        metrics[split] = found
        curves[split] = {"before": reliability(raw, actual), "after": reliability(probs, actual)}
        table = pd.DataFrame({"path": index.loc[rows, "path"].to_numpy(), "split": split,
                              "actual": [classes[i] for i in actual], "predicted": [classes[i] for i in probs.argmax(1)]})
        for i, name in enumerate(classes):
            table[f"prob_{name}"] = probs[:, i]
        if expected is not None:
            table["expected_age"] = expected
        if ages is not None:
            table["age"] = ages
        tables.append(table)
        log.info("%s: accuracy %.3f [%.3f, %.3f], macro-F1 %.3f, ECE %.3f (%.3f before calibration)%s", split,
                 found["accuracy"], *found["accuracy_ci"], found["macro_f1"], found["ece"], found["ece_uncalibrated"],
                 f", MAE {found['mae_years']:.2f} years" if found["mae_years"] is not None else "")
    shown = "test" if "test" in metrics else "val"
    with job.output() as out:
        pd.concat(tables, ignore_index=True).to_parquet(out.path("predictions.parquet"), index=False)
        write_json(out.path("metrics.json"), {**metrics, "reliability": curves, "temperature": temperature})
        out.add("predictions", "predictions.parquet")
        out.add("metrics", "metrics.json")
        base.save(evaluation.reliability_diagram(curves[shown], f"Reliability on {shown} (temperature {temperature:.2f})"),
                  out.path("reliability.png"))
        out.add("reliability", "reliability.png")
        for split, m in metrics.items():
            name = f"confusion_{split}.png"
            base.save(evaluation.confusion_heatmap(np.array(m["confusion"]), classes, f"{split} confusion (per actual)"),
                      out.path(name))
            out.add(f"confusion_{split}", name)
        fields = SplitMetrics.model_fields
        return out.finish(EvaluateSummary(temperature=temperature, **{
            split: SplitMetrics(**{k: m[k] for k in fields if k in m}) for split, m in metrics.items()}))


def _ci(value, bounds, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f} [{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]"


def _rows(s: EvaluateSummary) -> list[dict]:
    rows = []
    for split, m in (("test", s.test), ("val (chose the epoch)", s.val)):
        if m is None:
            continue
        rows.append({"split": split, "images": m.images, "accuracy": _ci(m.accuracy, m.accuracy_ci),
                     "macro-F1": _ci(m.macro_f1, m.macro_f1_ci),
                     "within one decade": _ci(m.within_one, m.within_one_ci),
                     "MAE (years)": _ci(m.mae_years, m.mae_years_ci, 2), "CS5": _ci(m.cs5, m.cs5_ci),
                     "ECE (before calibration)": f"{m.ece:.3f} ({m.ece_uncalibrated:.3f})"})
    return rows


def describe(s: EvaluateSummary) -> str:
    split, m = s.headline
    years = f", MAE {m.mae_years:.1f} y" if m.mae_years is not None else ""
    return (f"{split} acc {m.accuracy:.3f} [{m.accuracy_ci[0]:.3f}, {m.accuracy_ci[1]:.3f}] macro-F1 {m.macro_f1:.3f}"
            f"{years}, ECE {m.ece:.3f}" + (f" (worse than {m.ece_uncalibrated:.3f} uncalibrated)" if worse(m) else "")
            + ("" if s.test is not None else " (no test split: validation chose the epoch)"))


def worse(m) -> bool:
    """Whether the temperature fitted on validation left the headline split less calibrated."""
    return m.ece_uncalibrated is not None and m.ece > m.ece_uncalibrated


def report_section(view) -> list[str]:
    import json

    from agelens.tasks.reporting.markdown import escape, image, table
    from agelens.tasks.reporting.tables import class_report_rows

    s = view.summary
    split, m = s.headline
    metrics = json.loads(view.path("metrics").read_text())
    lead = (f"Test ({m.images} images never used to train, choose the epoch or calibrate): accuracy "
            f"**{_ci(m.accuracy, m.accuracy_ci)}** (95% bootstrap interval)" if split == "test" else
            f"No test split: validation accuracy **{_ci(m.accuracy, m.accuracy_ci)}** is on the images that chose the "
            "epoch, so it flatters the model")
    classes = len(view.context["classes"])
    lead += f"; guessing would score {1 / classes:.3f} ({classes} classes)"
    if m.mae_years is not None:
        lead += f", age error **{_ci(m.mae_years, m.mae_years_ci, 2)} years** (CS5 {_ci(m.cs5, m.cs5_ci)})"
    parts = [lead + ".", table(_rows(s)),
             f"## Calibration\n\nOne temperature, fitted on validation: T = {s.temperature:.2f}. Expected calibration "
             f"error on {escape(split)}: {m.ece_uncalibrated:.3f} before, {m.ece:.3f} after"
             + (": **worse** — the temperature fitted on validation does not carry over to these images (a small "
                "validation split, or a model that changed between epochs); predict's probabilities are less "
                "trustworthy." if worse(m) else "."),
             image(view.path("reliability"), "reliability diagram", 560),
             f"## Confusion matrix ({escape(split)}, normalised per actual class)",
             image(view.path(f"confusion_{split}"), "confusion heatmap"),
             f"## Per-class report ({escape(split)})", table(class_report_rows(metrics[split]))]
    return parts


def tables(view) -> list:
    import json

    from agelens.tasks.reporting.tables import Table, class_report_rows, confusion_rows

    metrics = json.loads(view.path("metrics").read_text())
    found = [Table("metrics", _rows(view.summary), "Test and validation metrics with 95% bootstrap intervals")]
    for split in ("val", "test"):
        if split in metrics:
            m = metrics[split]
            found += [Table(f"classification-report-{split}", class_report_rows(m),
                            f"{split}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}"),
                      Table(f"confusion-matrix-{split}", confusion_rows(m, view.context["classes"]),
                            f"{split} confusion matrix, normalised per actual class")]
    return found
