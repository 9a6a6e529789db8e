"""Which implementation runs an op: fastalex's Triton kernels or torch's own ops.

`auto` (default) runs the Triton kernels on CUDA tensors, and on CPU tensors when the Triton
interpreter is on (`TRITON_INTERPRET=1`, set before triton is first imported); otherwise torch's
ops. `triton` always runs the kernels (an error where they cannot run). `torch` always runs
torch's ops (cuDNN on GPU): the baseline for benchmarks.

The choice is read from `fastalex.backend(name)` (innermost wins) or else `$FASTALEX_BACKEND`.
Under `torch.compile` the choice is read while tracing and fixed in the compiled graph:
recompile (torch._dynamo.reset()) after changing it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "FASTALEX_BACKEND"

_stack: list[str] = []


def _check_name(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def requested_backend() -> str:
    """The backend asked for: the innermost `fastalex.backend(...)`, else $FASTALEX_BACKEND, else auto."""
    if _stack:
        return _stack[-1]
    return _check_name(os.environ.get(ENV_VAR, "auto") or "auto", f"${ENV_VAR}")


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run fastalex ops with backend `name` ("auto", "triton" or "torch") inside the block.

    >>> with fastalex.backend("torch"):
    ...     y = fastalex.functional.max_pool2d(x, 3, 2)   # torch's own max_pool2d
    """
    _stack.append(_check_name(name, "backend name"))
    try:
        yield
    finally:
        _stack.pop()


@dataclass(frozen=True)
class BackendInfo:
    """What runs for tensors on `device`: `backend` is "triton" or "torch"; `reason` says why."""

    requested: str
    device: str
    backend: str
    reason: str

    def __str__(self) -> str:
        return f"{self.backend} on {self.device} (requested {self.requested!r}): {self.reason}"


def _resolve(device_type: str) -> tuple[str, str]:
    requested = requested_backend()
    if requested == "torch":
        return "torch", "torch's own ops were requested"
    if device_type == "cuda":
        return "triton", "Triton kernels compiled for the GPU"
    if device_type == "cpu":
        if interpreter_enabled():
            return "triton", "Triton kernels in the CPU interpreter (TRITON_INTERPRET=1)"
        if requested == "triton":
            return "error", (
                "the Triton backend was requested for CPU tensors, but Triton kernels run on CPU "
                "only in Triton's interpreter: set TRITON_INTERPRET=1 in the environment before "
                "triton is imported, or use fastalex.backend('torch') / FASTALEX_BACKEND=torch"
            )
        return "torch", "CPU tensors without TRITON_INTERPRET=1 run torch's ops"
    if requested == "triton":
        return "error", f"fastalex's Triton kernels support CUDA and CPU tensors, not {device_type!r}"
    return "torch", f"no Triton kernels for device type {device_type!r}"


def backend_info(device: torch.device | str | None = None) -> BackendInfo:
    """Which backend runs for tensors on `device` (default: cuda if available, else cpu), and why."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    name, reason = _resolve(device.type)
    return BackendInfo(requested_backend(), str(device), name, reason)


def use_triton(device: torch.device) -> bool:
    """True if the op should run fastalex's kernels for tensors on `device`; raises if it cannot."""
    name, reason = _resolve(device.type)
    if name == "error":
        if device.type == "cpu":
            raise RuntimeError(reason)
        raise NotImplementedError(reason)
    return name == "triton"
