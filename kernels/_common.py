"""Helpers shared by the launchers: input checks, output allocation, precision choices.

Nothing here touches CUDA at import time.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastalex.ops._checks import FLOAT_DTYPES, check_same  # noqa: F401 (the one definition, re-exported)

# Offsets inside the kernels are int32: every tensor must have fewer elements than this.
MAX_NUMEL = 2**31 - 1

# Tests set this to True: outputs are then filled with NaN (or the dtype's most negative value for
# integer tensors) before launch, so an element a kernel forgot to write fails the comparison.
POISON = False


def is_interpreting() -> bool:
    """True when triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _poison(out: torch.Tensor) -> torch.Tensor:
    if POISON:
        out.fill_(float("nan") if out.is_floating_point() else torch.iinfo(out.dtype).min)
    return out


def empty(shape, *, dtype: torch.dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """torch.empty, poisoned when POISON is set."""
    return _poison(torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format))


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.empty_like (keeps t's memory format), poisoned when POISON is set."""
    return _poison(torch.empty_like(t, dtype=dtype))


def check_tensor(t, name: str, *, ndim: int | None = None, dtypes=FLOAT_DTYPES) -> None:
    """Raise a clear TypeError/ValueError if `t` is not a tensor the kernels take."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    if t.numel() > MAX_NUMEL:
        raise NotImplementedError(f"{name} has {t.numel()} elements; the kernels support at most 2**31 - 1")


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """Accumulator type of a kernel: fp64 for fp64 inputs, fp32 for everything else."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """`input_precision` for tl.dot: tf32 only for fp32 operands and only when allowed."""
    return "tf32" if (dtype == torch.float32 and allow_tf32 and not is_interpreting()) else "ieee"


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether a kernel must upcast bf16 dot operands to fp32: the interpreter's bf16 tl.dot is wrong."""
    return dtype == torch.bfloat16 and is_interpreting()


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))
