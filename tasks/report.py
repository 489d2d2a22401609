"""Stage: the study's report, one markdown page with the plots embedded and where every file is."""

from __future__ import annotations

import json

from tasks.tables import class_report_rows, decades, split_rows
from tasks.markdown import escape, image, table
from tasks.stage import Job, output_path

SECTIONS = ("split", "train", "evaluate", "embed", "featuremaps", "attention", "explain")


def study_report(job: Job) -> str:
    """The markdown of the report. Every user string is escaped."""
    up = job.upstream
    split, train, evaluation = up["split"]["summary"], up["train"]["summary"], up["evaluate"]["summary"]
    explain = up["explain"]["summary"]
    meta = up["train"]["meta"]
    val = evaluation["val"]
    drawn = ", ".join(f"{escape(c)} {n}" for c, n in split["per_class"].items())
    parts = [
        "# agelens run report",
        f"**{escape(meta['backbone'])}** at {meta['image_size']} px, {train['epochs']} epochs (kept epoch "
        f"{train['best_epoch']}, lowest val loss), trained on {train['train_images']} images. "
        f"Drawn per class: {drawn}; split by {escape(split['split_by'])}.",
        f"Validation: accuracy **{val['accuracy']:.3f}**, macro-F1 **{val['macro_f1']:.3f}**, "
        f"MAE **{decades(val['mae_decades'])}** decades. Identities shared between splits: "
        f"{split['shared_identities']}.",
        "## Data", table(split_rows(split)),
        "## Training curves", image(job.path("train", "curves"), "loss and accuracy curves", 640),
        "## Confusion matrix (normalised per actual class)",
        image(job.path("evaluate", "confusion_val"), "confusion heatmap"),
        "## Embedding of penultimate features",
        image(job.path("embed", "pca"), "PCA"), image(job.path("embed", "tsne"), "t-SNE"),
        "## What the model looks at, per class",
        image(job.path("attention", "attention"), "mean Grad-CAM per class", 720),
        f"## Explanations on {escape(explain['cam_layer'])} (original | Grad-CAM | guided backprop | guided Grad-CAM)",
        *(image(output_path(job.out, up["explain"], "explanations").parent / strip, strip, 640)
          for strip in explain["strips"][:4]),
        "### Faithfulness",
        "Area under the deletion curve (lower is better) and the insertion curve (higher is better), per method and "
        "class; `random` is a map of random values, the baseline every method should beat.",
        table(explain["faithfulness"]),
        image(job.path("explain", "faithfulness_plot"), "faithfulness curves", 720),
    ]
    if "randomisation" in explain:
        final = [r for r in explain["randomisation"] if r["step"] == max(x["step"] for x in explain["randomisation"])]
        parts += ["### Model randomisation",
                  "Spearman rank correlation between the trained model's maps and those of a copy re-initialised from "
                  "the top down; values near 1 mean the method does not depend on what the model learnt.",
                  image(job.path("explain", "randomisation_plot"), "cascading randomisation", 640),
                  table([{"method": r["method"], "after re-initialising everything": r["mean"]} for r in final]),
                  "Random-logit test: rank correlation between the maps for the predicted class and for the adjacent "
                  "decade (near 1 = the map is not class-specific).",
                  table(explain["random_logit"])]
    metrics = json.loads(job.path("evaluate", "metrics").read_text())
    parts += ["## Per-class report (val)", table(class_report_rows(metrics["val"])),
              "## Where the outputs are (under the output folder)"]
    for stage in SECTIONS:
        for name, output in up[stage]["outputs"].items():
            location = f"{stage}/{up[stage]['key']}/{output['file']}"
            parts.append(f"- {stage} {escape(name)}: {escape(location)}")
    return "\n\n".join(p for p in parts if p) + "\n"


def run(job: Job) -> dict:
    markdown = study_report(job)
    with job.output() as out:
        out.path("report.md").write_text(markdown)
        out.add("report", "report.md")
        return out.finish({"images": markdown.count("data:image/png;base64,"), "bytes": len(markdown)})
