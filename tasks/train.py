"""Stage: fine-tune a torchvision classifier on the decoded images.

The loop follows torchvision's reference scripts: an explicit `train_one_epoch` and
`evaluate`, a checkpoint after every epoch, settings saved beside the weights. The
epoch kept is the one with the lowest validation loss, chosen by the code, not by eye.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from prefect import get_run_logger, task
from tqdm.auto import tqdm

from tasks.decode import open_images
from tasks.models import build_model, resolve_device, use_bf16, use_channels_last
from tasks.report import TrainingProgress, publish_history
from tasks.stage import StageDir, StageKey, current_stage_dir, task_output, write_json

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TrainSettings:
    backbone: str = "convnext_tiny"
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-4
    seed: int = 0
    precision: str = "auto"
    channels_last: str = "auto"
    brightness: float = 0.2
    contrast: float = 0.2


@dataclass
class Runtime:
    """How tensors are laid out and computed on the device at hand (not part of the cache key)."""
    device: torch.device
    bf16: bool
    channels_last: bool

    @classmethod
    def resolve(cls, device: str, precision: str, channels_last: str) -> "Runtime":
        dev = resolve_device(device)
        return cls(dev, use_bf16(precision, dev), use_channels_last(channels_last, dev))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def to_float(batch: np.ndarray, runtime: Runtime) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1] on the device.

    Permuting NHWC gives channels-last strides for free; `contiguous()` makes NCHW.
    """
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(runtime.device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255)
    return x if runtime.channels_last else x.contiguous()


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(x: torch.Tensor, settings: TrainSettings, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and ColorJitter(brightness, contrast), drawn per image.

    Written here because torchvision's tensor ColorJitter draws one factor per call,
    i.e. per batch, where the reference (PIL, per image) draws one per image.
    """
    n = x.shape[0]
    draws = torch.rand(n, 3, generator=generator).to(x.device)
    flip = (draws[:, 0] < 0.5).view(n, 1, 1, 1)
    x = torch.where(flip, x.flip(3), x)
    brightness = (1 + settings.brightness * (2 * draws[:, 1] - 1)).view(n, 1, 1, 1)
    contrast = (1 + settings.contrast * (2 * draws[:, 2] - 1)).view(n, 1, 1, 1)
    x = (x * brightness).clamp_(0, 1)
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean(dim=(1, 2)).view(n, 1, 1, 1)
    return ((x - grey) * contrast + grey).clamp_(0, 1)


def prepare(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    model = model.to(runtime.device)
    return model.to(memory_format=torch.channels_last) if runtime.channels_last else model


def train_one_epoch(model, images: np.ndarray, labels: np.ndarray, optimizer, settings: TrainSettings,
                    runtime: Runtime, generator: torch.Generator, desc: str = "") -> dict:
    model.train()
    order = torch.randperm(len(labels), generator=generator).numpy()
    total_loss, correct, seen = 0.0, 0, 0
    batches = range(0, len(order), settings.batch_size)
    for start in tqdm(batches, desc=desc, leave=False, unit="batch", disable=None):
        idx = np.sort(order[start:start + settings.batch_size])  # sorted reads from the memmap
        x = normalise(augment(to_float(images[idx], runtime), settings, generator))
        y = torch.from_numpy(labels[idx]).to(runtime.device)
        with runtime.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(idx)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(idx)
    return {"loss": total_loss / seen, "acc": correct / seen}


@torch.no_grad()
def predict(model, images: np.ndarray, runtime: Runtime, batch_size: int) -> np.ndarray:
    """Class probabilities (N, C) in float32."""
    model.eval()
    probs = []
    for start in range(0, len(images), batch_size):
        x = normalise(to_float(images[start:start + batch_size], runtime))
        with runtime.autocast():
            logits = model(x)
        probs.append(torch.softmax(logits.float(), 1).cpu())
    return torch.cat(probs).numpy()


def evaluate(model, images: np.ndarray, labels: np.ndarray, runtime: Runtime, batch_size: int) -> dict:
    probs = predict(model, images, runtime, batch_size)
    picked = np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)
    return {"loss": float(-np.log(picked).mean()), "acc": float((probs.argmax(1) == labels).mean())}


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def fit(model, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
        settings: TrainSettings, runtime: Runtime, checkpoint: Path, log=None, on_epoch=None) -> dict:
    """Train for `settings.epochs`, checkpointing each epoch into `checkpoint` and resuming
    from it when present. `on_epoch(epoch, metrics)` is called after each epoch.
    Returns history, the best epoch and its weights."""
    model = prepare(model, runtime)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    history, best, start = [], {"epoch": 0, "val_loss": math.inf, "state": None}, 1
    if checkpoint.exists():
        saved = torch.load(checkpoint, map_location=runtime.device, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        history, best, start = saved["history"], saved["best"], saved["epoch"] + 1
        if log:
            log.info("resuming from the checkpoint of epoch %d of %d (%s)", saved["epoch"], settings.epochs, checkpoint)
    for epoch in range(start, settings.epochs + 1):
        # Everything random in an epoch derives from (seed, epoch): a resumed run repeats it exactly.
        torch.manual_seed(settings.seed * 100_003 + epoch)
        generator = torch.Generator().manual_seed(settings.seed * 100_003 + epoch)
        began = time.perf_counter()
        train_metrics = train_one_epoch(model, *train, optimizer, settings, runtime, generator,
                                        desc=f"epoch {epoch}/{settings.epochs}")
        seconds = time.perf_counter() - began
        val_metrics = evaluate(model, *val, runtime, batch_size=max(settings.batch_size, 64))
        row = {"epoch": epoch, "train_loss": train_metrics["loss"], "train_acc": train_metrics["acc"],
               "val_loss": val_metrics["loss"], "val_acc": val_metrics["acc"], "train_seconds": seconds,
               "train_images_per_s": len(train[1]) / seconds}
        history.append(row)
        if val_metrics["loss"] < best["val_loss"]:
            best = {"epoch": epoch, "val_loss": val_metrics["loss"],
                    "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        if log:
            log.info("epoch %d/%d: train loss %.4f acc %.3f | val loss %.4f acc %.3f | %.1f img/s%s", epoch,
                     settings.epochs, row["train_loss"], row["train_acc"], row["val_loss"], row["val_acc"],
                     row["train_images_per_s"], " (best so far)" if best["epoch"] == epoch else "")
        if on_epoch:
            on_epoch(epoch, row)
        _save_atomic({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "history": history, "best": best}, checkpoint)
    if best["state"] is None:
        raise ValueError("the validation loss was not finite in any epoch (diverged?): try a lower --lr")
    for row in history:
        row["kept"] = row["epoch"] == best["epoch"]
    return {"history": history, "best_epoch": best["epoch"], "best_state": best["state"], "resumed_from": start - 1}


def split_arrays(index: pd.DataFrame, images: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, class indices) of one split, read into memory."""
    mask = (index["split"] == split).to_numpy()
    return images[mask], index.loc[mask, "class_index"].to_numpy()


@task(name="train", cache_key_fn=StageKey("train", ("tasks.train", "tasks.models")), persist_result=True,
      result_serializer="json")
def train_model(decoded: dict, weights: dict, settings: TrainSettings, device: str, out: str) -> dict:
    log = get_run_logger()
    index, images = open_images(decoded)
    classes = decoded["classes"]
    train, val = split_arrays(index, images, "train"), split_arrays(index, images, "val")
    if len(train[1]) == 0 or len(val[1]) == 0:
        raise ValueError(f"need images in both train and val, have {len(train[1])} and {len(val[1])}")
    runtime = Runtime.resolve(device, settings.precision, settings.channels_last)
    torch.manual_seed(settings.seed)
    model = build_model(settings.backbone, len(classes), weights.get("path"))
    log.info("training %s on %d images (%d val), %d classes, on %s%s%s", settings.backbone, len(train[1]),
             len(val[1]), len(classes), runtime.device, ", bf16" if runtime.bf16 else "",
             ", channels-last" if runtime.channels_last else "")
    scratch = StageDir(current_stage_dir()).scratch
    scratch.mkdir(parents=True, exist_ok=True)
    result = fit(model, train, val, settings, runtime, scratch / "checkpoint.pt", log,
                 on_epoch=TrainingProgress(settings.epochs))
    best = result["history"][result["best_epoch"] - 1]
    with task_output() as out_dir:
        torch.save(result["best_state"], out_dir.path("model.pt"))
        history = pd.DataFrame(result["history"])
        history.to_csv(out_dir.path("history.csv"), index=False)
        history.to_parquet(out_dir.path("history.parquet"), index=False)
        publish_history(history)
        config = {**asdict(settings), "weights": weights, "classes": classes, "device": str(runtime.device),
                  "bf16": runtime.bf16, "channels_last_runtime": runtime.channels_last}
        write_json(out_dir.path("config.json"), config)
        summary = {"best_epoch": result["best_epoch"], "best_val_loss": best["val_loss"],
                   "best_val_acc": best["val_acc"], "epochs": settings.epochs, "resumed_from_epoch": result["resumed_from"],
                   "device": str(runtime.device), "bf16": runtime.bf16,
                   "train_images_per_s": float(np.mean([r["train_images_per_s"] for r in result["history"][-2:]]))}
        write_json(out_dir.path("summary.json"), summary)
        return {"summary": summary, "classes": classes, "backbone": settings.backbone, "settings": asdict(settings),
                "outputs": {"model": out_dir.handle("model.pt"), "history": out_dir.handle("history.parquet"),
                            "history_csv": out_dir.handle("history.csv")}}
