"""The helpers every layer shares (torch only, no triton): the float dtypes, argument checks with
clear TypeError/ValueError naming the argument (the ops raise them before any launch), pairs, and
output sizes. Imported by the ops and their fake implementations, the kernels' launchers
(fastalex.kernels._common), the model and perf/shapes.py, so each rule is written once."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(t, name: str, dims: tuple[int, ...] | None = None) -> None:
    """`t` must be a floating-point tensor (fp16, bf16, fp32 or fp64) with a dimension count in `dims`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {t.dtype}")
    if dims is not None and t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got {t.dim()}-D with shape {tuple(t.shape)}")


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """`b` must share `a`'s dtype and device."""
    if a.dtype != b.dtype:
        raise TypeError(f"{name_b} must have the dtype of {name_a} ({a.dtype}), got {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_b} must be on the device of {name_a} ({a.device}), got {b.device}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def pair(value, name: str, minimum: int) -> tuple[int, int]:
    """An int or a sequence of two ints, each >= minimum, as a tuple of two ints."""
    if _is_int(value):
        values = (value, value)
    elif isinstance(value, (tuple, list, torch.Size)) and len(value) in (1, 2) and all(_is_int(v) for v in value):
        values = (int(value[0]), int(value[-1]))  # one value stands for both, as in torch
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(values) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return values


def argmax_dtype(kernel_size) -> torch.dtype:
    """max_pool2d's compact argmax: the smallest integer dtype holding every window offset 0 .. KH * KW - 1."""
    k = kernel_size[0] * kernel_size[1]
    return torch.int8 if k <= 127 else torch.int16 if k <= 32767 else torch.int32


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
