"""Stage: fine-tune a torchvision classifier on the decoded images.

The loop follows torchvision's reference scripts: an explicit `train_one_epoch` and
`evaluate`, a checkpoint after every epoch, settings saved beside the weights. The epoch
kept is the one with the lowest validation loss, chosen by the code, not by eye. Batches
stream from the decoded array; everything random in an epoch derives from (seed, epoch) and
a private generator, so a resumed run repeats the epochs it redoes exactly.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from tasks.arrays import batch_rows, batches, open_decoded, rows_of
from tasks.errors import DataError
from tasks.inference import Runtime, normalise, predict, prepare, to_float
from tasks.models import build_model
from tasks.plots import base, training
from tasks.progress import TRAINING, Progress
from tasks.stage import Job, logger, write_json

BRIGHTNESS = CONTRAST = 0.2  # the reference's ColorJitter(0.2, 0.2)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and ColorJitter(brightness, contrast), drawn per image, on
    float images in [0, 1]. Written here because torchvision's tensor ColorJitter draws one
    factor per call, i.e. per batch, where the reference (PIL, per image) draws one per image."""
    n = x.shape[0]
    draws = torch.rand(n, 3, generator=generator).to(x.device)
    flip = (draws[:, 0] < 0.5).view(n, 1, 1, 1)
    x = torch.where(flip, x.flip(3), x)
    brightness = (1 + BRIGHTNESS * (2 * draws[:, 1] - 1)).view(n, 1, 1, 1)
    contrast = (1 + CONTRAST * (2 * draws[:, 2] - 1)).view(n, 1, 1, 1)
    x = (x * brightness).clamp_(0, 1)
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean(dim=(1, 2)).view(n, 1, 1, 1)
    return ((x - grey) * contrast + grey).clamp_(0, 1)


def epoch_plan(rows: np.ndarray, batch_size: int, max_steps: int | None, generator: torch.Generator) -> list[np.ndarray]:
    """This epoch's batches: the rows shuffled by `generator`, cut into batches (each read sorted)."""
    order = torch.randperm(len(rows), generator=generator).numpy()
    return batch_rows(np.asarray(rows)[order], batch_size, max_steps)


def train_one_epoch(model, array: np.ndarray, labels: np.ndarray, plan: list[np.ndarray], optimizer,
                    runtime: Runtime, generator: torch.Generator, desc: str = "") -> dict:
    """One pass over `plan`; `labels[row]` is each array row's class. Returns loss, accuracy
    and the number of images seen."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for rows, batch in tqdm(batches(array, plan, runtime.device), total=len(plan), desc=desc, leave=False,
                            unit="batch", disable=None):
        x = normalise(augment(to_float(batch, runtime), generator))
        y = torch.from_numpy(labels[rows]).to(runtime.device)
        with runtime.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(rows)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(rows)
    return {"loss": total_loss / seen, "acc": correct / seen, "images": seen}


def evaluate(model, array: np.ndarray, labels: np.ndarray, rows: np.ndarray, runtime: Runtime, batch_size: int) -> dict:
    probs = predict(model, array, rows, runtime, batch_size)
    actual = labels[rows]
    picked = np.clip(probs[np.arange(len(rows)), actual], 1e-12, None)
    return {"loss": float(-np.log(picked).mean()), "acc": float((probs.argmax(1) == actual).mean())}


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _private_rng(runtime: Runtime):
    """Global RNG draws (dropout, stochastic depth) inside stay inside: other stages may run
    concurrently in this process."""
    return torch.random.fork_rng(devices=[runtime.device] if runtime.device.type == "cuda" else [])


def fit(model, array: np.ndarray, labels: np.ndarray, train_rows: np.ndarray, val_rows: np.ndarray, settings: dict,
        runtime: Runtime, checkpoint: Path, log=None, on_epoch=None) -> dict:
    """Train for settings['epochs'] (at most settings['max_steps'] batches each, for training and
    for validation), checkpointing
    each epoch into `checkpoint` and resuming from it when present. `on_epoch(epoch, row)` is
    called after each epoch. Returns history, timings, the best epoch and its weights."""
    model = prepare(model, runtime)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    history, timings, best, start = [], [], {"epoch": 0, "val_loss": math.inf, "state": None}, 1
    if checkpoint.exists():
        saved = torch.load(checkpoint, map_location=runtime.device, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        history, timings, best, start = saved["history"], saved["timings"], saved["best"], saved["epoch"] + 1
        if log:
            log.info("resuming from the checkpoint of epoch %d of %d (%s)", saved["epoch"], settings["epochs"], checkpoint)
    epochs = settings["epochs"]
    with _private_rng(runtime):
        for epoch in range(start, epochs + 1):
            epoch_seed = settings["seed"] * 100_003 + epoch
            torch.manual_seed(epoch_seed)
            generator = torch.Generator().manual_seed(epoch_seed)
            plan = epoch_plan(train_rows, settings["batch_size"], settings["max_steps"], generator)
            began = time.perf_counter()
            train_metrics = train_one_epoch(model, array, labels, plan, optimizer, runtime, generator,
                                            desc=f"epoch {epoch}/{epochs}")
            seconds = time.perf_counter() - began
            val_size = max(settings["batch_size"], 64)
            capped = val_rows if settings["max_steps"] is None else val_rows[: settings["max_steps"] * val_size]
            val_metrics = evaluate(model, array, labels, capped, runtime, batch_size=val_size)
            row = {"epoch": epoch, "train_loss": train_metrics["loss"], "train_acc": train_metrics["acc"],
                   "val_loss": val_metrics["loss"], "val_acc": val_metrics["acc"]}
            history.append(row)
            timings.append({"epoch": epoch, "seconds": seconds, "images": train_metrics["images"],
                            "images_per_s": train_metrics["images"] / seconds})
            if val_metrics["loss"] < best["val_loss"]:
                best = {"epoch": epoch, "val_loss": val_metrics["loss"],
                        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
            if log:
                log.info("epoch %d/%d: train loss %.4f acc %.3f | val loss %.4f acc %.3f | %.1f img/s%s", epoch, epochs,
                         row["train_loss"], row["train_acc"], row["val_loss"], row["val_acc"],
                         timings[-1]["images_per_s"], " (best so far)" if best["epoch"] == epoch else "")
            if on_epoch:
                on_epoch(epoch, row)
            _save_atomic({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "history": history, "timings": timings, "best": best}, checkpoint)
    if best["state"] is None:
        raise DataError("the validation loss was not finite in any epoch (diverged?): try a lower --lr")
    for row in history:
        row["kept"] = row["epoch"] == best["epoch"]
    return {"history": history, "timings": timings, "best_epoch": best["epoch"], "best_state": best["state"],
            "resumed_from": start - 1}


class TrainingProgress:
    """The Prefect progress artifact, updated after every epoch."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.artifact = Progress(TRAINING, f"Training progress ({epochs} epochs)", epochs, every=0)

    def __call__(self, epoch: int, row: dict) -> None:
        self.artifact(epoch, f"epoch {epoch}/{self.epochs}: val loss {row['val_loss']:.4f}, val acc {row['val_acc']:.3f}")


def run(job: Job) -> dict:
    log = logger()
    settings = job.settings
    index, array = open_decoded(job)
    classes = job.upstream["decode"]["meta"]["classes"]
    labels = index["class_index"].to_numpy()
    train_rows, val_rows = rows_of(index, "train"), rows_of(index, "val")
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise DataError(f"need images in both train and val, have {len(train_rows)} and {len(val_rows)}: "
                        "draw more images per class (--per-class) or change --val-frac")
    runtime = Runtime.resolve(settings["device"], settings["precision"], settings["channels_last"])
    image_size = job.upstream["decode"]["meta"]["image_size"]
    weights = job.inputs["weights"]
    with _private_rng(runtime):
        torch.manual_seed(settings["seed"])
        model = build_model(settings["backbone"], len(classes), weights.get("path"), image_size)
    log.info("training %s on %d images (%d val), %d classes, on %s%s%s", settings["backbone"], len(train_rows),
             len(val_rows), len(classes), runtime.device, ", bf16" if runtime.bf16 else "",
             ", channels-last" if runtime.channels_last else "")
    job.scratch.mkdir(parents=True, exist_ok=True)
    result = fit(model, array, labels, train_rows, val_rows, settings, runtime, job.scratch / "checkpoint.pt", log,
                 on_epoch=TrainingProgress(settings["epochs"]))
    best = result["history"][result["best_epoch"] - 1]
    seconds = sum(t["seconds"] for t in result["timings"])
    with job.output() as out:
        # safetensors: the same weights give the same bytes (torch.save adds a random id)
        save_file({k: v.contiguous() for k, v in result["best_state"].items()}, out.path("model.safetensors"))
        pd.DataFrame(result["history"]).to_csv(out.path("history.csv"), index=False)
        pd.DataFrame(result["timings"]).to_csv(out.path("timings.csv"), index=False)
        base.save(training.training_curves(result["history"]), out.path("curves.png"))
        write_json(out.path("config.json"), {**settings, "weights": weights, "classes": classes,
                                             "image_size": image_size, "device": str(runtime.device),
                                             "bf16": runtime.bf16, "channels_last_runtime": runtime.channels_last})
        out.add("model", "model.safetensors")
        out.add("history", "history.csv")
        out.add("curves", "curves.png")
        out.add("timings", "timings.csv", keyed=False)  # how long, not what: never a reason to rerun
        out.add("config", "config.json", keyed=False)
        summary = {"best_epoch": result["best_epoch"], "best_val_loss": best["val_loss"], "best_val_acc": best["val_acc"],
                   "epochs": settings["epochs"], "resumed_from_epoch": result["resumed_from"],
                   "train_images": int(len(train_rows)), "val_images": int(len(val_rows)),
                   "device": str(runtime.device), "bf16": runtime.bf16, "training_seconds": round(seconds, 2),
                   "train_images_per_s": float(np.mean([t["images_per_s"] for t in result["timings"][-2:]]))}
        meta = {"backbone": settings["backbone"], "classes": classes, "image_size": image_size,
                "precision": settings["precision"], "channels_last": settings["channels_last"]}
        return out.finish(summary, meta)
