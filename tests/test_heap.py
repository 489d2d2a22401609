"""Inside kept_heap a training step's freed memory is reused instead of faulted in again, and it
goes back to the kernel on leaving."""

import resource

import pytest
import torch

from agelens.tasks.model.heap import heap_control, kept_heap

pytestmark = pytest.mark.skipif(not heap_control(), reason="only glibc's allocator can be told")

MB = 1 << 20
STEP_BLOCKS = (48, 8, 48, 24)  # MB allocated together and freed together, like a step's activations
STEP_PAGES = sum(STEP_BLOCKS) * MB // resource.getpagesize()


def faults_of_a_step() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [torch.empty(size * MB, dtype=torch.uint8).fill_(1) for size in STEP_BLOCKS]
    del held
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def anonymous_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:")) / 1024


def test_a_steps_memory_is_reused_inside_and_returned_after():
    with kept_heap():
        warm = [faults_of_a_step() for _ in range(4)]  # the heap grows to the step's size first
        steady = [faults_of_a_step() for _ in range(3)]
        kept = anonymous_mb()
    assert max(steady) < 0.05 * STEP_PAGES, (warm, steady)
    assert anonymous_mb() < kept - 100  # the step's memory given back on leaving
    assert faults_of_a_step() > 0.5 * STEP_PAGES  # and the 48 MB blocks go back to the kernel again


def test_nested_holders_keep_the_setting_until_the_last_leaves():
    with kept_heap():
        with kept_heap():
            [faults_of_a_step() for _ in range(4)]
        assert faults_of_a_step() < 0.05 * STEP_PAGES
