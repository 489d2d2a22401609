"""The training loop, after torchvision's reference scripts: an explicit `train_one_epoch` and
`evaluate`, a checkpoint after every epoch, resumed when present. The epoch kept is the one with
the lowest validation loss, chosen by the code, not by eye. Batches stream from the decoded
array; everything random in an epoch derives from (seed, epoch) and a private generator, so a
resumed run repeats the epochs it redoes exactly. What is trained (the head) and how (the
recipe: optimiser, schedule, augmentation, moving average) come from tasks/model/heads.py and
tasks/model/recipes.py."""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from agelens.tasks.core.errors import DataError
from agelens.tasks.data.arrays import batch_rows, batches
from agelens.tasks.model.heads import Head
from agelens.tasks.model.heap import kept_heap
from agelens.tasks.model.inference import Runtime, amx_cpu, normalise, predict_logits, prepare, to_float
from agelens.tasks.model.recipes import Recipe
from agelens.tasks.model.smallmaps import for_small_maps
from agelens.tasks.model.stem import norm_after_stem_pool

BRIGHTNESS = CONTRAST = 0.2  # the reference's ColorJitter(0.2, 0.2)
SATURATION = 0.2  # the strong policy's, in addition
SCALE = (0.75, 1.0)  # the strong policy: share of the image side kept by the random crop
ERASE = 0.25  # the strong policy: chance of erasing a random rectangle (2-15% of the image)
GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL's and torchvision's greyscale


def augment(x: torch.Tensor, generator: torch.Generator, policy: str = "reference",
            size: int | None = None) -> torch.Tensor:
    """Augmentation drawn per image, on float images in [0, 1]. `reference`: random horizontal flip
    and ColorJitter(brightness, contrast). `strong`: also saturation, a random crop of 75-100% of
    the side at a random place (scaled back up), and random erasing. `size`: the images are first
    resized (antialiased) to that square size. Written here because torchvision's tensor
    transforms draw one factor per call, i.e. per batch, where the reference (PIL, per image)
    draws one per image; each step is one pass over the batch (a tenth of a ResNet-10 step on
    two cores was spent here when each took two or three)."""
    n = x.shape[0]
    draws = torch.rand(n, 10, generator=generator).to(x.device)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    flip = draws[:, 0] < 0.5
    if policy == "strong":
        scale = SCALE[0] + (SCALE[1] - SCALE[0]) * draws[:, 3]
        shift = (1 - scale)[:, None] * (2 * draws[:, 4:6] - 1)  # where the crop sits, in [-1, 1] units
        mirror = torch.where(flip, -1.0, 1.0)  # the flip, as the crop's map x -> -x: no pass of its own
        grid = _crop_grid(mirror * scale, mirror * shift[:, 0], scale, shift[:, 1], *x.shape[-2:])
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    else:
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    brightness = (1 + BRIGHTNESS * (2 * draws[:, 1] - 1)).view(n, 1, 1, 1)
    contrast = (1 + CONTRAST * (2 * draws[:, 2] - 1)).view(n, 1, 1, 1)
    x = (x * brightness).clamp_(0, 1)
    grey_mean = (x.mean(dim=(2, 3)) @ torch.tensor(GREY, device=x.device)).view(n, 1, 1, 1)
    x = torch.lerp(grey_mean, x, contrast).clamp_(0, 1)  # (x - mean) * contrast + mean
    if policy == "strong":
        saturation = (1 + SATURATION * (2 * draws[:, 6] - 1)).view(n, 1, 1, 1)
        grey = torch.add(x[:, 0] * GREY[0], x[:, 1], alpha=GREY[1]).add_(x[:, 2], alpha=GREY[2]).unsqueeze(1)
        x = torch.lerp(grey, x, saturation).clamp_(0, 1)
        x = x.masked_fill_(erased_boxes(draws, generator, *x.shape[-2:]), 0.5)
    return x


def erased_boxes(draws: torch.Tensor, generator: torch.Generator, h: int, w: int) -> torch.Tensor:
    """The strong policy's random erasing: (N, 1, h, w), true inside each erased image's rectangle
    of 2-15% of the image (draws 7-9 place it; one more draw per image decides whether to erase)."""
    n = draws.shape[0]
    area = 0.02 + 0.13 * draws[:, 7]
    side_h, side_w = (area.sqrt() * h).long().clamp(min=1), (area.sqrt() * w).long().clamp(min=1)
    top = (draws[:, 8] * (h - side_h)).long()
    left = (draws[:, 9] * (w - side_w)).long()
    rows = torch.arange(h, device=draws.device).view(1, h, 1)
    cols = torch.arange(w, device=draws.device).view(1, 1, w)
    box = ((rows >= top.view(n, 1, 1)) & (rows < (top + side_h).view(n, 1, 1))
           & (cols >= left.view(n, 1, 1)) & (cols < (left + side_w).view(n, 1, 1)))
    erase = (torch.rand(n, generator=generator).to(draws.device) < ERASE).view(n, 1, 1)
    return (box & erase).unsqueeze(1)


def _crop_grid(scale_x: torch.Tensor, shift_x: torch.Tensor, scale_y: torch.Tensor, shift_y: torch.Tensor,
               h: int, w: int) -> torch.Tensor:
    """F.affine_grid (align_corners=False) for maps without rotation, x -> scale * x + shift per
    image: two broadcast multiply-adds, where affine_grid runs a batched matrix multiply (2.3x the time)."""
    n, device = scale_x.shape[0], scale_x.device
    u = (torch.arange(w, device=device) * 2 + 1) / w - 1  # pixel centres in [-1, 1]
    v = (torch.arange(h, device=device) * 2 + 1) / h - 1
    gx = torch.addcmul(shift_x.view(n, 1, 1), scale_x.view(n, 1, 1), u.view(1, 1, w)).expand(n, h, w)
    gy = torch.addcmul(shift_y.view(n, 1, 1), scale_y.view(n, 1, 1), v.view(1, h, 1)).expand(n, h, w)
    return torch.stack((gx, gy), -1)


def mixup(x: torch.Tensor, alpha: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(the batch mixed with a shuffled copy of itself, which image each was mixed with, the share
    of its own), the share drawn from Beta(alpha, alpha) (Zhang et al. 2018)."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    share = float(np.random.default_rng(seed).beta(alpha, alpha))
    other = torch.randperm(x.shape[0], generator=generator).to(x.device)
    return share * x + (1 - share) * x[other], other, share


RAMP_SHARE = 0.75  # progressive resizing reaches the full size after this share of the epochs


def epoch_image_size(epoch: int, epochs: int, full: int, start: int | None) -> int:
    """The side trained on in `epoch` (1-based) under progressive resizing (as FFCV's ResNet
    recipes): from `start` at the first epoch, linearly, to `full` by RAMP_SHARE of the epochs, in
    steps of 8 pixels (rounded down); `full` throughout when `start` is None."""
    if start is None or start >= full:
        return full
    last_ramp = max(1, round(RAMP_SHARE * epochs))
    if epoch >= last_ramp:
        return full
    side = start + (full - start) * (epoch - 1) / max(1, last_ramp - 1)
    return max(start, int(side) // 8 * 8)  # side <= full before the last ramp epoch


def epoch_plan(rows: np.ndarray, batch_size: int, max_steps: int | None, generator: torch.Generator) -> list[np.ndarray]:
    """This epoch's batches: the rows shuffled by `generator`, cut into batches (each read sorted)."""
    order = torch.randperm(len(rows), generator=generator).numpy()
    return batch_rows(np.asarray(rows)[order], batch_size, max_steps)


class Averaged:
    """An exponential moving average of the weights (and a copy of the buffers), whose horizon is
    a share of the training steps, so short and long trainings average alike."""

    def __init__(self, model: torch.nn.Module, share: float, total_steps: int):
        self.model = copy.deepcopy(model).eval()
        self.decay = 1 - 1 / max(1.0, share * total_steps)
        self.steps = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))  # the first steps count fully
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values()))
        floats = [(mine, theirs.detach()) for mine, theirs in pairs if mine.dtype.is_floating_point]
        if floats:  # one call for every tensor: mine += (1 - decay) * (theirs - mine)
            torch._foreach_lerp_([m for m, _ in floats], [t for _, t in floats], 1 - decay)
        for mine, theirs in pairs:
            if not mine.dtype.is_floating_point:
                mine.copy_(theirs)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.steps = state["steps"]


def train_one_epoch(model, array: np.ndarray, targets: np.ndarray, labels: np.ndarray, plan: list[np.ndarray],
                    optimizer, runtime: Runtime, generator: torch.Generator, head: Head, recipe: Recipe,
                    scheduler=None, averaged: Averaged | None = None, desc: str = "", size: int | None = None) -> dict:
    """One pass over `plan`, on images resized to `size` (None: the array's). `targets[row]` is
    what each array row is trained on (its class, or its age for the ages head), `labels[row]`
    its class. Returns loss, accuracy and images seen."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    # Augmenting in the loader's thread instead was slower on 2 cores (its ops contend with the
    # model's for the same threads; bench/train_throughput.py), so it stays here.
    for rows, batch in tqdm(batches(array, plan, runtime.device), total=len(plan), desc=desc, leave=False,
                            unit="batch", disable=None):
        x = normalise(augment(to_float(batch, runtime), generator, recipe.augment, size))
        y = torch.from_numpy(targets[rows]).to(runtime.device)
        if recipe.mixup:
            x, other, share = mixup(x, recipe.mixup, generator)
        with runtime.autocast():
            logits = model(x)
        loss = head.loss(logits, y, recipe.label_smoothing)
        if recipe.mixup:  # the loss of a mixed image is the mix of its two images' losses
            loss = share * loss + (1 - share) * head.loss(logits, y[other], recipe.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if averaged is not None:
            averaged.update(model)
        total_loss += loss.item() * len(rows)
        predicted = head.class_probs(head.probabilities(logits.detach()).cpu().numpy()).argmax(1)
        correct += int((predicted == labels[rows]).sum())
        seen += len(rows)
    return {"loss": total_loss / seen, "acc": correct / seen, "images": seen}


def evaluate(model, array: np.ndarray, labels: np.ndarray, rows: np.ndarray, runtime: Runtime, batch_size: int,
             head: Head, tta: bool = False) -> dict:
    """Validation loss (the negative log-likelihood of the true class) and accuracy."""
    logits = predict_logits(model, array, rows, runtime, batch_size, tta)
    probs = head.class_probs(head.probabilities(torch.from_numpy(logits)).numpy())
    actual = labels[rows]
    picked = np.clip(probs[np.arange(len(rows)), actual], 1e-12, None)
    return {"loss": float(-np.log(picked).mean()), "acc": float((probs.argmax(1) == actual).mean())}


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def epoch_seed(seed: int, epoch: int) -> int:
    """One independent stream per (seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def private_rng(runtime: Runtime):
    """Global RNG draws (dropout, stochastic depth) inside stay inside: other stages may run
    concurrently in this process."""
    return torch.random.fork_rng(devices=[runtime.device] if runtime.device.type == "cuda" else [])


def optimiser(model: torch.nn.Module, recipe: Recipe, lr: float, total_steps: int):
    """(optimiser, per-step scheduler or None). Weight decay spares biases and norms (1-d weights)."""
    # Fused: one kernel for every parameter (on a 2-core CPU, 4 ms a step for ResNet-10's AdamW
    # against 16 ms for the per-parameter loop torch picks for CPU tensors).
    fused = {"fused": True} if next(model.parameters()).device.type in ("cpu", "cuda") else {}
    if recipe.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=recipe.weight_decay, **fused)
    else:
        decayed = [p for p in model.parameters() if p.ndim > 1]
        rest = [p for p in model.parameters() if p.ndim <= 1]
        optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": recipe.weight_decay},
                                       {"params": rest, "weight_decay": 0.0}], lr=lr, **fused)
    if recipe.schedule == "constant" and recipe.warmup == 0:
        return optimizer, None
    warm = max(1, round(recipe.warmup * total_steps)) if recipe.warmup else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if recipe.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def for_training(model: torch.nn.Module, runtime: Runtime, image_size: int) -> torch.nn.Module:
    """`model` on the runtime's device and layout, in the form that trains fastest there: the same
    function and state-dict keys."""
    amx_bf16 = runtime.bf16 and runtime.device.type == "cpu" and amx_cpu()
    return norm_after_stem_pool(for_small_maps(prepare(model, runtime), image_size, amx_bf16))


def fit(model, array: np.ndarray, targets: np.ndarray, labels: np.ndarray, train_rows: np.ndarray,
        val_rows: np.ndarray, settings: dict, runtime: Runtime, checkpoint: Path, head: Head, recipe: Recipe,
        log=None, on_epoch=None) -> dict:
    """Train for settings['epochs'] (at most settings['max_steps'] batches each, for training and
    for validation), checkpointing each epoch into `checkpoint` and resuming from it when present.
    `on_epoch(epoch, row)` is called after each epoch. Returns history, timings, the best epoch and
    its weights (the moving average's, when the recipe keeps one)."""
    model = for_training(model, runtime, array.shape[1])
    epochs, batch_size = settings["epochs"], settings["batch_size"]
    steps_per_epoch = len(batch_rows(np.asarray(train_rows), batch_size, settings["max_steps"]))
    optimizer, scheduler = optimiser(model, recipe, settings["lr"], epochs * steps_per_epoch)
    averaged = Averaged(model, recipe.ema, epochs * steps_per_epoch) if recipe.ema else None
    history, timings, best, start = [], [], {"epoch": 0, "val_loss": math.inf, "state": None}, 1
    if checkpoint.exists():
        saved = torch.load(checkpoint, map_location=runtime.device, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        if averaged is not None:
            averaged.load_state_dict(saved["averaged"])
        history, timings, best, start = saved["history"], saved["timings"], saved["best"], saved["epoch"] + 1
        if log:
            log.info("resuming from the checkpoint of epoch %d of %d (%s)", saved["epoch"], epochs, checkpoint)
    with private_rng(runtime), kept_heap():
        for epoch in range(start, epochs + 1):
            this_seed = epoch_seed(settings["seed"], epoch)
            torch.manual_seed(this_seed)
            generator = torch.Generator().manual_seed(this_seed)
            plan = epoch_plan(train_rows, batch_size, settings["max_steps"], generator)
            size = epoch_image_size(epoch, epochs, array.shape[1], settings.get("start_size"))
            began = time.perf_counter()
            train_metrics = train_one_epoch(model, array, targets, labels, plan, optimizer, runtime, generator, head,
                                            recipe, scheduler, averaged, desc=f"epoch {epoch}/{epochs}", size=size)
            seconds = time.perf_counter() - began
            val_size = settings["eval_batch_size"]
            capped = val_rows if settings["max_steps"] is None else val_rows[: settings["max_steps"] * val_size]
            judged = averaged.model if averaged is not None else model
            val_metrics = evaluate(judged, array, labels, capped, runtime, val_size, head, recipe.tta)
            row = {"epoch": epoch, "train_loss": train_metrics["loss"], "train_acc": train_metrics["acc"],
                   "val_loss": val_metrics["loss"], "val_acc": val_metrics["acc"]}
            history.append(row)
            timings.append({"epoch": epoch, "seconds": seconds, "images": train_metrics["images"], "image_size": size,
                            "images_per_s": train_metrics["images"] / seconds})
            if val_metrics["loss"] < best["val_loss"]:
                best = {"epoch": epoch, "val_loss": val_metrics["loss"],
                        "state": {k: v.detach().cpu().clone() for k, v in judged.state_dict().items()}}
            if log:
                log.info("epoch %d/%d: train loss %.4f acc %.3f | val loss %.4f acc %.3f | %.1f img/s%s", epoch, epochs,
                         row["train_loss"], row["train_acc"], row["val_loss"], row["val_acc"],
                         timings[-1]["images_per_s"], " (best so far)" if best["epoch"] == epoch else "")
            # Saved before anything is reported, so an interrupt after the report loses nothing.
            _save_atomic({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict() if scheduler is not None else None,
                          "averaged": averaged.state_dict() if averaged is not None else None,
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
