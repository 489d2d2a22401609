"""Benchmarks count what they ran: images processed divided by the time, whatever is on disk."""

import numpy as np
import torch

from bench import quality
from bench.measure import flops_per_image
from bench.train_throughput import (agelens_loop, before_loop, ceiling_loop, decoded_array, ensure_images,
                                   in_fresh_process, labels_of, reference_loop)
from agelens.tasks.data.demo import DemoSpec, write_demo
from agelens.tasks.model.inference import Runtime


def test_loops_count_the_images_they_processed_even_when_too_few_were_on_disk(tmp_path):
    write_demo(tmp_path, DemoSpec(identities=1, images_per_identity=10))  # 10 images; 4 x (3 + 1) = 16 needed
    files = ensure_images(tmp_path, 16)
    assert len(files) == 16 and len(list((tmp_path / "CACD2000").glob("*.jpg"))) >= 16
    labels = labels_of(files)
    runtime = Runtime.resolve("cpu", "fp32", "off")
    seen, seconds = reference_loop(files, labels, "convnext_narrow", 32, 4, 3, torch.device("cpu"), 0)
    assert seen == 12 and seconds > 0
    array = decoded_array(files, 32, tmp_path)
    assert array.shape == (16, 32, 32, 3) and np.asarray(array).any()
    assert agelens_loop(array, labels, "convnext_narrow", 4, 3, runtime)[0] == 12
    assert agelens_loop(array, labels, "convnext_narrow", 4, 3, runtime, "modern")[0] == 12
    assert before_loop(array, labels, "convnext_narrow", 4, 3, runtime, "modern")[0] == 12
    assert ceiling_loop("convnext_narrow", 32, 4, 3, runtime, "modern")[0] == 12
    job = {"array": array.filename, "shape": array.shape, "labels": labels, "files": files, "backbone": "convnext_narrow",
           "size": 32, "batch": 4, "steps": 3, "recipe": "modern", "runtime": runtime, "was": runtime, "workers": 0}
    assert in_fresh_process("now", job)[0] == 12  # what the benchmark runs: each loop in its own process


def test_flops_are_counted_per_image_forward_and_for_a_training_step():
    forward, trained = flops_per_image("resnet10", 64)
    # ResNet-10 at 64 px: a known 0.145 GFLOP forward; a training step costs about three forwards.
    assert abs(forward / 1e9 - 0.145) < 0.005 and 2.5 < trained / forward < 3.2


def test_quality_rows_get_gflops_and_the_share_of_their_precisions_peak(monkeypatch):
    measured = []
    monkeypatch.setattr(quality, "peak_gflops", lambda dtype, device: measured.append(dtype) or
                        {torch.float32: 300.0, torch.bfloat16: 1800.0}[dtype])
    rows = [{"images_per_s": 400.0, "bf16": flag, "device": "cpu", "settings": {"backbone": "resnet10", "image_size": 64}}
            for flag in (False, True, True)]
    peaks = quality.add_compute(rows)
    assert peaks == {"fp32": 300.0, "bf16": 1800.0} and len(measured) == 2  # each precision's peak measured once
    trained = flops_per_image("resnet10", 64)[1] / 1e9
    assert abs(rows[0]["gflops"] - 400 * trained) < 1e-9 and abs(rows[0]["peak_share"] - 400 * trained / 300) < 1e-9
    assert abs(rows[1]["peak_share"] - 400 * trained / 1800) < 1e-9 and rows[1]["precision"] == "bf16"
    row = f"| {rows[0]['gflops']:.0f} ({rows[0]['peak_share']:.0%} of fp32) |"
    assert row in quality.table([{**rows[0], "setting": "x", "training_seconds": 1.0, "best_epoch": 1, "epochs": 1,
                                        "metrics": {"images": 10, "accuracy": 0.5, "accuracy_ci": [0.4, 0.6],
                                                    "macro_f1": 0.5, "macro_f1_ci": [0.4, 0.6], "within_one": 0.8,
                                                    "within_one_ci": [0.7, 0.9], "mae_years": 8.0,
                                                    "mae_years_ci": [7.0, 9.0]}}])
