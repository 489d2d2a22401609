import math

import pytest
import torch

from agelens.tasks.model import inference
from agelens.tasks.model.inference import BF16_PAYS, Runtime, bf16_matmul_speedup, use_bf16

CPU = torch.device("cpu")


def test_an_explicit_precision_is_kept():
    assert use_bf16("bf16", CPU) is True
    assert use_bf16("fp32", CPU) is False
    assert Runtime.resolve("cpu", "fp32", "off") == Runtime(CPU, False, False)


def test_auto_without_native_bf16_is_fp32_and_measures_nothing(monkeypatch):
    monkeypatch.setattr(inference, "native_bf16_cpu", lambda: False)
    monkeypatch.setattr(inference, "bf16_matmul_speedup", lambda threads: pytest.fail("measured"))
    assert use_bf16("auto", CPU) is False


@pytest.mark.parametrize("speedup, expected", [(2.1, True), (BF16_PAYS, True), (1.1, False), (0.45, False)])
def test_auto_with_native_bf16_follows_the_measured_speedup(monkeypatch, speedup, expected):
    asked = []
    monkeypatch.setattr(inference, "native_bf16_cpu", lambda: True)
    monkeypatch.setattr(inference, "bf16_matmul_speedup", lambda threads: asked.append(threads) or speedup)
    assert use_bf16("auto", CPU) is expected
    assert asked == [torch.get_num_threads()]


def test_the_speedup_is_measured_once_per_thread_count():
    bf16_matmul_speedup.cache_clear()
    first = bf16_matmul_speedup(torch.get_num_threads(), n=128)
    assert math.isfinite(first) and first > 0
    assert bf16_matmul_speedup(torch.get_num_threads(), n=128) == first
    assert bf16_matmul_speedup.cache_info().hits == 1
