"""What every benchmark shares: the machine it ran on (and its instruction sets and matrix-multiply
peak), a model's FLOPs per image, repeated timings summarised as median (min-max), anonymous
memory of a process tree, and a memory cgroup to run large checks in."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or platform.machine())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, Python {platform.python_version()}"


def cpu_features() -> str:
    try:
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return "features unknown"
    named = [name for flag, name in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"),
                                     ("amx_tile", "AMX")) if flag in flags]
    return ", ".join(named) or "no AVX2"


def flops_per_image(backbone: str, size: int) -> tuple[float, float]:
    """(forward, training step) FLOPs per image of a 6-class model, counted by torch (a multiply-add is two)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from agelens.tasks.model.backbones import build_model

    model = build_model(backbone, 6, image_size=size)
    x = torch.randn(4, 3, size, size)
    with FlopCounterMode(display=False) as counted:
        model(x)
    forward = counted.get_total_flops() / 4
    with FlopCounterMode(display=False) as counted:
        model(x).sum().backward()
    return forward, counted.get_total_flops() / 4


def peak_gflops(dtype, device, n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of an n x n matrix multiply on this device and its threads."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    sync()
    began = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n ** 3 * repeats / (time.perf_counter() - began) / 1e9


def spread(values: list[float], unit: str = "", digits: int = 2) -> str:
    """'median (min-max, n runs)'."""
    return (f"{statistics.median(values):.{digits}f}{unit} (min {min(values):.{digits}f}, max {max(values):.{digits}f}, "
            f"{len(values)} runs)")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(parent, []).append(int(entry))
    return tree


def anonymous_bytes(root: int) -> int:
    """RssAnon summed over a process and its descendants (file-backed pages, such as a memmap's,
    are not counted: the kernel can drop them)."""
    tree, total, todo = _children(), 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        try:
            with open(f"/proc/{pid}/status") as handle:
                total += next(int(line.split()[1]) * 1024 for line in handle if line.startswith("RssAnon:"))
        except (OSError, StopIteration):
            continue
    return total


class PeakSampler:
    """Samples anonymous memory of a process tree in a thread; `.peak` in bytes."""

    def __init__(self, pid: int, every: float = 0.2):
        self.pid, self.every, self.peak, self.samples = pid, every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, anonymous_bytes(self.pid))
            self.samples += 1
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@contextmanager
def memory_cgroup(limit_bytes: int):
    """A cgroup v1 memory group limited to `limit_bytes`; yields a `preexec_fn` that moves a
    child process into it (so a regression kills the check, not the machine). None where
    cgroups cannot be made (the check then runs unconfined, and says so)."""
    base = Path("/sys/fs/cgroup/memory")
    group = base / f"agelens-bench-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
    except OSError:
        yield None
        return

    def enter() -> None:
        (group / "tasks").write_text(str(os.getpid()))

    try:
        yield enter
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.2)


def run_measured(command: list[str], env: dict, limit_bytes: int | None = None, log: Path | None = None
                 ) -> tuple[subprocess.CompletedProcess, int, float]:
    """(finished process, peak anonymous bytes of its tree, wall seconds), optionally confined."""
    out = open(log, "w") if log else subprocess.PIPE
    began = time.perf_counter()
    with memory_cgroup(limit_bytes) if limit_bytes else _nothing() as enter:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT if log else subprocess.PIPE,
                                   text=True, preexec_fn=enter)
        with PeakSampler(process.pid) as sampler:
            stdout, stderr = process.communicate()
    seconds = time.perf_counter() - began
    if log:
        out.close()
        stdout = Path(log).read_text()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), sampler.peak, seconds


@contextmanager
def _nothing():
    yield None
