"""Stage: fine-tune a torchvision classifier on the decoded images (the loop: tasks/model/training.py)."""

from __future__ import annotations

from agelens.tasks.core.stage import Job, Stage, Summary, logger


class TrainSummary(Summary):
    best_epoch: int
    best_val_loss: float
    best_val_acc: float
    head: str = "classes"
    recipe: str = "reference"
    epochs: int
    resumed_from_epoch: int
    train_images: int
    val_images: int
    device: str
    bf16: bool
    training_seconds: float
    train_images_per_s: float
    start_size: int | None = None  # progressive resizing's first size; None: the full size throughout


STAGE = Stage("train", TrainSummary, needs=("decode",), inputs=("weights",), uses=("device", "eval_batch_size"),
              reads=("backbone", "epochs", "batch_size", "lr", "recipe", "head", "max_steps", "seed", "precision",
                     "channels_last", "start_size"),
              outputs=("model", "history", "curves", "timings", "config"))


def run(job: Job) -> dict:
    import numpy as np
    import pandas as pd
    import torch
    from safetensors.torch import save_file

    from agelens.tasks.core.errors import DataError
    from agelens.tasks.core.stage import write_json
    from agelens.tasks.data.arrays import open_decoded, rows_of
    from agelens.tasks.model.backbones import build_model
    from agelens.tasks.model.heads import head_for
    from agelens.tasks.model.inference import Runtime
    from agelens.tasks.model.recipes import RECIPES
    from agelens.tasks.model.training import fit, private_rng
    from agelens.tasks.reporting.plots import base, training
    from agelens.tasks.reporting.progress import TrainingProgress

    log = logger()
    settings = job.settings
    index, array = open_decoded(job)
    classes = job.context["classes"]
    labels = index["class_index"].to_numpy()
    ages = index["age"].to_numpy() if "age" in index.columns and index["age"].notna().all() else None
    head = head_for(settings["head"], classes, ages is not None)
    recipe = RECIPES[settings["recipe"]]
    targets = head.targets(labels, ages)
    train_rows, val_rows = rows_of(index, "train"), rows_of(index, "val")
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise DataError(f"need images in both train and val, have {len(train_rows)} and {len(val_rows)}: "
                        "draw more images per class (--per-class) or change --val-frac")
    runtime = Runtime.resolve(settings["device"], settings["precision"], settings["channels_last"])
    image_size = job.context["image_size"]
    weights = job.inputs["weights"]
    with private_rng(runtime):
        torch.manual_seed(settings["seed"])
        model = build_model(settings["backbone"], head.outputs, weights.get("path"), image_size)
    log.info("training %s (%s head, %s recipe) on %d images (%d val), %d classes, on %s%s%s", settings["backbone"],
             head.kind, recipe.name, len(train_rows), len(val_rows), len(classes), runtime.device,
             ", bf16" if runtime.bf16 else "", ", channels-last" if runtime.channels_last else "")
    job.scratch.mkdir(parents=True, exist_ok=True)
    result = fit(model, array, targets, labels, train_rows, val_rows, settings, runtime, job.scratch / "checkpoint.pt",
                 head, recipe, log, on_epoch=TrainingProgress(settings["epochs"]))
    best = result["history"][result["best_epoch"] - 1]
    seconds = sum(t["seconds"] for t in result["timings"])
    with job.output() as out:
        # safetensors: the same weights give the same bytes (torch.save adds a random id)
        save_file({k: v.contiguous() for k, v in result["best_state"].items()}, out.path("model.safetensors"))
        pd.DataFrame(result["history"]).to_csv(out.path("history.csv"), index=False)
        pd.DataFrame(result["timings"]).to_csv(out.path("timings.csv"), index=False)
        base.save(training.training_curves(result["history"], 1 / len(classes)), out.path("curves.png"))
        write_json(out.path("config.json"), {**settings, "weights": weights, "classes": classes, "head": head.kind,
                                             "recipe_parameters": recipe.describe(),
                                             "image_size": image_size, "device": str(runtime.device),
                                             "bf16": runtime.bf16, "channels_last_runtime": runtime.channels_last})
        out.add("model", "model.safetensors")
        out.add("history", "history.csv")
        out.add("curves", "curves.png")
        out.add("timings", "timings.csv", keyed=False)  # how long, not what: never a reason to rerun
        out.add("config", "config.json", keyed=False)
        summary = TrainSummary(
            best_epoch=result["best_epoch"], best_val_loss=best["val_loss"], best_val_acc=best["val_acc"],
            head=head.kind, recipe=recipe.name,
            epochs=settings["epochs"], resumed_from_epoch=result["resumed_from"], train_images=len(train_rows),
            val_images=len(val_rows), device=str(runtime.device), bf16=runtime.bf16, training_seconds=round(seconds, 2),
            train_images_per_s=float(np.mean([t["images_per_s"] for t in result["timings"][-2:]])),
            start_size=settings.get("start_size"))
        return out.finish(summary, {"backbone": settings["backbone"], "precision": settings["precision"],
                                    "channels_last": settings["channels_last"], "head": head.kind,
                                    "outputs": head.outputs, "tta": recipe.tta, "ages": ages is not None})


def describe(s: TrainSummary) -> str:
    return f"kept epoch {s.best_epoch} of {s.epochs} (val loss {s.best_val_loss:.3f}, acc {s.best_val_acc:.3f})"


def report_section(view) -> list[str]:
    from agelens.tasks.reporting.markdown import escape, image

    s = view.summary
    growing = f" (trained from {s.start_size} px up)" if s.start_size else ""
    return [f"**{escape(view.context['backbone'])}** at {view.context['image_size']} px{growing}, {escape(s.head)} head, "
            f"{escape(s.recipe)} recipe, {s.epochs} epochs (kept epoch {s.best_epoch}, lowest val loss), trained on "
            f"{s.train_images} images.",
            "## Training curves", image(view.path("curves"), "loss and accuracy curves", 640)]


def tables(view) -> list:
    from agelens.tasks.reporting.tables import Table, csv_rows, rounded_rows

    return [Table("training-history", rounded_rows(csv_rows(view.path("history"))),
                  "Loss and accuracy per epoch; `kept` marks the epoch with the lowest validation loss")]
