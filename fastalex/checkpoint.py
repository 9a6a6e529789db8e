"""Checkpoints written atomically and read back with torch.load(weights_only=True).

A save goes to a temporary file in the same folder, is flushed and fsynced, then renamed over the
old file (and the folder fsynced): a crash at any moment leaves either the old or the new
checkpoint, never a torn one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def save_atomic(obj, path: str | os.PathLike) -> Path:
    """torch.save(obj) to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint written by save_atomic, loaded with weights_only=True (no code runs on load)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt files
        raise ValueError(f"{path} is not a readable fastalex checkpoint: {e}") from e
