"""The ops' argument checks: clear TypeError/ValueError naming the argument and what was expected,
raised before any launch (the launchers only assert). `name` may carry the op's name as a prefix
("max_pool2d: stride").

The shape and dtype rules (FLOAT_DTYPES, pair, output_length, output_size, argmax_dtype) live in
fastalex.kernels._geometry, where the launchers import them too; they are re-exported here for the
ops, the model, FLOP counting and perf/shapes.py.
"""

from __future__ import annotations

import numbers

import torch

from fastalex.kernels._geometry import FLOAT_DTYPES, argmax_dtype, output_length, output_size, pair

__all__ = ["FLOAT_DTYPES", "argmax_dtype", "check_float_tensor", "check_groups", "check_positive_int", "check_real",
           "check_same", "output_length", "output_size", "pair"]


def check_float_tensor(t, name: str, dims: tuple[int, ...] | None = None, min_dim: int | None = None) -> None:
    """`t` must be a floating-point tensor (fp16, bf16, fp32 or fp64) with a dimension count in
    `dims` (or at least `min_dim`)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {t.dtype}")
    if dims is not None and t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got {t.dim()}-D with shape {tuple(t.shape)}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions, got shape {tuple(t.shape)}")


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """`b` must share `a`'s dtype and device."""
    if a.dtype != b.dtype:
        raise TypeError(f"{name_b} must have the dtype of {name_a} ({a.dtype}), got {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_b} must be on the device of {name_a} ({a.device}), got {b.device}")


def check_real(value, name: str) -> float:
    """A real number (not a bool), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def check_positive_int(value, name: str) -> int:
    """An int >= 1 (not a bool): TypeError for other types, ValueError below 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def check_groups(groups, op: str = "", channels: int | None = None) -> int:
    """A positive int (ValueError for any other value, as torch's conv has it) dividing the input's
    `channels` if given. `op` prefixes the messages."""
    prefix = f"{op}: " if op else ""
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"{prefix}groups must be a positive int, got {groups!r}")
    if channels is not None and channels % groups:
        raise ValueError(f"{prefix}input's {channels} channels are not divisible by groups={groups}")
    return int(groups)
