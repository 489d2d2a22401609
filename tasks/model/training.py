"""The training loop, after torchvision's reference scripts: an explicit `train_one_epoch` and
`evaluate`, a checkpoint after every epoch, resumed when present. The epoch kept is the one with
the lowest validation loss, chosen by the code, not by eye. Batches stream from the decoded
array; everything random in an epoch derives from (seed, epoch) and a private generator, so a
resumed run repeats the epochs it redoes exactly."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tasks.core.errors import DataError
from tasks.data.arrays import batch_rows, batches
from tasks.model.inference import Runtime, normalise, predict, prepare, to_float

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


def epoch_seed(seed: int, epoch: int) -> int:
    """One independent stream per (seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def private_rng(runtime: Runtime):
    """Global RNG draws (dropout, stochastic depth) inside stay inside: other stages may run
    concurrently in this process."""
    return torch.random.fork_rng(devices=[runtime.device] if runtime.device.type == "cuda" else [])


def fit(model, array: np.ndarray, labels: np.ndarray, train_rows: np.ndarray, val_rows: np.ndarray, settings: dict,
        runtime: Runtime, checkpoint: Path, log=None, on_epoch=None) -> dict:
    """Train for settings['epochs'] (at most settings['max_steps'] batches each, for training and
    for validation), checkpointing each epoch into `checkpoint` and resuming from it when present. `on_epoch(epoch, row)` is
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
    with private_rng(runtime):
        for epoch in range(start, epochs + 1):
            this_seed = epoch_seed(settings["seed"], epoch)
            torch.manual_seed(this_seed)
            generator = torch.Generator().manual_seed(this_seed)
            plan = epoch_plan(train_rows, settings["batch_size"], settings["max_steps"], generator)
            began = time.perf_counter()
            train_metrics = train_one_epoch(model, array, labels, plan, optimizer, runtime, generator,
                                            desc=f"epoch {epoch}/{epochs}")
            seconds = time.perf_counter() - began
            val_size = settings["eval_batch_size"]
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
            # Saved before anything is reported, so an interrupt after the report loses nothing.
            _save_atomic({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "history": history, "timings": timings, "best": best}, checkpoint)
            checkpoint.with_suffix(".json").write_text(json.dumps({"epoch": epoch, "epochs": epochs}))
            if on_epoch:
                on_epoch(epoch, row)
    if best["state"] is None:
        raise DataError("the validation loss was not finite in any epoch (diverged?): try a lower --lr")
    for row in history:
        row["kept"] = row["epoch"] == best["epoch"]
    return {"history": history, "timings": timings, "best_epoch": best["epoch"], "best_state": best["state"],
            "resumed_from": start - 1}
