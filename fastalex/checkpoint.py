"""Checkpoints written atomically, the previous one kept, read back with torch.load(weights_only=True).

A save goes to a temporary file in the same folder, is flushed and fsynced, then renamed over the
old file (and the folder fsynced): a crash at any moment leaves either the old or the new
checkpoint, never a torn one. With keep_previous the old one stays beside it as NAME.prev.pt, so a
latest checkpoint damaged later (a disk fault) still leaves the one before: load_newest reads the
newest that loads. link_atomic gives a second name to a saved checkpoint (best.pt) without a second
copy on disk.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings
from pathlib import Path

import torch

from fastalex import _faults

__all__ = ["CheckpointError", "save_atomic", "link_atomic", "load", "load_newest", "previous"]


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint; the message is one line naming the file."""


def previous(path: str | os.PathLike) -> Path:
    """Where save_atomic(keep_previous=True) keeps the checkpoint before `path`: NAME.prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_atomic(obj, path: str | os.PathLike, keep_previous: bool = False) -> Path:
    """torch.save(obj) to `path` atomically; with keep_previous the file it replaces becomes
    previous(path) (the newest file is always at `path`). One writer per path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        _faults.point("checkpoint-write")
        if keep_previous and path.exists():
            # A hard link to the old file renamed onto NAME.prev.pt, then the new file onto NAME: at every
            # moment NAME holds a whole checkpoint. (Where links are not supported, a rename: NAME is then
            # missing for a moment, and load_newest takes NAME.prev.pt.)
            link = f"{tmp}.prev"
            try:
                os.link(path, link)
                os.replace(link, previous(path))
            except OSError:
                Path(link).unlink(missing_ok=True)
                os.replace(path, previous(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed mid-write
        stale.unlink(missing_ok=True)
    return path


def link_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Make `dst` the checkpoint now at `src`, atomically: a hard link (no second copy; save_atomic
    replaces `src` by a rename, so `dst` keeps this content), or a copy where links are not supported."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            import shutil

            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for stale in dst.parent.glob(f".{dst.name}.*.tmp"):  # left by a process killed mid-link
        stale.unlink(missing_ok=True)
    return dst


def _why_unreadable(path: Path, err: Exception) -> str:
    if path.stat().st_size == 0:
        return "the file is empty"
    with open(path, "rb") as f:
        head = f.read(4)
    zipped, pickled = head == b"PK\x03\x04", head[:1] == b"\x80"  # torch.save's zip, or a bare pickle
    if not (zipped or pickled):
        return "it is not a PyTorch checkpoint file"
    if isinstance(err, pickle.UnpicklingError) and "Weights only" in str(err):
        return "it holds Python objects other than tensors and plain data, which fastalex does not load"
    return "it is truncated or corrupt"


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint written by save_atomic, loaded with weights_only=True (no code runs on load).
    FileNotFoundError if there is none; CheckpointError (one line, naming the file) if it does not load."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (torch warns about foreign pickle protocols before failing)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many types for files that are not checkpoints)
        raise CheckpointError(f"{path} is not a readable fastalex checkpoint: {_why_unreadable(path, e)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a fastalex checkpoint: it holds a {type(state).__name__}, not a dict")
    return state


def load_newest(path: str | os.PathLike, map_location="cpu", check=None) -> tuple[dict, Path, list[str]]:
    """(state, the file it came from, one line per newer file that could not be read) from `path`,
    else from previous(path). check(state) may raise CheckpointError for a file that loads but is not
    what the caller needs. FileNotFoundError if neither exists; CheckpointError if none is readable."""
    problems = []
    candidates = [p for p in (Path(path), previous(path)) if p.is_file()]
    if not candidates:
        raise FileNotFoundError(f"no checkpoint at {path}")
    for p in candidates:
        try:
            state = load(p, map_location)
            if check is not None:
                check(state, p)
            return state, p, problems
        except CheckpointError as e:
            problems.append(str(e))
    raise CheckpointError("; ".join(problems) + ("" if len(problems) > 1 else f" (and there is no {previous(path)})"))
