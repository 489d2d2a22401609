"""Convolutions on maps of a few positions (a ResNet's last stages at 64-80 px), trained faster on a CPU.

On such maps oneDNN's channels-last kernels cost up to twice its NCHW ones, its weight gradient
runs at a third (bf16) to a half (fp32) of the CPU's matrix-multiply speed, and its input gradient
of a strided convolution at a half (bench/train_throughput.py). So convolutions on maps of at most
3x3 run in NCHW, their weight gradient is one matrix multiply over the unfolded input patches, and
a strided one's input gradient one matrix multiply folded back. On 4x4 maps NCHW alone pays in
fp32 (2% of a ResNet-10 step at 64 px); the matrix multiplies do not. Where bf16 runs on AMX the
gap is wider (oneDNN's bf16 weight gradient at a fifth of the multiply's speed, its forward and
input gradient on 2x2-3x3 maps at a third to a half): every convolution on maps of at most 5x5
takes its weight gradient by matrix multiply, and on at most 3x3 its forward and input gradient
too (AmxConv2d). The modules keep nn.Conv2d's parameters and state-dict keys: a model trained
with them loads into the plain one."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SMALL_MAP_POSITIONS = 9  # output maps up to 3x3, where both effects were measured
NCHW_MAP_POSITIONS = 16  # output maps up to 4x4: NCHW in fp32
AMX_MAP_POSITIONS = 25  # output maps up to 5x5: the weight gradient by matrix multiply in bf16 on AMX


def _patches(x: torch.Tensor, kernel: tuple[int, int], stride, padding, out_hw) -> torch.Tensor:
    """The input's patches as rows (N*L, kh*kw*C), channels innermost: each row is copied in runs of
    C contiguous numbers, where F.unfold's (N, C*kh*kw, L) is written a few numbers at a time (on
    512 channels at 3x3, 15 against 29 ms a ResNet-10 step on the Xeon of the README)."""
    n, c = x.shape[:2]
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, padding[1], padding[1], padding[0], padding[0]))
    sn, sh, sw, sc = padded.stride()
    rows = padded.as_strided((n, *out_hw, *kernel, c), (sn, stride[0] * sh, stride[1] * sw, sh, sw, sc))
    return rows.reshape(n * out_hw[0] * out_hw[1], -1)


def _folded(columns: torch.Tensor, x_shape, kernel, stride, padding, out_hw) -> torch.Tensor:
    """The inverse of _patches' gather, summed: columns (N*L, kh*kw*C) added back onto the input's
    positions, returned as an NCHW-shaped view of a channels-last tensor (F.fold's layout costs 1.4x)."""
    n, c, h, w = x_shape
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = kernel, stride, padding, out_hw
    columns = columns.view(n, oh, ow, kh, kw, c)
    out = columns.new_zeros(n, h + 2 * ph + sh, w + 2 * pw + sw, c)  # room for the last stride's reach
    for i in range(kh):
        for j in range(kw):
            out[:, i:i + sh * oh:sh, j:j + sw * ow:sw, :] += columns[:, :, :, i, j, :]
    return out[:, ph:ph + h, pw:pw + w, :].permute(0, 3, 1, 2)


class _MatmulConv(torch.autograd.Function):
    """conv2d whose weight gradient is one matrix multiply over the input's patches; with
    `matmul_forward` its output is one too, and with `matmul_input_grad` its input gradient is one
    folded back (else oneDNN's, which is as fast for stride 1 in fp32)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, matmul_forward=False, matmul_input_grad=False):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = tuple(stride), tuple(padding), bias is not None
        ctx.matmul_input_grad = matmul_input_grad
        if not matmul_forward:
            return F.conv2d(x, weight, bias, stride, padding)
        n, out_channels, kernel = x.shape[0], weight.shape[0], tuple(weight.shape[-2:])
        out_hw = tuple((size + 2 * p - k) // s + 1 for size, p, k, s in zip(x.shape[-2:], padding, kernel, stride))
        patches = _patches(x, kernel, stride, padding, out_hw)
        weight_by_position = weight.permute(0, 2, 3, 1).reshape(out_channels, -1)
        out = patches @ weight_by_position.t() if bias is None else torch.addmm(bias, patches, weight_by_position.t())
        return out.view(n, *out_hw, out_channels).permute(0, 3, 1, 2)  # channels-last strides

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        out_channels, kernel, out_hw = weight.shape[0], tuple(weight.shape[-2:]), tuple(grad.shape[-2:])
        grad_by_position = grad.permute(0, 2, 3, 1).reshape(-1, out_channels)  # (N*L, out); free if channels-last
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            if ctx.matmul_input_grad:
                weight_by_position = weight.permute(0, 2, 3, 1).reshape(out_channels, -1)  # (out, kh*kw*C)
                grad_x = _folded(grad_by_position @ weight_by_position, x.shape, kernel, ctx.stride, ctx.padding,
                                 out_hw)
            else:
                grad_x = torch.ops.aten.convolution_backward(
                    grad.contiguous(memory_format=_layout(x)), x, weight, None, list(ctx.stride), list(ctx.padding),
                    [1, 1], False, [0, 0], 1, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            patches = _patches(x, kernel, ctx.stride, ctx.padding, out_hw)
            grad_w = (grad_by_position.t() @ patches).view(out_channels, *kernel, -1).permute(0, 3, 1, 2)
            grad_w = grad_w.contiguous(memory_format=_layout(weight))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None


def _layout(t: torch.Tensor) -> torch.memory_format:
    channels_last = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _cpu_bf16_autocast(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


class SmallMapConv2d(nn.Conv2d):
    """nn.Conv2d for maps of at most SMALL_MAP_POSITIONS output positions (see the module's docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, strided = x.contiguous(), self.stride != (1, 1)
        if _cpu_bf16_autocast(x):
            weight = self.weight.to(torch.bfloat16, memory_format=torch.contiguous_format)
            bias = None if self.bias is None else self.bias.to(torch.bfloat16)
            with torch.autocast("cpu", enabled=False):
                return _MatmulConv.apply(x.to(torch.bfloat16), weight, bias, self.stride, self.padding, False, strided)
        return _MatmulConv.apply(x, self.weight.contiguous(), self.bias, self.stride, self.padding, False, strided)


class AmxConv2d(nn.Conv2d):
    """nn.Conv2d where bf16 runs on AMX: in bf16 on an output map of at most AMX_MAP_POSITIONS, the
    weight gradient by matrix multiply, and on at most SMALL_MAP_POSITIONS the forward and input
    gradient too (decided by the map at hand, so smaller images in progressive resizing fit)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = math.prod((size + 2 * p - k) // s + 1 for size, p, k, s in
                              zip(x.shape[-2:], self.padding, self.kernel_size, self.stride))
        if not _cpu_bf16_autocast(x) or positions > AMX_MAP_POSITIONS:
            return super().forward(x)
        small = positions <= SMALL_MAP_POSITIONS
        weight = self.weight.to(torch.bfloat16)
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        with torch.autocast("cpu", enabled=False):
            return _MatmulConv.apply(x.to(torch.bfloat16), weight, bias, self.stride, self.padding, small, small)


class NCHWConv2d(nn.Conv2d):
    """nn.Conv2d in NCHW in fp32, for maps of at most NCHW_MAP_POSITIONS (bf16 was not measured faster)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        return F.conv2d(x.contiguous(), self.weight.contiguous(), self.bias, self.stride, self.padding)


def _eligible(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def small_map_convs(model: nn.Module, image_size: int, positions: int = SMALL_MAP_POSITIONS) -> list[str]:
    """Names of the plain convolutions whose output map has at most `positions` positions for a
    square input of `image_size`."""
    found, hooks, was_training = [], [], model.training
    for name, module in model.named_modules():
        if _eligible(module):
            hooks.append(module.register_forward_hook(
                lambda m, _, out, name=name: found.append(name) if out.shape[-2] * out.shape[-1] <= positions else None))
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return found


def for_small_maps(model: nn.Module, image_size: int, amx_bf16: bool = False) -> nn.Module:
    """`model`, its convolutions on small maps made SmallMapConv2d or NCHWConv2d in place, or with
    `amx_bf16` (bf16 training on a CPU with AMX) those on maps of at most AMX_MAP_POSITIONS made
    AmxConv2d (CPU training only: other devices have no such gap)."""
    if next(model.parameters()).device.type != "cpu":
        return model
    if amx_bf16:
        for name in small_map_convs(model, image_size, AMX_MAP_POSITIONS):
            model.get_submodule(name).__class__ = AmxConv2d
        return model
    smallest = set(small_map_convs(model, image_size))
    for name in small_map_convs(model, image_size, NCHW_MAP_POSITIONS):
        conv = model.get_submodule(name)
        conv.__class__ = SmallMapConv2d if name in smallest else NCHWConv2d  # only forward differs
        conv.weight.data = conv.weight.data.contiguous()
    return model
