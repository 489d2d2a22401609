"""Training throughput against the machine's limit, and the training step now against before.

before:    the training step as it was (the plain eager loop): augmentation inline as it was
           (bench/step_as_it_was.py), the optimiser's per-parameter loop, the moving average tensor
           by tensor, bf16 wherever the CPU has it natively (faster or not).
now:       the training stage's step (tasks/model/training.py): fused optimiser, the moving average
           in one call, convolutions on maps of at most 3x3 in NCHW with matrix-multiply
           gradients and on 4x4 maps in NCHW (tasks/model/smallmaps.py), bf16 only where this CPU's bf16
           matrix multiply is measured faster than its fp32 one, glibc's allocator keeping the
           step's memory (tasks/model/heap.py), a ResNet's stem normalising after its max pool
           (tasks/model/stem.py), where bf16 runs on AMX convolutions on maps of at most 5x5 by
           matrix multiply, augmentation in one pass per step with the flip in the crop's map.
ceiling:   the same model (small maps included), precision, layout and allocator setting on
           synthetic tensors already on the device: what training costs with a free data path
           (the model-only ratio).
Both training loops read images decoded once into a uint8 array (a memmap, batches prefetched),
with channels-last where `auto` picks it. Each loop is timed over a window
(10 s on a CPU, 5 s on a GPU) after one warm-up step, each run of a loop in a worker thread of a
fresh process (as the pipeline trains; an allocator setting or a warm heap must not carry from one
loop into the next), the loops alternate, and every figure divides the images a loop processed by
its time; medians of the repeats. The model's FLOPs per
image are counted with torch.utils.flop_counter (a multiply-add is two), so images/s become
GFLOP/s, shown as a share of this machine's peak: a large fp32 matrix multiply on the same
threads, and bf16 where the CPU has it natively. Targets: now >= 1.4x before; now >= 90% of the
ceiling. With --notebook, also the reference notebook's loop (PIL + transforms in a DataLoader,
fp32, NCHW) against the training stage's with the reference recipe (target >= 1.5x).

    .venv/bin/python bench/train_throughput.py --backbone resnet10 --image-size 64 --batch-size 64
    .venv/bin/python bench/train_throughput.py --notebook                # ConvNeXt-Tiny, 224 px
    .venv/bin/python bench/train_throughput.py --quick                   # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import math
import multiprocessing
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
from bench.measure import cpu_features, flops_per_image, machine, peak_gflops, spread  # noqa: E402
from agelens.tasks.data.decoding import decode_into  # noqa: E402
from agelens.tasks.data.demo import DemoSpec, write_demo  # noqa: E402
from agelens.tasks.model.inference import IMAGENET_MEAN, IMAGENET_STD, Runtime, native_bf16_cpu, prepare  # noqa: E402
from agelens.tasks.model.backbones import build_model  # noqa: E402
from agelens.tasks.model.heads import Head  # noqa: E402
from agelens.tasks.model.heap import kept_heap  # noqa: E402
from agelens.tasks.model.recipes import RECIPES  # noqa: E402
from agelens.tasks.model.training import epoch_plan, for_training, train_one_epoch  # noqa: E402


def ensure_images(folder: Path, needed: int) -> list[Path]:
    """`needed` drawn faces: the folder is (re)generated whenever it holds fewer."""
    folder = folder.resolve()
    files = sorted((folder / "CACD2000").glob("*.jpg")) if (folder / "CACD2000").is_dir() else []
    if len(files) < needed:
        per = max(10, math.ceil(needed / 200))  # CACD's rank is a byte: at most 255 people
        write_demo(folder, DemoSpec(identities=math.ceil(needed / per) + 6, images_per_identity=per))
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


def agelens_loop(array: np.ndarray, labels: np.ndarray, backbone, batch_size, steps, runtime,
                 recipe_name: str = "reference") -> tuple[int, float]:
    """(images processed in the timed steps, seconds): the training stage's step."""
    from agelens.tasks.model.training import Averaged, optimiser

    torch.manual_seed(0)
    model = for_training(build_model(backbone, 6, image_size=array.shape[1]), runtime, array.shape[1])
    recipe = RECIPES[recipe_name]
    optimizer, scheduler = optimiser(model, recipe, 1e-4, 10 * steps)
    averaged = Averaged(model, recipe.ema, 10 * steps) if recipe.ema else None
    generator = torch.Generator().manual_seed(0)
    rows = np.arange(len(labels))
    head = Head("classes", tuple(f"{d}0s" for d in range(1, 7)))

    def epoch(plan):
        return train_one_epoch(model, array, labels, labels, plan, optimizer, runtime, generator, head, recipe,
                               scheduler, averaged)

    with kept_heap():  # as fit() trains
        epoch(epoch_plan(rows[:batch_size], batch_size, 1, generator))  # warm-up
        plan = epoch_plan(rows[batch_size:], batch_size, steps, generator)
        _sync(runtime.device)
        began = time.perf_counter()
        seen = epoch(plan)["images"]
        _sync(runtime.device)
        return seen, time.perf_counter() - began


def before_loop(array: np.ndarray, labels: np.ndarray, backbone, batch_size, steps, runtime,
                recipe_name: str) -> tuple[int, float]:
    """(images, seconds) of the training step as it was: the same work per image as the stage's
    (same model, precision, layout, recipe, batch), done the plain eager way."""
    from agelens.tasks.data.arrays import batches
    from agelens.tasks.model.inference import to_float
    from bench.step_as_it_was import augment_as_it_was, normalise_as_it_was

    torch.manual_seed(0)
    model = prepare(build_model(backbone, 6, image_size=array.shape[1]), runtime).train()
    recipe = RECIPES[recipe_name]
    params = [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": recipe.weight_decay},
              {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = (torch.optim.Adam(model.parameters(), lr=1e-4, foreach=False) if recipe.optimizer == "adam"
                 else torch.optim.AdamW(params, lr=1e-4, foreach=False))
    averaged = copy.deepcopy(model).eval() if recipe.ema else None
    generator = torch.Generator().manual_seed(0)
    head = Head("classes", tuple(f"{d}0s" for d in range(1, 7)))
    plan = epoch_plan(np.arange(len(labels)), batch_size, steps + 1, generator)
    began, seen = None, 0
    for step, (rows, batch) in enumerate(batches(array, plan, runtime.device)):
        if step == 1:
            _sync(runtime.device)
            began = time.perf_counter()
        x = normalise_as_it_was(augment_as_it_was(to_float(batch, runtime), generator, recipe.augment))
        y = torch.from_numpy(labels[rows]).to(runtime.device)
        with runtime.autocast():
            logits = model(x)
        loss = head.loss(logits, y, recipe.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if averaged is not None:
            with torch.no_grad():
                for mine, theirs in zip(averaged.state_dict().values(), model.state_dict().values()):
                    if mine.dtype.is_floating_point:
                        mine.mul_(0.999).add_(theirs.detach(), alpha=0.001)
                    else:
                        mine.copy_(theirs)
        loss.item()
        seen += len(rows) if step >= 1 else 0
    _sync(runtime.device)
    return seen, time.perf_counter() - began


def ceiling_loop(backbone, size, batch_size, steps, runtime, recipe_name: str) -> tuple[int, float]:
    """(images, seconds) of the model alone, with the step's optimiser: synthetic tensors already on the device."""
    from agelens.tasks.model.training import optimiser

    torch.manual_seed(0)
    model = for_training(build_model(backbone, 6, image_size=size), runtime, size).train()
    optimizer, _ = optimiser(model, RECIPES[recipe_name], 1e-4, 10 * steps)
    x = torch.randn(batch_size, 3, size, size, device=runtime.device)
    x = x.contiguous(memory_format=torch.channels_last) if runtime.channels_last else x
    y = torch.randint(0, 6, (batch_size,), device=runtime.device)
    seen = 0
    with kept_heap():
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


def run_loop(name: str, job: dict) -> tuple[int, float]:
    """(images, seconds) of loop `name`: run in a fresh process (see the module's docstring)."""
    array = (np.memmap(job["array"], dtype=np.uint8, mode="r", shape=job["shape"]) if job["array"] else None)
    labels, backbone, size, batch_size, steps = job["labels"], job["backbone"], job["size"], job["batch"], job["steps"]
    if name == "before":
        return before_loop(array, labels, backbone, batch_size, steps, job["was"], job["recipe"])
    if name == "now":
        return agelens_loop(array, labels, backbone, batch_size, steps, job["runtime"], job["recipe"])
    if name == "ceiling":
        return ceiling_loop(backbone, size, batch_size, steps, job["runtime"], job["recipe"])
    if name == "notebook":
        return reference_loop(job["files"], labels, backbone, size, batch_size, steps, job["runtime"].device,
                              job["workers"])
    if name == "now, reference recipe":
        return agelens_loop(array, labels, backbone, batch_size, steps, job["runtime"], "reference")
    raise ValueError(name)


def in_worker_thread(name: str, job: dict) -> tuple[int, float]:
    """run_loop in a worker thread, where the pipeline's task runner trains (glibc serves its
    allocations from another arena than the main thread's)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run_loop, name, job).result()


def in_fresh_process(name: str, job: dict) -> tuple[int, float]:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(in_worker_thread, name, job).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="convnext_tiny")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--recipe", default="modern", help="recipe of the before/now step (default: the cpu preset's)")
    parser.add_argument("--seconds", type=float, default=None, help="timed window per loop (default 10 CPU, 5 GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--notebook", action="store_true", help="also the reference notebook's loop")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the notebook's loop")
    parser.add_argument("--images", type=Path, default=Path("data/bench-faces"))
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 s windows, one repeat")
    args = parser.parse_args()
    runtime = Runtime.resolve(args.device, "auto", "auto")
    # The step as it was chose bf16 wherever the CPU has it natively, faster or not.
    was = Runtime(runtime.device, native_bf16_cpu() if runtime.device.type == "cpu" else runtime.bf16,
                  runtime.channels_last)
    window = args.seconds or (2.0 if args.quick else 5.0 if runtime.device.type == "cuda" else 10.0)
    repeats = 1 if args.quick else args.repeats

    # Steps for the window, from the ceiling's speed (the data-bound loops then take longer).
    _, seconds = ceiling_loop(args.backbone, args.image_size, args.batch_size, 2, runtime, args.recipe)
    steps = max(3, math.ceil(window / (seconds / 2)))
    files = ensure_images(args.images, args.batch_size * (steps + 1))
    labels = labels_of(files)
    loops = ["before", "now", "ceiling"] + (["notebook", "now, reference recipe"] if args.notebook else [])
    with tempfile.TemporaryDirectory(dir=args.images) as scratch:
        array = decoded_array(files, args.image_size, Path(scratch))
        job = {"array": array.filename, "shape": array.shape, "labels": labels, "files": files,
               "backbone": args.backbone, "size": args.image_size, "batch": args.batch_size, "steps": steps,
               "recipe": args.recipe, "runtime": runtime, "was": was, "workers": args.workers}
        rates = {name: [] for name in loops}
        for _ in range(repeats):  # alternating, so a slower minute of the machine hits every loop alike
            for name in loops:
                images, took = in_fresh_process(name, job)
                assert images == args.batch_size * steps, (name, images)
                rates[name].append(images / took)
    median = {k: statistics.median(v) for k, v in rates.items()}
    forward, trained = flops_per_image(args.backbone, args.image_size)
    peaks = {"fp32": peak_gflops(torch.float32, runtime.device)}
    if runtime.bf16 or was.bf16:
        peaks["bf16"] = peak_gflops(torch.bfloat16, runtime.device)
    device = (torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda"
              else f"{machine()}; {cpu_features()}")
    print(f"machine:   {device}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"workload:  {args.backbone} at {args.image_size} px, batch {args.batch_size}, recipe {args.recipe}, {steps} "
          f"timed steps ({args.batch_size * steps} images) per loop after 1 warm-up step, {repeats} alternating repeats; "
          f"{'bf16' if runtime.bf16 else 'fp32'}, {'channels-last' if runtime.channels_last else 'NCHW'}"
          + (f" (before: {'bf16' if was.bf16 else 'fp32'})" if was.bf16 != runtime.bf16 else ""))
    print(f"flops:     {forward / 1e9:.3f} GFLOP per image forward, {trained / 1e9:.3f} per training image "
          "(torch.utils.flop_counter)")
    print("peak:      " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items())
          + " (2048 x 2048 matrix multiply, same threads)")
    top = max(peaks.values())
    for name, text in (("before", "the plain eager step"), ("now", "the training stage's step"),
                       ("ceiling", "model alone on synthetic tensors"), ("notebook", "PIL + transforms, fp32, NCHW"),
                       ("now, reference recipe", "the stage's step with the notebook's recipe")):
        if name in rates:
            print(f"{name + ':':<11}{spread(rates[name], ' images/s')} = {median[name] * trained / 1e9:.0f} GFLOP/s, "
                  f"{median[name] * trained / 1e9 / top:.0%} of peak  ({text})")
    speedup, share = median["now"] / median["before"], median["now"] / median["ceiling"]
    print(f"ratio:     now / ceiling {share:.0%} (target >= 90%: {'met' if share >= 0.9 else 'NOT met'})")
    if args.notebook:
        ratio = median["now, reference recipe"] / median["notebook"]
        target = 3.0 if runtime.device.type == "cuda" else 1.5
        print(f"ratio:     agelens / notebook {ratio:.2f}x (target >= {target}x: {'met' if ratio >= target else 'NOT met'})")
    if repeats > 1:  # each repeat's loops ran minutes apart at most: its ratio shows how much the machine moved
        paired = [now / before for now, before in zip(rates["now"], rates["before"])]
        print(f"paired:    now / before in each repeat {', '.join(f'{r:.2f}' for r in paired)} "
              f"(median {statistics.median(paired):.2f})")
    print(f"step speed-up: {speedup:.2f} (target >= 1.4: {'met' if speedup >= 1.4 else 'NOT met'})")


if __name__ == "__main__":
    main()
