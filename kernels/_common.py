"""Helpers shared by the launchers: their asserts, the int32 limit, output allocation, precision choices.

The ops check arguments and raise clear errors; the launchers (internal) assert what they rely on,
and raise only for a limit of the kernels themselves (int32 offsets). Nothing here touches CUDA at
import time.
"""

from __future__ import annotations

import math
import os

import torch
import triton.language as tl

from fastalex.kernels._geometry import FLOAT_DTYPES

# Offsets inside the kernels are int32: no element of a tensor may lie further than this from its first.
MAX_OFFSET = 2**31 - 1
# CUDA's limit on a grid's second and third axes (the 3-D grids take samples on the third).
MAX_GRID_YZ = 65535

# Tests set this to True: outputs are then filled with NaN (or the dtype's most negative value for
# integer tensors) before launch, so an element a kernel forgot to write fails the comparison.
POISON = False


# Triton decides when each @triton.jit runs (at import) whether the kernel runs in its interpreter; the
# launchers read the same setting once, then (an environment lookup a call cost ~1.5 us, several a launch).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_interpreting() -> bool:
    """True when triton kernels run in the CPU interpreter (TRITON_INTERPRET=1 when fastalex.kernels was
    imported, as Triton reads it when the kernels are defined)."""
    return _INTERPRETING


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


def takes(t, ndim: int | None = None, dtypes=FLOAT_DTYPES) -> bool:
    """Whether `t` is a tensor of `ndim` dims and a dtype in `dtypes` (for the launchers' asserts)."""
    return isinstance(t, torch.Tensor) and t.dtype in dtypes and (ndim is None or t.dim() == ndim)


def same(a: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether `others` share `a`'s dtype and device (for the launchers' asserts)."""
    return all(b.dtype == a.dtype and b.device == a.device for b in others)


def max_offset(t: torch.Tensor) -> int:
    """The offset of t's furthest element from its first, through its strides."""
    return sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)


def check_int32(name: str, t) -> None:
    """Raise NotImplementedError where the kernels' int32 offsets cannot reach every element of `t`:
    a tensor (read through its strides) or the shape of a dense output about to be allocated. A limit
    of the Triton kernels (torch's ops have none), not a wrong argument: so the launchers raise it,
    and it reaches the op's caller as it is."""
    last = max_offset(t) if isinstance(t, torch.Tensor) else math.prod(t) - 1
    if last > MAX_OFFSET:
        raise NotImplementedError(f"{name} spans {last + 1} elements of memory; the Triton kernels use int32 "
                                  f"offsets (at most 2**31 - 1): use fastalex.backend('torch') for it")


def is_16bit(dtype: torch.dtype) -> bool:
    """Whether dtype is a 16-bit float (fp16, bf16): twice tf32's tensor-core rate, half its bytes."""
    return dtype in (torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """Accumulator type of a kernel: fp64 for fp64 inputs, fp32 for everything else."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """`input_precision` for tl.dot: tf32 only for fp32 operands and only when allowed."""
    return "tf32" if (dtype == torch.float32 and allow_tf32 and not is_interpreting()) else "ieee"


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether a kernel must upcast bf16 dot operands to fp32: the interpreter's bf16 tl.dot is wrong."""
    return dtype == torch.bfloat16 and is_interpreting()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' host arithmetic (triton.cdiv is a constexpr function: ~1.8 us a
    call on the host, against ~0.05 for this, and a launch makes 5-20 such calls)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
