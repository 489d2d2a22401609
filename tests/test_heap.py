"""Inside kept_heap a training step's freed memory is reused instead of faulted in again, and it
goes back to the kernel on leaving: in the main thread and in a worker thread (where the pipeline
trains, and where glibc serves allocations from another arena). Each case runs in a fresh
interpreter, so no earlier test's allocations shape the heap it sees."""

import json
import subprocess
import sys

import pytest

from agelens.tasks.model.heap import heap_control

pytestmark = pytest.mark.skipif(not heap_control(), reason="only glibc's allocator can be told")

STEPS = """
import json, resource, sys
from concurrent.futures import ThreadPoolExecutor
import torch
from agelens.tasks.model.heap import kept_heap

MB = 1 << 20
BLOCKS = (48, 8, 48, 24)  # MB allocated together and freed together, like a step's activations

def faults_of_a_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [torch.empty(size * MB, dtype=torch.uint8).fill_(1) for size in BLOCKS]
    del held
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def anonymous_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:")) / 1024

def measure():
    with kept_heap():
        # The heap grows to the step's size first, over up to six steps (its holes fit the blocks
        # only once it is large enough); eight always sufficed in 40 fresh interpreters.
        warm = [faults_of_a_step() for _ in range(8)]
        steady = [faults_of_a_step() for _ in range(3)]
        kept = anonymous_mb()
    left = anonymous_mb()
    return {"warm": warm, "steady": steady, "kept_mb": kept, "left_mb": left, "after": faults_of_a_step(),
            "pages": sum(BLOCKS) * MB // resource.getpagesize()}

if sys.argv[1] == "worker thread":
    with ThreadPoolExecutor(1) as pool:
        print(json.dumps(pool.submit(measure).result()))
else:
    print(json.dumps(measure()))
"""


@pytest.mark.parametrize("where", ["main thread", "worker thread"])
def test_a_steps_memory_is_reused_inside_and_returned_after(where):
    done = subprocess.run([sys.executable, "-c", STEPS, where], capture_output=True, text=True, check=True)
    seen = json.loads(done.stdout.splitlines()[-1])
    assert max(seen["steady"]) < 0.05 * seen["pages"], seen
    assert seen["left_mb"] < seen["kept_mb"] - 100, seen  # the step's memory given back on leaving
    assert seen["after"] > 0.5 * seen["pages"], seen  # and the 48 MB blocks go back to the kernel again


def test_nested_holders_keep_the_setting_until_the_last_leaves():
    assert STEPS.count("    with kept_heap():\n") == 1
    nested = STEPS.replace("    with kept_heap():\n", "    with kept_heap():\n        with kept_heap():\n            pass\n")
    done = subprocess.run([sys.executable, "-c", nested, "main thread"], capture_output=True, text=True, check=True)
    seen = json.loads(done.stdout.splitlines()[-1])
    assert max(seen["steady"]) < 0.05 * seen["pages"], seen
