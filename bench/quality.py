"""How good a training recipe is on real faces: each setting trained from scratch (or as given) on
the same data with the same fixed test split, through `agelens run`, and its test metrics with
95% bootstrap intervals, its training time and images per second, and what those images per
second are in GFLOP/s (the model's FLOPs per training image, counted by torch.utils.flop_counter)
and as a share of this machine's peak (a 2048 x 2048 matrix multiply in the precision the run
trained in). On 750 test images a 2-point difference in accuracy is noise; the intervals say how
much is not.

    .venv/bin/python bench/quality.py                          # the demo preset against the cpu preset
    .venv/bin/python bench/quality.py --setting reference --setting "modern:--lr 1e-3 --head ages"
    .venv/bin/python bench/quality.py --quick                  # a smoke run: 40 images per class, 2 epochs

A setting is `name[:extra options]`; `name` is a recipe (reference, adamw, modern). Every setting starts
from `--preset demo --per-class all --split-by image --test-frac 0.1 --weights none --until evaluate`
on a labels CSV of real faces (`--data`; by default FairFace's crops beside the checkout, in
../shared/data/fairface/labels.csv).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.measure import cpu_features, flops_per_image, machine, peak_gflops  # noqa: E402

FAIRFACE = REPO.parent / "shared" / "data" / "fairface" / "labels.csv"
BASE = ["--preset", "demo", "--per-class", "all", "--split-by", "image", "--test-frac", "0.1", "--weights", "none",
        "--until", "evaluate"]
DEFAULT_SETTINGS = ["reference", "modern:--preset cpu"]
SCALING = ["modern:--preset cpu --per-class 150", "modern:--preset cpu --per-class 600", "modern:--preset cpu"]


def run_setting(setting: str, data: Path, out: Path, quick: bool) -> dict:
    name, _, extra = setting.partition(":")
    options = [*BASE, "--recipe", name, *shlex.split(extra)]
    if quick:
        options += ["--per-class", "40", "--epochs", "2", "--test-frac", "0.2"]
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "agelens", "run", "--data", str(data), "--out", str(out), *options,
                           "--json"], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{setting}: agelens failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    train, evaluate = result["stages"]["train"]["summary"], result["stages"]["evaluate"]["summary"]
    split = "test" if evaluate.get("test") else "val"
    return {"setting": setting, "command": "agelens run " + " ".join(shlex.quote(o) for o in options),
            "split": split, "metrics": evaluate[split], "training_seconds": train["training_seconds"],
            "images_per_s": train["train_images_per_s"], "epochs": train["epochs"], "best_epoch": train["best_epoch"],
            "train_images": train["train_images"], "classes": len(result["stages"]["extract"]["summary"]["per_class"]),
            "bf16": train.get("bf16", False), "device": train.get("device", "cpu"),
            "wall_seconds": round(time.monotonic() - began, 1), "settings": result["settings"]}


def _ci(value, bounds, digits=3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f} [{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]"


def add_compute(rows: list[dict]) -> dict[str, float]:
    """Each row's training FLOPs per image, GFLOP/s and share of the peak of the precision it
    trained in; returns the peaks (measured once each, after the runs, on an idle machine)."""
    peaks: dict[str, float] = {}
    flops: dict[tuple[str, int], float] = {}
    for r in rows:
        precision = "bf16" if r["bf16"] else "fp32"
        if precision not in peaks:
            peaks[precision] = peak_gflops(torch.bfloat16 if r["bf16"] else torch.float32, torch.device(r["device"]))
        model = (r["settings"]["backbone"], r["settings"]["image_size"])
        if model not in flops:
            flops[model] = flops_per_image(*model)[1] / 1e9
        r["train_gflop_per_image"] = flops[model]
        r["gflops"] = r["images_per_s"] * r["train_gflop_per_image"]
        r["peak_share"] = r["gflops"] / peaks[precision]
        r["precision"] = precision
    return peaks


def table(rows: list[dict]) -> str:
    lines = ["| setting | test images | accuracy | macro-F1 | within one decade | MAE (years) | training s | img/s | "
             "GFLOP/s (share of peak) | kept epoch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| `{r['setting']}` | {m['images']} | {_ci(m['accuracy'], m['accuracy_ci'])} | "
                     f"{_ci(m['macro_f1'], m['macro_f1_ci'])} | {_ci(m['within_one'], m['within_one_ci'])} | "
                     f"{_ci(m['mae_years'], m['mae_years_ci'], 2)} | {r['training_seconds']:.0f} | "
                     f"{r['images_per_s']:.0f} | {r['gflops']:.0f} ({r['peak_share']:.0%} of {r['precision']}) | "
                     f"{r['best_epoch']} of {r['epochs']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=FAIRFACE, help="labels CSV (default: the FairFace sample)")
    parser.add_argument("--setting", action="append", help="name[:extra options]; repeatable "
                                                           f"(default: {', '.join(DEFAULT_SETTINGS)})")
    parser.add_argument("--out", type=Path, help="output folder (default: a temporary one); reruns are cached")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 40 images per class, 2 epochs")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--scaling", type=Path, metavar="PNG", help="the cpu preset at 150, 600 and all images per class, "
                                                                    "drawn as accuracy against training images into PNG")
    args = parser.parse_args()
    if not args.data.exists():
        raise SystemExit(f"no data at {args.data} (pass --data LABELS.csv)")
    settings = args.setting or (SCALING if args.scaling else DEFAULT_SETTINGS)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        rows = []
        for setting in settings:
            rows.append(run_setting(setting, args.data, out, args.quick))
            print(f"{setting}: {rows[-1]['split']} accuracy {rows[-1]['metrics']['accuracy']:.3f} in "
                  f"{rows[-1]['training_seconds']:.0f} s of training", flush=True)
    peaks = add_compute(rows)
    print(f"\nmachine: {machine()}; {cpu_features()}; torch {torch.__version__}, {torch.get_num_threads()} threads\n"
          "peak: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items())
          + " (2048 x 2048 matrix multiply); FLOPs per training image: "
          + ", ".join(sorted({f"{r['settings']['backbone']} at {r['settings']['image_size']} px "
                              f"{r['train_gflop_per_image']:.3f} GFLOP" for r in rows}))
          + f"\ndata: {args.data}\nsame split for every setting: "
          f"{len({json.dumps({k: r['settings'][k] for k in ('data', 'seed', 'split_by', 'test_frac')}) for r in rows}) == 1}\n")
    print(table(rows))
    if len(rows) >= 2:
        first, last = rows[0]["metrics"], rows[-1]["metrics"]
        print(f"\n{rows[-1]['setting']} vs {rows[0]['setting']}: accuracy {last['accuracy'] - first['accuracy']:+.3f} "
              f"({last['accuracy'] / max(first['accuracy'], 1e-9):.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.scaling:
        from agelens.tasks.reporting.plots import base, runs as run_plots

        points = [{"train_images": r["train_images"], "split": r["split"], "accuracy": r["metrics"]["accuracy"],
                   "accuracy_ci": r["metrics"]["accuracy_ci"]} for r in rows]
        base.save(run_plots.learning_curve(points, 1 / rows[0]["classes"], "What more images buy: "
                                           f"{rows[0]['setting'].partition(':')[2].split(' --per-class')[0]}"),
                  args.scaling)
        print(f"\nplot: {args.scaling}")


if __name__ == "__main__":
    main()
