"""lrn_max_pool2d: local response norm then max-pool in one pass each way (AlexNet's lrn1 -> pool1, lrn2 -> pool2).

Custom ops (run under torch.compile(fullgraph=True) and torch.export, backward included):
  fastalex::lrn_max_pool2d(x, size, alpha, beta, k, groups, kernel_size, stride, relu) -> (y, argmax):
      y = max_pool2d(local_response_norm(relu?(x), ...), kernel_size, stride); argmax the compact
      window offset kh * KW + kw (int8) that the backward reads.
  fastalex::lrn_max_pool2d_backward(grad_output, x, argmax, size, alpha, beta, k, groups, kernel_size,
                                    stride, relu) -> grad_input (a gather: no atomics).
The torch backend runs torch's ops (relu, the grouped LRN as fastalex.functional.local_response_norm
does it, then max_pool2d).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as TF
from torch._prims_common import suggest_memory_format

from fastalex._backend import use_triton
from fastalex.ops._checks import (
    argmax_dtype,
    check_float_tensor,
    check_groups,
    check_positive_int,
    check_real,
    output_size,
    pair,
)

__all__ = ["lrn_max_pool2d"]


# ---------------------------------------------------------------------------------------------
# Custom ops


@torch.library.custom_op("fastalex::lrn_max_pool2d", mutates_args=())
def _lrn_max_pool2d_op(x: torch.Tensor, size: int, alpha: float, beta: float, k: float, groups: int,
                       kernel_size: Sequence[int], stride: Sequence[int],
                       relu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    from fastalex.kernels import lrn_maxpool2d as K  # lazy: importing fastalex must not import triton

    return K.lrn_maxpool2d_forward(x, size, alpha, beta, k, groups, kernel_size, stride, relu)


@_lrn_max_pool2d_op.register_fake
def _(x, size, alpha, beta, k, groups, kernel_size, stride, relu=False):
    shape = (*x.shape[:2], *output_size(x.shape[2], x.shape[3], kernel_size, stride))
    fmt = suggest_memory_format(x)  # torch's max_pool2d output format (the LRN keeps x's)
    return (torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt),
            torch.empty(shape, dtype=argmax_dtype(kernel_size), device=x.device, memory_format=fmt))


@torch.library.custom_op("fastalex::lrn_max_pool2d_backward", mutates_args=())
def _lrn_max_pool2d_backward_op(grad_output: torch.Tensor, x: torch.Tensor, argmax: torch.Tensor, size: int,
                                alpha: float, beta: float, k: float, groups: int, kernel_size: Sequence[int],
                                stride: Sequence[int], relu: bool = False) -> torch.Tensor:
    from fastalex.kernels import lrn_maxpool2d as K

    return K.lrn_maxpool2d_backward(grad_output, x, argmax, size, alpha, beta, k, groups, kernel_size, stride,
                                    relu)


@_lrn_max_pool2d_backward_op.register_fake
def _(grad_output, x, argmax, size, alpha, beta, k, groups, kernel_size, stride, relu=False):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, size, alpha, beta, k, groups, kernel_size, stride, relu = inputs
    _y, argmax = output
    # x and the 1-byte argmax only: the backward recomputes the LRN denominators (and the ReLU) from x.
    ctx.save_for_backward(x, argmax)
    ctx.mark_non_differentiable(argmax)
    ctx.args = (size, alpha, beta, k, groups, list(kernel_size), list(stride), relu)


def _backward(ctx, grad_y, _grad_argmax):
    x, argmax = ctx.saved_tensors
    dx = torch.ops.fastalex.lrn_max_pool2d_backward(grad_y, x, argmax, *ctx.args)
    return dx, None, None, None, None, None, None, None, None


_lrn_max_pool2d_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function


def _check_args(input, size, alpha, beta, k, kernel_size, stride, groups, relu):
    """Validate; return (size, alpha, beta, k, groups, (KH, KW), (SH, SW))."""
    op = "lrn_max_pool2d"
    check_float_tensor(input, f"{op}: input", dims=(4,))
    size = check_positive_int(size, f"{op}: size")
    alpha, beta, k = check_real(alpha, f"{op}: alpha"), check_real(beta, f"{op}: beta"), check_real(k, f"{op}: k")
    N, C, H, W = input.shape
    groups = check_groups(groups, op, channels=C)
    if C == 0:
        raise ValueError(f"{op}: input must have channels, got shape {tuple(input.shape)}")
    ks = pair(kernel_size, f"{op}: kernel_size", minimum=1)
    st = ks if stride is None else pair(stride, f"{op}: stride", minimum=1)
    if H < ks[0] or W < ks[1]:
        raise ValueError(f"{op}: kernel_size {ks} is larger than the input plane ({H}, {W})")
    if not isinstance(relu, bool):
        raise TypeError(f"{op}: relu must be a bool, got {type(relu).__name__}")
    return size, alpha, beta, k, groups, ks, st


def _torch_lrn_max_pool2d(input, size, alpha, beta, k, groups, kernel_size, stride, relu=False):
    """torch's ops: relu (if asked), local_response_norm (each group of channels a sample of its own),
    then max_pool2d."""
    if relu:
        input = TF.relu(input)
    if groups == 1:
        z = TF.local_response_norm(input, size, alpha, beta, k)
    else:
        n, c = input.shape[:2]
        z = TF.local_response_norm(input.reshape(n * groups, c // groups, *input.shape[2:]), size, alpha, beta,
                                   k).reshape(input.shape)
    return TF.max_pool2d(z, kernel_size, stride)


def lrn_max_pool2d(input: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0,
                   kernel_size=3, stride=2, *, groups: int = 1, relu: bool = False) -> torch.Tensor:
    """max_pool2d(local_response_norm(input, size, alpha, beta, k), kernel_size, stride) in one pass.

    input (N, C, H, W) float16/bfloat16/float32/float64 -> (N, C, OH, OW), OH = (H - KH) // SH + 1,
    in input's memory format. The LRN is torch's local_response_norm; groups > 1 normalises each of
    `groups` equal channel blocks on its own (the paper's towers, as fastalex's local_response_norm).
    The pool has no padding, dilation or ceil mode; kernel_size and stride are ints or pairs (stride
    None means kernel_size, as torch). The backward is deterministic (a gather, no atomics).
    relu=True applies torch.relu to the input first, in the same pass: max_pool2d(lrn(relu(input))),
    whose backward is the gradient of relu's input (AlexNet's conv -> ReLU -> LRN -> pool: the conv then
    runs without its ReLU, and no ReLU mask pass is made over its output).

    AlexNet (paper constants): lrn_max_pool2d(x, 5, 5e-4, 0.75, 2.0, 3, 2, groups=2 for the towers).
    """
    size, alpha, beta, k, groups, ks, st = _check_args(input, size, alpha, beta, k, kernel_size, stride, groups, relu)
    if not use_triton(input.device):
        return _torch_lrn_max_pool2d(input, size, alpha, beta, k, groups, ks, st, relu)
    y, _argmax = torch.ops.fastalex.lrn_max_pool2d(input, size, alpha, beta, k, groups, list(ks), list(st), relu)
    return y
