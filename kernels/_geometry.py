"""The shape and dtype rules every layer shares: the float dtypes the kernels take, pairs, output
sizes, max-pool's argmax dtype.

Imported by the ops and their fake implementations (through fastalex.ops._checks, which re-exports
these names), the launchers, the model, FLOP counting and perf/shapes.py, so each rule is written
once. torch only: no triton (importing fastalex must not import it) and nothing from fastalex's
PyTorch layer (kernels/ sits below it).
"""

from __future__ import annotations

import operator

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _index(value) -> int | None:
    """value as an int if it is an integer (int, numpy or 0-d integer tensor; not bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def pair(value, name: str, minimum: int) -> tuple[int, int]:
    """An int or a sequence of one or two ints, each >= minimum, as a tuple of two ints.

    Raises TypeError (not an int or a pair of ints) or ValueError (below minimum) naming `name`."""
    if isinstance(value, (tuple, list)):  # (torch.Size is a tuple)
        values = [_index(v) for v in value] if len(value) in (1, 2) else [None]
    else:
        values = [_index(value)]
    if None in values:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(values) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return values[0], values[-1]  # one value stands for both, as in torch


def output_length(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1,
                  ceil_mode: bool = False) -> int:
    """Output length along one dimension of a convolution or pooling, exactly as torch computes it
    (pooling_output_shape): floor((size + 2p - d(k-1) - 1) / s) + 1, or ceil in ceil_mode, where the
    last window must then start inside the input or its left padding, else it is dropped. May be
    <= 0 when the (padded) input is smaller than the dilated kernel: the callers say so."""
    n = (size + 2 * padding - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (n - 1) * stride >= size + padding:
        n -= 1
    return n


def output_size(H: int, W: int, kernel_size, stride, padding=(0, 0), dilation=(1, 1),
                ceil_mode: bool = False) -> tuple[int, int]:
    """(OH, OW) of a 2-D convolution or pooling (arguments are (h, w) pairs), as torch computes them."""
    return (output_length(H, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode),
            output_length(W, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode))


def argmax_dtype(kernel_size) -> torch.dtype:
    """max_pool2d's compact argmax: the smallest integer dtype holding every window offset 0 .. KH * KW - 1."""
    k = kernel_size[0] * kernel_size[1]
    return torch.int8 if k <= 127 else torch.int16 if k <= 32767 else torch.int32


def pools_in_cells(kernel_size, stride, padding=(0, 0), dilation=(1, 1)) -> bool:
    """Whether a max-pool's backward can take 2 x 2 cells of input positions (kernels.maxpool2d and
    kernels.lrn_maxpool2d): stride 2 both ways, no padding or dilation, windows of at most 4, so the
    positions of a cell share their candidate windows (at most 2 along each axis) and each one's offset
    in each window is fixed. AlexNet's 3x3/2 pools qualify."""
    return (tuple(stride) == (2, 2) and max(kernel_size) <= 4 and tuple(padding) == (0, 0)
            and tuple(dilation) == (1, 1))
