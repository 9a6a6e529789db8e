"""What the subprocess tests (test_distributed, test_faults) share: a child's environment and a free port."""

import os
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child_env(**extra) -> dict:
    """The environment of a `fastalex` / torchrun child: one thread, the checkout importable, a short
    distributed timeout; torch's ops (no TRITON_INTERPRET), no fault unless asked, and nothing exported
    for torchrun's restarts (fastalex keeps each worker group's keys apart by itself)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), FASTALEX_DIST_TIMEOUT="60")
    for var in ("TRITON_INTERPRET", "FASTALEX_FAULT", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"):
        env.pop(var, None)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
