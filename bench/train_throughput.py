"""Training throughput: the reference notebook's loop against agelens's, same model and images.

Reference: PIL decode + torchvision transforms (Resize, flip, ColorJitter, ToTensor,
Normalize) in a DataLoader, fp32, NCHW, Adam, batch 32.
agelens:   images decoded once into a uint8 array, augmentation on tensors, bf16 autocast
           and channels-last where `auto` picks them on this device (tasks/models.py).
Both run the same number of optimisation steps after one warm-up step. Target (issue 3):
>= 1.5x on CPU at 224 px, >= 3x on a GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from tasks.decode import decode_all
from tasks.demo import DemoSpec, write_demo
from tasks.models import build_model
from tasks.train import IMAGENET_MEAN, IMAGENET_STD, Runtime, TrainSettings, train_one_epoch


class ReferenceDataset(Dataset):
    def __init__(self, files, labels, transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(Image.open(self.files[i]).convert("RGB")), int(self.labels[i])


def reference_loop(files, labels, backbone, size, batch_size, steps, device, workers) -> float:
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
            if device.type == "cuda":
                torch.cuda.synchronize()
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
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - began)


def agelens_loop(files, labels, backbone, size, batch_size, steps, runtime) -> tuple[float, float]:
    decode_began = time.perf_counter()
    images = np.zeros((len(files), size, size, 3), np.uint8)
    decoded = decode_all([str(f) for f in files], Path("/"), size, images, threads=os.cpu_count() or 1)
    assert decoded.all(), "every benchmark image must decode"
    decode_seconds = time.perf_counter() - decode_began
    settings = TrainSettings(backbone=backbone, batch_size=batch_size)
    torch.manual_seed(0)
    model = build_model(backbone, 6).to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    warm = slice(0, batch_size)
    train_one_epoch(model, images[warm], labels[warm], optimizer, settings, runtime, generator)
    timed = slice(batch_size, batch_size * (steps + 1))
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    train_one_epoch(model, images[timed], labels[timed], optimizer, settings, runtime, generator)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    return batch_size * steps / (time.perf_counter() - began), decode_seconds


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="convnext_tiny")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed optimisation steps per loop")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the reference loop")
    parser.add_argument("--images", type=Path, default=Path("data/bench-faces"))
    args = parser.parse_args()

    needed = args.batch_size * (args.steps + 1)
    if not (args.images / "CACD2000").exists():
        write_demo(args.images, DemoSpec(identities=max(6, needed // 10 + 1), images_per_identity=10))
    files = sorted((args.images / "CACD2000").resolve().iterdir())[:needed]
    labels = np.array([min(int(f.name.split("_")[0]), 69) // 10 - 1 for f in files])
    runtime = Runtime.resolve(args.device, "auto", "auto")

    ours, decode_seconds = agelens_loop(files, labels, args.backbone, args.image_size, args.batch_size,
                                        args.steps, runtime)
    reference = reference_loop(files, labels, args.backbone, args.image_size, args.batch_size, args.steps,
                               runtime.device, args.workers)
    print(f"machine:   {machine(runtime.device)}")
    print(f"workload:  {args.backbone} at {args.image_size} px, batch {args.batch_size}, "
          f"{args.steps} timed steps after 1 warm-up, {len(files)} drawn 250x250 JPEG faces")
    print(f"reference: {reference:8.2f} images/s  (PIL + transforms in DataLoader, fp32, NCHW)")
    print(f"agelens:   {ours:8.2f} images/s  (decoded array, tensor augmentation, "
          f"{'bf16' if runtime.bf16 else 'fp32'}, {'channels-last' if runtime.channels_last else 'NCHW'}; "
          f"one-off decode {decode_seconds:.2f} s)")
    target = 3.0 if runtime.device.type == "cuda" else 1.5
    ratio = ours / reference
    print(f"ratio:     {ratio:.2f}x  (target >= {target}x: {'met' if ratio >= target else 'NOT met'})")


if __name__ == "__main__":
    main()
