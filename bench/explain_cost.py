"""What the explain stage costs now, against what it cost before its evidence was added.

before: the explain stage as it was (commit 79fa567): Grad-CAM, guided backprop and guided
        Grad-CAM of the chosen images, one strip and one .npz per image, and a sanity check
        re-initialising the last stage and the classifier (same functions, same plots).
now:    `tasks.explain.run`, the whole stage with its defaults: five CAM methods, guided
        backprop and guided Grad-CAM, strips and per-method strips, deletion and insertion
        curves for every method and a random baseline, cascading randomisation (five steps for
        ConvNeXt) and the random-logit test.
Both at the reference settings (ConvNeXt-Tiny at 224 px, 2 validation images each of 10s and
60s), on the same model and images, in one process, alternately. Target: <= 3x.
The mean Grad-CAM per class (the attention stage, over up to 100 val images per class) is a
separate stage and is timed separately, for information.

    .venv/bin/python bench/explain_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.measure import machine, spread  # noqa: E402
from bench.train_throughput import ensure_images  # noqa: E402
from agelens.flows.pipeline.graph import BY_NAME  # noqa: E402
from agelens.flows.pipeline.settings import RunSettings  # noqa: E402
from agelens.tasks import attention, explain  # noqa: E402
from agelens.tasks.reporting.plots import grids  # noqa: E402
from agelens.tasks.attribution.cams import cam_maps, guided_backprop, guided_grad_cam  # noqa: E402
from agelens.tasks.attribution.layers import resolve_layer  # noqa: E402
from agelens.tasks.data.decoding import decode_into  # noqa: E402
from agelens.tasks.model.inference import Runtime, model_input  # noqa: E402
from agelens.tasks.model.backbones import build_model, last_linear_name  # noqa: E402
from agelens.tasks.attribution.randomisation import rank_correlation  # noqa: E402
from agelens.tasks.core.stage import Job  # noqa: E402

CLASSES = ["10s", "20s", "30s", "40s", "50s", "60s"]


def before(model_path: Path, backbone: str, image_size: int, array: np.ndarray, rows: np.ndarray, folder: Path) -> None:
    """The explain stage as it was: maps, strips, .npz and its one-step sanity check."""
    model = build_model(backbone, len(CLASSES), image_size=image_size)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(model_path))
    model.eval()
    runtime = Runtime(torch.device("cpu"), False, True)
    x = model_input(torch.from_numpy(np.asarray(array[rows])), runtime)

    def maps_of(net, targets=None):
        cams, logits, targets = cam_maps(net, x, "features.-1", ["grad_cam"], targets)
        guided = guided_backprop(net, x, targets)
        return {"grad_cam": cams["grad_cam"].numpy(), "guided_backprop": guided.numpy(),
                "guided_grad_cam": guided_grad_cam(guided, cams["grad_cam"]).numpy()}, targets

    maps, targets = maps_of(model)
    for i, row in enumerate(rows):
        image = np.asarray(array[row])
        grids.save(grids.explanation_strip(image, maps["grad_cam"][i], "grad_cam",
                                           maps["guided_backprop"][i].transpose(1, 2, 0),
                                           maps["guided_grad_cam"][i].transpose(1, 2, 0), "title"),
                   folder / f"strip_{i}.png")
        np.savez_compressed(folder / f"maps_{i}.npz", image=image, **{m: v[i] for m, v in maps.items()})
    randomised = copy.deepcopy(model)
    torch.manual_seed(0)
    for spec in ("features.-1", last_linear_name(model)):
        for module in resolve_layer(randomised, spec).modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            if isinstance(getattr(module, "layer_scale", None), torch.nn.Parameter):
                torch.nn.init.constant_(module.layer_scale, 1e-6)
    random_maps, _ = maps_of(randomised, targets)
    pd.DataFrame([{"method": m, "spearman": float(np.nanmean(rank_correlation(maps[m], random_maps[m])))}
                  for m in maps]).to_csv(folder / "sanity.csv", index=False)


def stage_job(stage: str, out: Path, upstream: dict, settings: RunSettings) -> Job:
    values = settings.dump()
    spec = BY_NAME[stage]
    facts = {k: v for result in upstream.values() for k, v in result["meta"].items()}
    return Job(stage=stage, key=uuid.uuid4().hex[:24], out=str(out), upstream=upstream, context=facts,
               settings={name: values[name] for name in (*spec.reads, *spec.uses)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="convnext_tiny")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=Path, default=Path("data/bench-faces"))
    parser.add_argument("--quick", action="store_true", help="a smoke run: convnext_narrow at 64 px, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.backbone, args.image_size, args.repeats = "convnext_narrow", 64, 1
    settings = RunSettings(backbone=args.backbone, image_size=args.image_size, device="cpu")
    files = ensure_images(args.images, 600)
    per_class = {c: [f for f in files if min(int(f.name.split("_")[0]), 69) // 10 * 10 == int(c[:-1])][:100]
                 for c in CLASSES}
    chosen = [f for c in CLASSES for f in per_class[c]]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "decode" / "d").mkdir(parents=True)
        decoded = decode_into(out / "decode" / "d" / "images.u8", [str(f) for f in chosen], Path("/"), args.image_size, 2)
        assert decoded.all(), "every benchmark image must decode"
        index = pd.DataFrame({"path": [f.name for f in chosen], "split": "val",
                              "label": [c for c in CLASSES for _ in per_class[c]],
                              "class_index": [i for i, c in enumerate(CLASSES) for _ in per_class[c]]})
        index.to_parquet(out / "decode" / "d" / "index.parquet", index=False)
        torch.manual_seed(0)
        model = build_model(args.backbone, len(CLASSES), image_size=args.image_size)
        with torch.no_grad():  # residual branches that matter, as after training
            for module in model.modules():
                if hasattr(module, "layer_scale"):
                    module.layer_scale.fill_(0.5)
        (out / "train" / "t").mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "train" / "t" / "model.safetensors")
        upstream = {
            "decode": {"stage": "decode", "key": "d", "outputs": {"images": {"file": "images.u8"},
                                                                  "index": {"file": "index.parquet"}},
                       "meta": {"image_size": args.image_size, "classes": CLASSES}},
            "train": {"stage": "train", "key": "t", "outputs": {"model": {"file": "model.safetensors"}},
                      "meta": {"backbone": args.backbone, "classes": CLASSES, "image_size": args.image_size,
                               "precision": "auto", "channels_last": "auto"}},
        }
        array = np.memmap(out / "decode" / "d" / "images.u8", dtype=np.uint8, mode="r",
                          shape=(len(index), args.image_size, args.image_size, 3))
        rows = np.concatenate([index.index[index["label"] == c].to_numpy()[:2] for c in ("10s", "60s")])
        times = {"before": [], "now": [], "attention": []}
        parts = []
        for _ in range(args.repeats):
            folder = Path(tempfile.mkdtemp(dir=tmp))
            began = time.perf_counter()
            before(out / "train" / "t" / "model.safetensors", args.backbone, args.image_size, array, rows, folder)
            times["before"].append(time.perf_counter() - began)
            began = time.perf_counter()
            result = explain.run(stage_job("explain", out, upstream, settings))
            times["now"].append(time.perf_counter() - began)
            parts.append(result["summary"]["seconds"])
            began = time.perf_counter()
            attention.run(stage_job("attention", out, upstream, settings))
            times["attention"].append(time.perf_counter() - began)
    ratio = statistics.median(times["now"]) / statistics.median(times["before"])
    print(f"machine:   {machine()}; torch {torch.__version__}, CPU")
    print(f"workload:  {args.backbone} at {args.image_size} px, 2 val images each of 10s and 60s "
          f"(methods: {', '.join(settings.cam_methods)}; faithfulness {settings.faithfulness_steps} steps)")
    print(f"before:    {spread(times['before'], ' s')}  (Grad-CAM, guided backprop, strips, one-step sanity check)")
    print(f"now:       {spread(times['now'], ' s')}  (the whole explain stage)")
    for name in parts[0]:
        print(f"           of which {name}: {statistics.median(p[name] for p in parts):.2f} s")
    print(f"ratio:     {ratio:.2f}x (target <= 3x: {'met' if ratio <= 3 else 'NOT met'})")
    print(f"attention: {spread(times['attention'], ' s')}  (its own stage: mean Grad-CAM over "
          f"{len(index) // len(CLASSES)} val images per class)")


if __name__ == "__main__":
    main()
