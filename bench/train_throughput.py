"""Training throughput: the reference notebook's loop, agelens's loop, and the model alone.

reference: PIL decode + torchvision transforms (Resize, flip, ColorJitter, ToTensor, Normalize)
           in a DataLoader, fp32, NCHW, Adam, batch 32.
agelens:   images decoded once into a uint8 array on disk, read as a memmap in batches (prefetched
           in a thread), augmented on tensors, bf16 autocast and channels-last where `auto` picks
           them on this device (tasks/inference.py).
ceiling:   the same model, precision and layout on synthetic tensors already on the device: what
           training costs with a free data path.
Each loop is timed over a window long enough to be stable (20 s on a CPU, 10 s on a GPU) after
one warm-up step, and every figure divides the images a loop actually processed by its time.
Each is repeated (median, min and max). Targets: agelens >= 1.5x reference on CPU (3x on GPU);
agelens >= 90% of the ceiling.

    .venv/bin/python bench/train_throughput.py            # ConvNeXt-Tiny, 224 px
    .venv/bin/python bench/train_throughput.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.measure import machine, spread  # noqa: E402
from agelens.tasks.data.decoding import decode_into  # noqa: E402
from agelens.tasks.data.demo import DemoSpec, write_demo  # noqa: E402
from agelens.tasks.model.inference import IMAGENET_MEAN, IMAGENET_STD, Runtime, prepare  # noqa: E402
from agelens.tasks.model.backbones import build_model  # noqa: E402
from agelens.tasks.model.heads import Head  # noqa: E402
from agelens.tasks.model.recipes import RECIPES  # noqa: E402
from agelens.tasks.model.training import epoch_plan, train_one_epoch  # noqa: E402


def ensure_images(folder: Path, needed: int) -> list[Path]:
    """`needed` drawn faces: the folder is (re)generated whenever it holds fewer."""
    folder = folder.resolve()
    files = sorted((folder / "CACD2000").glob("*.jpg")) if (folder / "CACD2000").is_dir() else []
    if len(files) < needed:
        write_demo(folder, DemoSpec(identities=math.ceil(needed / 10) + 6, images_per_identity=10))
        files = sorted((folder / "CACD2000").glob("*.jpg"))
    assert len(files) >= needed, f"{folder} holds {len(files)} images, {needed} needed"
    return files[:needed]


def labels_of(files: list[Path]) -> np.ndarray:
    return np.array([min(int(f.name.split("_")[0]), 69) // 10 - 1 for f in files])


class ReferenceDataset(Dataset):
    def __init__(self, files, labels, transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(Image.open(self.files[i]).convert("RGB")), int(self.labels[i])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reference_loop(files, labels, backbone, size, batch_size, steps, device, workers) -> tuple[int, float]:
    """(images processed in the timed steps, seconds): the notebook's loop."""
    transform = transforms.Compose([
        transforms.Resize(size), transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(brightness=0.2, contrast=0.2), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    loader = DataLoader(ReferenceDataset(files, labels, transform), batch_size=batch_size, shuffle=True,
                        num_workers=workers, drop_last=True)
    torch.manual_seed(0)
    model = build_model(backbone, 6).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    criterion = torch.nn.CrossEntropyLoss()
    began, seen = None, 0
    for step, (x, y) in enumerate(loader):
        if step == 1:  # after one warm-up step
            _sync(device)
            began = time.perf_counter()
        x, y = x.to(device), y.to(device)
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= 1:
            seen += len(y)
        if step == steps:
            break
    _sync(device)
    return seen, time.perf_counter() - began


def decoded_array(files: list[Path], size: int, folder: Path) -> np.memmap:
    """The files decoded as the decode stage does, opened as the training stage does."""
    path = folder / f"images-{size}.u8"
    ok = decode_into(path, [str(f) for f in files], Path("/"), size, os.cpu_count() or 1)
    assert ok.all(), "every benchmark image must decode"
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(len(files), size, size, 3))


def agelens_loop(array: np.ndarray, labels: np.ndarray, backbone, batch_size, steps, runtime) -> tuple[int, float]:
    """(images processed in the timed steps, seconds): the training stage's loop, with the
    reference recipe (the same work per image as the notebook's loop)."""
    torch.manual_seed(0)
    model = prepare(build_model(backbone, 6), runtime)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    rows = np.arange(len(labels))
    head, recipe = Head("classes", tuple(f"{d}0s" for d in range(1, 7))), RECIPES["reference"]

    def epoch(plan):
        return train_one_epoch(model, array, labels, labels, plan, optimizer, runtime, generator, head, recipe)

    epoch(epoch_plan(rows[:batch_size], batch_size, 1, generator))  # warm-up
    plan = epoch_plan(rows[batch_size:], batch_size, steps, generator)
    _sync(runtime.device)
    began = time.perf_counter()
    seen = epoch(plan)["images"]
    _sync(runtime.device)
    return seen, time.perf_counter() - began


def ceiling_loop(backbone, size, batch_size, steps, runtime) -> tuple[int, float]:
    """(images, seconds) of the model alone: synthetic tensors already on the device."""
    torch.manual_seed(0)
    model = prepare(build_model(backbone, 6), runtime).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, 3, size, size, device=runtime.device)
    x = x.contiguous(memory_format=torch.channels_last) if runtime.channels_last else x
    y = torch.randint(0, 6, (batch_size,), device=runtime.device)
    seen = 0
    for step in range(steps + 1):
        if step == 1:
            _sync(runtime.device)
            began = time.perf_counter()
        with runtime.autocast():
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += batch_size if step >= 1 else 0
    _sync(runtime.device)
    return seen, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="convnext_tiny")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=None, help="timed window per loop (default 20 CPU, 10 GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the reference loop")
    parser.add_argument("--images", type=Path, default=Path("data/bench-faces"))
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 s windows, one repeat")
    args = parser.parse_args()
    runtime = Runtime.resolve(args.device, "auto", "auto")
    window = args.seconds or (2.0 if args.quick else 10.0 if runtime.device.type == "cuda" else 20.0)
    repeats = 1 if args.quick else args.repeats

    # Steps for the window, from the ceiling's speed (the data-bound loops then take longer).
    _, seconds = ceiling_loop(args.backbone, args.image_size, args.batch_size, 2, runtime)
    steps = max(3, math.ceil(window / (seconds / 2)))
    files = ensure_images(args.images, args.batch_size * (steps + 1))
    labels = labels_of(files)
    with tempfile.TemporaryDirectory(dir=args.images) as scratch:
        array = decoded_array(files, args.image_size, Path(scratch))
        rates = {"reference": [], "agelens": [], "ceiling": []}
        for _ in range(repeats):
            for name, loop in (("ceiling", lambda: ceiling_loop(args.backbone, args.image_size, args.batch_size, steps,
                                                                runtime)),
                               ("agelens", lambda: agelens_loop(array, labels, args.backbone, args.batch_size, steps,
                                                                runtime)),
                               ("reference", lambda: reference_loop(files, labels, args.backbone, args.image_size,
                                                                    args.batch_size, steps, runtime.device, args.workers))):
                images, took = loop()
                assert images == args.batch_size * steps, (name, images)
                rates[name].append(images / took)
    median = {k: statistics.median(v) for k, v in rates.items()}
    device = torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else machine()
    print(f"machine:   {device}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"workload:  {args.backbone} at {args.image_size} px, batch {args.batch_size}, {steps} timed steps "
          f"({args.batch_size * steps} images) per loop after 1 warm-up step, {len(files)} drawn 250x250 JPEG faces; "
          f"{'bf16' if runtime.bf16 else 'fp32'}, {'channels-last' if runtime.channels_last else 'NCHW'} for agelens "
          f"and the ceiling")
    for name, text in (("reference", "PIL + transforms in a DataLoader, fp32, NCHW"),
                       ("agelens", "decoded memmap, prefetched batches, tensor augmentation"),
                       ("ceiling", "model alone on synthetic tensors on the device")):
        print(f"{name + ':':<11}{spread(rates[name], ' images/s')}  ({text})")
    target = 3.0 if runtime.device.type == "cuda" else 1.5
    speedup, share = median["agelens"] / median["reference"], median["agelens"] / median["ceiling"]
    print(f"ratio:     agelens / reference {speedup:.2f}x (target >= {target}x: {'met' if speedup >= target else 'NOT met'}); "
          f"agelens / ceiling {share:.0%} (target >= 90%: {'met' if share >= 0.9 else 'NOT met'})")


if __name__ == "__main__":
    main()
