"""Running a model on the device at hand: device choice, precision and layout, ImageNet
normalisation, batched prediction and penultimate features, and loading a trained model."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load_file

from agelens.tasks.data.arrays import batch_rows, batches
from agelens.tasks.core.errors import DataError
from agelens.tasks.model.backbones import build_model, last_linear_name
from agelens.tasks.core.stage import Job

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_device(name: str) -> torch.device:
    """'auto' = CUDA, then MPS, then CPU."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {name} was asked for but CUDA is not available here")
    if device.type == "mps" and not mps:
        raise DataError("--device mps was asked for but MPS is not available here")
    return device


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast where it is faster: CUDA with bf16; CPUs with native bf16 (avx512_bf16/AMX)
    whose bf16 matrix multiply is measured faster than their fp32 one."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # Native is not enough: on a Xeon VM with AVX512_BF16 but AMX hidden, bf16 multiplied at
        # half of fp32's rate and the training step was 15% slower, while an AMD EPYC's doubled.
        return native_bf16_cpu() and bf16_matmul_speedup(torch.get_num_threads()) >= BF16_PAYS
    return False


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512_BF16). mkldnn "supports" bf16 on any
    AVX-512 CPU, but without either it emulates it, at 2-3x the time of fp32."""
    return amx_cpu() or bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def amx_cpu() -> bool:
    """Whether this CPU has AMX tiles, and its OS lets programs use them."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


BF16_PAYS = 1.3  # bf16 against fp32 matrix multiply: 2.1 on an AMD EPYC (Zen 4), 0.45 on the Xeon VM


@functools.lru_cache(maxsize=None)
def bf16_matmul_speedup(threads: int, n: int = 1024, repeats: int = 3) -> float:
    """fp32 time over bf16 time of an n x n matrix multiply on this CPU's `threads` (the best of
    `repeats`, alternating; about a tenth of a second, once per process)."""
    best = {}
    tensors = {dtype: (torch.ones(n, n, dtype=dtype), torch.ones(n, n, dtype=dtype))
               for dtype in (torch.float32, torch.bfloat16)}
    for attempt in range(repeats + 1):
        for dtype, (a, b) in tensors.items():
            began = time.perf_counter()
            torch.mm(a, b)
            took = time.perf_counter() - began
            if attempt:  # the first of each is a warm-up
                best[dtype] = min(best.get(dtype, took), took)
    return best[torch.float32] / best[torch.bfloat16]


def use_channels_last(setting: str, device: torch.device) -> bool:
    if setting != "auto":
        return setting == "on"
    return device.type in ("cuda", "cpu")  # measured faster for these convnets on both


@dataclass(frozen=True)
class Runtime:
    """How tensors are laid out and computed on the device at hand."""
    device: torch.device
    bf16: bool
    channels_last: bool

    @classmethod
    def resolve(cls, device: str, precision: str, channels_last: str) -> "Runtime":
        dev = resolve_device(device)
        return cls(dev, use_bf16(precision, dev), use_channels_last(channels_last, dev))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def exact(self) -> "Runtime":
        """The same device in fp32: for gradients that explanations are made of."""
        return Runtime(self.device, False, self.channels_last)


def to_float(batch: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]. Permuting NHWC gives channels-last
    strides for free; `contiguous()` makes NCHW."""
    x = batch.to(runtime.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    return x if runtime.channels_last else x.contiguous()


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return torch.addcmul(-mean / std, x, 1 / std)  # (x - mean) / std in one pass


def model_input(batch: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    return normalise(to_float(batch, runtime))


def prepare(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    model = model.to(runtime.device)
    return model.to(memory_format=torch.channels_last) if runtime.channels_last else model


def runtime_for(job: Job) -> Runtime:
    """The device from the run's settings; precision and layout as the model was trained."""
    return Runtime.resolve(job.settings["device"], job.context["precision"], job.context["channels_last"])


def head_of(facts: dict):
    """The trained model's head (from the facts the train stage recorded)."""
    from agelens.tasks.model.heads import Head

    return Head(facts["head"], tuple(facts["classes"]))


def load_trained(job: Job, runtime: Runtime) -> torch.nn.Module:
    facts = job.context
    model = build_model(facts["backbone"], facts["outputs"], image_size=facts["image_size"])
    model.load_state_dict(load_file(job.path("train", "model")))
    return prepare(model, runtime).eval()


@torch.no_grad()
def predict_logits(model, array: np.ndarray, rows: np.ndarray, runtime: Runtime, batch_size: int,
                   tta: bool = False) -> np.ndarray:
    """Logits (len(rows), outputs) in float32, in the order of `rows`; with `tta`, the mean of the
    image's and its mirror image's."""
    model.eval()
    found = []
    for _, batch in batches(array, batch_rows(np.asarray(rows), batch_size), runtime.device):
        x = model_input(batch, runtime)
        with runtime.autocast():
            logits = model(x).float()
            if tta:
                logits = (logits + model(x.flip(3)).float()) / 2
        found.append(logits.cpu())
    return _in_order(torch.cat(found).numpy(), rows, batch_size)


def predict(model, array: np.ndarray, rows: np.ndarray, runtime: Runtime, batch_size: int, head,
            temperature: float = 1.0, tta: bool = False) -> np.ndarray:
    """The head's probabilities (len(rows), classes or years) at `temperature`."""
    logits = predict_logits(model, array, rows, runtime, batch_size, tta)
    return head.probabilities(torch.from_numpy(logits), temperature).numpy()


@torch.no_grad()
def penultimate_features(model, array: np.ndarray, rows: np.ndarray, runtime: Runtime, batch_size: int) -> np.ndarray:
    """The input of the classifier's last Linear (768-d for ConvNeXt-Tiny), in the order of `rows`."""
    head = model.get_submodule(last_linear_name(model))
    captured = []
    handle = head.register_forward_pre_hook(lambda m, inputs: captured.append(inputs[0].float().cpu()))
    try:
        model.eval()
        for _, batch in batches(array, batch_rows(np.asarray(rows), batch_size), runtime.device):
            with runtime.autocast():
                model(model_input(batch, runtime))
    finally:
        handle.remove()
    return _in_order(torch.cat(captured).flatten(1).numpy(), rows, batch_size)


def _in_order(values: np.ndarray, rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Each batch is read with its rows sorted; put the values back in the order of `rows`."""
    rows = np.asarray(rows)
    ordered = np.empty_like(values)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ordered[start + np.argsort(chunk, kind="stable")] = values[start:start + len(chunk)]
    return ordered
