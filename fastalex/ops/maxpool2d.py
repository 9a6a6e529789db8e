"""max_pool2d: torch's semantics, fastalex's Triton kernels, a deterministic backward.

Custom ops (run under torch.compile(fullgraph=True) and torch.export, backward included):
  fastalex::max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
      -> (y, argmax, indices): argmax is the compact window offset kh * KW + kw (int8 for windows
         of <= 127 elements) that the backward reads; indices is torch's int64 ih * W + iw when
         return_indices, else an empty int64 tensor.
  fastalex::max_pool2d_backward(grad_output, argmax, input_size, kernel_size, stride, padding,
                                dilation, channels_last) -> grad_input (a gather: no atomics).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch._prims_common import suggest_memory_format

from fastalex._backend import use_triton
from fastalex.ops._checks import argmax_dtype, check_float_tensor, output_size, pair

__all__ = ["max_pool2d"]

def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The format torch gives max_pool2d's outputs: channels_last for channels_last-like 4-D input."""
    return suggest_memory_format(x) if x.dim() == 4 else torch.contiguous_format


# ---------------------------------------------------------------------------------------------
# Custom ops


@torch.library.custom_op("fastalex::max_pool2d", mutates_args=())
def _max_pool2d_op(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int], ceil_mode: bool, return_indices: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastalex.kernels import maxpool2d as K

    return K.maxpool2d_forward(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


@_max_pool2d_op.register_fake
def _(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    shape = (*x.shape[:-2], *output_size(*x.shape[-2:], kernel_size, stride, padding, dilation, ceil_mode))
    fmt = _memory_format(x)
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    arg = torch.empty(shape, dtype=argmax_dtype(kernel_size), device=x.device, memory_format=fmt)
    if return_indices:
        idx = torch.empty(shape, dtype=torch.int64, device=x.device, memory_format=fmt)
    else:
        idx = torch.empty((0,), dtype=torch.int64, device=x.device)
    return y, arg, idx


@torch.library.custom_op("fastalex::max_pool2d_backward", mutates_args=())
def _max_pool2d_backward_op(grad_output: torch.Tensor, argmax: torch.Tensor, input_size: Sequence[int],
                            kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                            dilation: Sequence[int], channels_last: bool) -> torch.Tensor:
    from fastalex.kernels import maxpool2d as K

    return K.maxpool2d_backward(grad_output, argmax, input_size, kernel_size, stride, padding, dilation,
                                channels_last)


@_max_pool2d_backward_op.register_fake
def _(grad_output, argmax, input_size, kernel_size, stride, padding, dilation, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(tuple(input_size), dtype=grad_output.dtype, device=grad_output.device, memory_format=fmt)


def _setup_context(ctx, inputs, output):
    x, kernel_size, stride, padding, dilation, _ceil_mode, _return_indices = inputs
    _y, argmax, indices = output
    ctx.save_for_backward(argmax)
    ctx.mark_non_differentiable(argmax, indices)
    ctx.args = (list(x.shape), list(kernel_size), list(stride), list(padding), list(dilation),
                _memory_format(x) == torch.channels_last)


def _backward(ctx, grad_y, _grad_argmax, _grad_indices):
    (argmax,) = ctx.saved_tensors
    dx = torch.ops.fastalex.max_pool2d_backward(grad_y, argmax, *ctx.args)
    return dx, None, None, None, None, None, None


_max_pool2d_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_context_bwd(ctx, inputs, output):
    _grad_output, argmax, input_size, kernel_size, stride, padding, dilation, _cl = inputs
    ctx.save_for_backward(argmax)
    ctx.args = (list(input_size), list(kernel_size), list(stride), list(padding), list(dilation))


def _backward_bwd(ctx, grad_dx):
    """Double backward: grad_input is linear in grad_output, so its gradient gathers grad_dx at each argmax."""
    (argmax,) = ctx.saved_tensors
    (H, W), (KH, KW), (SH, SW), (PH, PW), (DH, DW) = ctx.args[0][-2:], *ctx.args[1:]
    OH, OW = argmax.shape[-2:]
    a = argmax.long()
    oh = torch.arange(OH, device=a.device).view(-1, 1)
    ow = torch.arange(OW, device=a.device)
    ih = oh * SH - PH + (a // KW) * DH
    iw = ow * SW - PW + (a % KW) * DW
    # Only an empty window (ceil mode) points outside the input; it receives nothing.
    inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    flat = (ih.clamp(0, H - 1) * W + iw.clamp(0, W - 1)).flatten(-2)
    g = grad_dx.flatten(-2).gather(-1, flat).view(argmax.shape)
    return torch.where(inside, g, torch.zeros_like(g)), None, None, None, None, None, None, None


_max_pool2d_backward_op.register_autograd(_backward_bwd, setup_context=_setup_context_bwd)


# ---------------------------------------------------------------------------------------------
# Public function


def _pair(name: str, value, minimum: int) -> tuple[int, int]:
    # A sequence of another length is a ValueError, as torch's max_pool2d has it (a RuntimeError there).
    if isinstance(value, (tuple, list)) and len(value) not in (1, 2):
        raise ValueError(f"max_pool2d: {name} must be a single int or a pair of ints, got {tuple(value)!r}")
    return pair(value, f"max_pool2d: {name}", minimum)


def _check_args(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    """Validate like torch; return ((kh, kw), (sh, sw), (ph, pw), (dh, dw))."""
    check_float_tensor(input, "max_pool2d: input", dims=(3, 4))
    if 0 in input.shape[-3:]:
        raise ValueError(f"max_pool2d: input must have non-zero channels, height and width (only the batch "
                         f"may be empty), got shape {tuple(input.shape)}")
    for name, v in (("ceil_mode", ceil_mode), ("return_indices", return_indices)):
        if not isinstance(v, bool):
            raise TypeError(f"max_pool2d: {name} must be a bool, got {type(v).__name__} {v!r}")
    k = _pair("kernel_size", kernel_size, 1)
    empty = isinstance(stride, (tuple, list)) and len(stride) == 0
    s = k if stride is None or empty else _pair("stride", stride, 1)  # torch: no stride means kernel_size
    p = _pair("padding", padding, 0)
    d = _pair("dilation", dilation, 1)
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(f"max_pool2d: padding should be at most half of kernel_size (padding <= kernel_size // 2 "
                         f"in each dimension), got padding={p}, kernel_size={k}")
    H, W = input.shape[-2:]
    out = output_size(H, W, k, s, p, d, ceil_mode)
    if min(out) < 1:
        raise ValueError(f"max_pool2d: output size {out} is too small: input of size ({H}, {W}) with kernel_size={k}, "
                         f"stride={s}, padding={p}, dilation={d}, ceil_mode={ceil_mode}")
    return k, s, p, d


def max_pool2d(input: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False):
    """torch.nn.functional.max_pool2d: input (N, C, H, W) or (C, H, W) -> (N, C, OH, OW) or (C, OH, OW).

    With return_indices, also torch's int64 indices (ih * W + iw within each plane). The output
    keeps the input's memory format. The backward is deterministic (a gather, no atomics).
    """
    k, s, p, d = _check_args(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    if not use_triton(input.device):
        return torch.nn.functional.max_pool2d(input, k, s, p, d, ceil_mode=ceil_mode, return_indices=return_indices)
    y, _argmax, indices = torch.ops.fastalex.max_pool2d(input, list(k), list(s), list(p), list(d), ceil_mode,
                                                        return_indices)
    return (y, indices) if return_indices else y
