"""A prepared store: the paper's per-image preprocessing done once, read back at memory speed.

    fastalex prepare /data/imagenet /data/imagenet-256          # once: decode, short side 256, centre 256
    fastalex train --dataset imagefolder --data /data/imagenet-256   # the store is found by its index.json

    store = PreparedStore("/data/imagenet-256", "train")                  # items (uint8 (3, 256, 256), label)
    images, labels = store.read_batch([5, 17, 3])                         # uint8 (3, 3, 256, 256), pinned on CUDA
    draws = draw_augmentation(seed, epoch, [5, 17, 3], 224, store.size)   # a function of (seed, epoch, index)
    x = augment_batch(images, draws, 224, device="cuda")                  # float (3, 3, 224, 224) on the GPU
    train = BatchedStore(PreparedStore("/data/imagenet-256", "train", "train", 224))   # what Trainer.fit reads

Format (version 1), in DST:
    index.json           {"format": "fastalex-store", "version": 1, "size": 256, "layout": "NCHW uint8",
                          "classes": [...], "source": SRC, "splits": {"train": {"count", "shards": [{"file",
                          "count", "sha256"}], "labels", "labels_sha256", "skipped": [{"path", "error"}]}, ...}}
    train-00000.npy ...  uint8 (n, 3, S, S) raw .npy shards (shard_size images each, fewer where images
                         were unreadable), read with np.load(mmap_mode="r"): no decode, no copy until used
    train-labels.npy     int64 (count,) class indices, in the order of the shards
Images are in ImageFolder's order (classes sorted, files sorted within each), minus the unreadable
ones: with none skipped, store index i is ImageFolder index i, so the same seed trains on the same
pixels with the same draws (see PreparedStore).

Why raw uint8 shards (measured on the shared 2-core reference machine, 600 generated 500x375 JPEGs
of quality 90, batch 128, crop 224, other jobs running): reading a batch from the store is a memcpy
from the page cache, 13,000-20,000 images/s, where Pillow decoding + resizing the JPEGs gives
280-310 images/s per process; the shards memory-map, so DataLoader workers and the batched path
share one copy of the pages, and a batch is fancy indexing. Why planar (N, 3, S, S) and not
Pillow's (N, S, S, 3): the batched CPU augmentation measured 4,440 vs 3,990 images/s (crops copy
whole rows of one plane, normalisation broadcasts per plane), and items are CHW already. The cost
is disk: 3 x 256 x 256 = 196 KB per image, ~250 GB for ImageNet's 1.28M training images (+ 9.8 GB
for val), and at 10,000 images/s 2 GB/s from the disk once it outgrows the page cache (NVMe). The
smaller alternative is the same 256x256 images re-encoded as JPEG (quality 90: 13 KB each for the
smooth generated images, several times that for photos), which must be decoded again on every read:
1,880 images/s per core measured, so 5-8 cores per GPU instead of a memcpy. This format trades
disk for CPU.

prepare: a pool of `workers` processes, one shard per task; a shard is written to a temporary file,
fsynced and renamed, then recorded by a sidecar (train-00000.json: count, sha256, labels, skipped
files), so an interrupted run (Ctrl-C, SIGKILL, power) continues where it stopped when rerun: a
recorded shard whose file still has its checksum is kept, anything else is redone. index.json is
written last: its presence means the store is finished, and nothing overwrites it without
overwrite=True (--overwrite).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from fastalex import _seeds
from fastalex.data import transforms as T
from fastalex.data.errors import DataError, DatasetNotFoundError
from fastalex.data.folder import UnreadableImageError, find_images, load_image

__all__ = ["FORMAT", "VERSION", "INDEX", "StoreError", "StoreExistsError", "is_store", "prepare", "preprocess",
           "verify_store", "PreparedStore", "Draws", "item_seed", "draw_augmentation", "augment_batch", "BatchedStore",
           "load_for_training"]

FORMAT, VERSION, INDEX = "fastalex-store", 1, "index.json"
_PLAN = "plan.json"  # what an unfinished store is being prepared from; removed when index.json is written
# Testing aid (tests/test_store.py): SIGKILL the preparing process after it has collected this many
# shards, a real kill at a known point. Unset, as always outside the tests, it costs nothing.
_KILL_VAR = "FASTALEX_PREPARE_KILL_AFTER"


class StoreError(DataError):
    """A store that cannot be read or written as asked: the message names the path and the fix."""


class StoreExistsError(StoreError, FileExistsError):
    """The destination already holds a finished store (or other files) and overwrite was not asked for."""


def is_store(path) -> bool:
    """True if `path` is a folder holding a prepared store's index.json."""
    return path is not None and (Path(path) / INDEX).is_file()


# ---------------------------------------------------------------------------------------------- prepare

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(16 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _HashingWriter:
    """A file wrapper hashing what is written (np.lib.format writes through .write), so no second read."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def write(self, b):
        self.h.update(b)
        return self.f.write(b)


def _write_atomic(path: Path, write: Callable) -> None:
    """write(file object) into path.tmp, fsync, rename over path: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    _write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def preprocess(path: str, size: int = 256) -> np.ndarray:
    """One image as the store holds it: uint8 (3, size, size), from the reference chain's own steps
    (load_image, resize_short_side, center_crop: Pillow's bilinear resize of the short side to size)."""
    img = T.center_crop(T.resize_short_side(load_image(path), size), size)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def _shard_task(spec: dict) -> dict:
    """Worker: verify a recorded shard (resume) or build it. spec: dst, name, size, items [(path, rel, label)]."""
    dst, name, size = Path(spec["dst"]), spec["name"], spec["size"]
    npy, side = dst / f"{name}.npy", dst / f"{name}.json"
    if side.is_file():
        try:
            rec = json.loads(side.read_text())
            if rec["count"] == 0 or (npy.is_file() and _sha256(npy) == rec["sha256"]):
                return dict(rec, resumed=True)
        except (OSError, ValueError, KeyError):
            pass  # a damaged record: build the shard again
    buf = np.empty((len(spec["items"]), 3, size, size), dtype=np.uint8)
    labels, skipped = [], []
    for path, rel, label in spec["items"]:
        try:
            buf[len(labels)] = preprocess(path, size)
        except (UnreadableImageError, OSError, ValueError) as e:  # (errors of Pillow's resize, too)
            skipped.append({"path": rel, "error": str(e)})
            continue
        labels.append(label)
    digest = None
    if labels:
        writer = []

        def write(f):
            w = _HashingWriter(f)
            np.lib.format.write_array(w, buf[:len(labels)], allow_pickle=False)
            writer.append(w)
        _write_atomic(npy, write)
        digest = writer[0].h.hexdigest()
    rec = {"file": npy.name if labels else None, "count": len(labels), "sha256": digest, "labels": labels,
           "skipped": skipped, "planned": len(spec["items"])}
    _write_json(side, rec)  # the shard is recorded only once its file is complete
    return dict(rec, resumed=False)


def _worker_init() -> None:
    # Ctrl-C is the parent's to handle (it stops the pool); a worker dies with its parent (Linux),
    # so a killed `fastalex prepare` leaves no process behind.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _plan(src: Path) -> tuple[list[str], dict]:
    """(classes, {split: [(path, relative path, label)]}) of SRC/train and (if there) SRC/val."""
    if not src.is_dir():
        raise DatasetNotFoundError(f"prepare: source folder {src} does not exist (expected {src}/train/<class>/<image>"
                                   f" and optionally {src}/val/<class>/<image>)")
    if not (src / "train").is_dir():
        raise DatasetNotFoundError(f"prepare: {src} has no train/ folder (expected {src}/train/<class>/<image>)")
    splits, classes = {}, None
    for split in ("train", "val"):
        if not (src / split).is_dir():
            continue
        names, samples = find_images(src / split)
        if classes is not None and names != classes:
            extra = sorted(set(names) ^ set(classes))
            raise DataError(f"prepare: {src}: train and val have different class folders (in one only: "
                            f"{', '.join(extra[:10])}{' ...' if len(extra) > 10 else ''})")
        classes = names
        splits[split] = [(p, os.path.relpath(p, src), label) for p, label in samples]
    return classes, splits


def _plan_record(src: Path, size: int, shard_size: int, classes, splits) -> dict:
    files = hashlib.sha256(json.dumps({s: [(r, l) for _, r, l in v] for s, v in splits.items()}).encode())
    return {"format": FORMAT, "version": VERSION, "source": str(src.resolve()), "size": size,
            "shard_size": shard_size, "classes": classes, "images": {s: len(v) for s, v in splits.items()},
            "files_sha256": files.hexdigest()}


def _ours(dst: Path) -> list[Path]:
    """The files a store (finished or not) consists of: all that --overwrite removes."""
    pats = (INDEX, _PLAN, "*-[0-9][0-9][0-9][0-9][0-9].npy", "*-[0-9][0-9][0-9][0-9][0-9].json", "*-labels.npy",
            ".*.tmp")
    return sorted({p for pat in pats for p in dst.glob(pat) if p.is_file()})


def _check_destination(dst: Path, plan: dict, overwrite: bool) -> None:
    """Refuse a finished store or a foreign folder unless overwrite; clear ours when asked; agree on the plan."""
    if dst.exists() and not dst.is_dir():
        raise StoreError(f"prepare: destination {dst} is a file, not a folder")
    dst.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for p in _ours(dst):
            p.unlink()
    if (dst / INDEX).exists():
        raise StoreExistsError(f"prepare: {dst} already holds a prepared store ({INDEX}); pass --overwrite to "
                               f"replace it")
    ours = set(_ours(dst))
    foreign = [p.name for p in dst.iterdir() if p not in ours]
    if foreign:
        raise StoreExistsError(f"prepare: destination {dst} holds other files ({', '.join(sorted(foreign)[:5])}"
                               f"{' ...' if len(foreign) > 5 else ''}); choose an empty or new folder")
    if (dst / _PLAN).is_file():
        try:
            old = json.loads((dst / _PLAN).read_text())
        except ValueError:
            old = None
        if old != plan:
            raise StoreExistsError(f"prepare: {dst} holds an unfinished store of another source or other settings "
                                   f"({(old or {}).get('source')}, size {(old or {}).get('size')}, shard size "
                                   f"{(old or {}).get('shard_size')}); pass --overwrite to start again")
    else:
        for p in ours:  # leftovers without a plan (killed before it was written): not trustworthy
            p.unlink()
        _write_json(dst / _PLAN, plan)
    for p in dst.glob(".*.tmp"):  # half-written files of an interrupted run
        p.unlink()


def prepare(src, dst, *, size: int = 256, shard_size: int = 1024, workers: int | None = None,
            overwrite: bool = False, progress: bool = True, log: Callable[[str], None] | None = print) -> dict:
    """Prepare SRC (an ImageNet-style folder: train/<class>/*, optionally val/<class>/*) into the store DST.

    Each image: decoded with Pillow, short side to `size`, centre size x size crop (exactly the
    reference transform chain's first steps), stored as uint8 (3, size, size). workers: processes
    (default os.cpu_count(); 0 or 1: this process). Resumes an interrupted run with the same
    arguments. Returns the index (also written to DST/index.json). Unreadable images are skipped,
    counted and listed in the index.
    """
    for name, v, lo in (("size", size, 1), ("shard_size", shard_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise StoreError(f"prepare: {name} must be a positive integer, got {v!r}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise StoreError(f"prepare: workers must be a non-negative integer, got {workers!r}")
    src, dst = Path(src), Path(dst)
    classes, splits = _plan(src)
    plan = _plan_record(src, size, shard_size, classes, splits)
    _check_destination(dst, plan, overwrite)
    specs = [{"dst": str(dst), "name": f"{split}-{k:05d}", "size": size, "split": split, "k": k,
              "items": items[k * shard_size:(k + 1) * shard_size]}
             for split, items in splits.items() for k in range(math.ceil(len(items) / shard_size))]
    total = sum(len(v) for v in splits.values())
    kill_after = int(os.environ.get(_KILL_VAR, "0") or 0)
    started = time.perf_counter()
    records: dict[str, dict] = {}
    results, close = _run(specs, workers)  # (the pool forks before the progress bar starts its thread)
    try:
        with _progress(progress, total) as advance:
            for n_done, rec in enumerate(results, 1):
                records[rec.pop("name")] = rec
                advance(rec["planned"])
                if kill_after and n_done == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
    finally:
        close()
    index = _finish(dst, plan, splits, specs, records)
    wall = time.perf_counter() - started
    if log is not None:
        resumed = sum(1 for r in records.values() if r["resumed"])
        skipped = sum(len(s["skipped"]) for s in index["splits"].values())
        counts = ", ".join(f"{s} {v['count']} images" for s, v in index["splits"].items())
        gb = sum(p.stat().st_size for p in dst.glob("*.npy")) / 1e9
        log(f"prepared {dst}: {counts} in {len(specs)} shards ({gb:.2f} GB); {skipped} unreadable images skipped "
            f"(listed in {INDEX}); {resumed} shards kept from an earlier run; {wall:.1f}s "
            f"({(total - sum(r['planned'] for r in records.values() if r['resumed'])) / max(wall, 1e-9):.0f} "
            f"images/s)")
    return index


def _run(specs: list[dict], workers: int):
    """(an iterator of each shard's record, with its "name", in completion order; a function to stop)."""
    if workers <= 1:
        return (dict(_shard_task(spec), name=spec["name"]) for spec in specs), lambda: None
    import multiprocessing as mp

    # fork where there is one: the children need nothing re-imported (spawn would re-import torch in each).
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    pool = ProcessPoolExecutor(max_workers=min(workers, max(1, len(specs))), mp_context=ctx,
                               initializer=_worker_init)
    futures = {pool.submit(_shard_task, spec): spec["name"] for spec in specs}  # all workers start here

    def results():
        for fut in as_completed(futures):
            yield dict(fut.result(), name=futures[fut])
    return results(), lambda: pool.shutdown(wait=False, cancel_futures=True)


class _progress:
    """A rich progress bar over images (resumed shards count at once); a no-op when disabled."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.bar = enabled, total, None

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("prepare"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                            TimeElapsedColumn(), TimeRemainingColumn())
        self.bar.start()
        task = self.bar.add_task("prepare", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


def _finish(dst: Path, plan: dict, splits: dict, specs: list[dict], records: dict) -> dict:
    """Labels files and index.json from the shards' records; then the records and the plan go."""
    index = {"format": FORMAT, "version": VERSION, "size": plan["size"], "layout": "NCHW uint8",
             "classes": plan["classes"], "source": plan["source"], "shard_size": plan["shard_size"], "splits": {}}
    for split in splits:
        recs = [records[s["name"]] for s in specs if s["split"] == split]
        labels = np.array([l for r in recs for l in r["labels"]], dtype=np.int64)
        lab = dst / f"{split}-labels.npy"
        _write_atomic(lab, lambda f, a=labels: np.lib.format.write_array(f, a, allow_pickle=False))
        index["splits"][split] = {
            "count": int(labels.shape[0]),
            "shards": [{"file": r["file"], "count": r["count"], "sha256": r["sha256"]} for r in recs if r["count"]],
            "labels": lab.name, "labels_sha256": _sha256(lab),
            "skipped": [s for r in recs for s in r["skipped"]]}
    _write_json(dst / INDEX, index)  # from here on the store is finished
    for s in specs:
        (dst / f"{s['name']}.json").unlink(missing_ok=True)
    (dst / _PLAN).unlink(missing_ok=True)
    return index


def _read_index(root) -> dict:
    root = Path(root)
    path = root / INDEX
    if not path.is_file():
        raise DatasetNotFoundError(f"{root} is not a prepared store (no {INDEX}); make one with "
                                   f"`fastalex prepare SRC {root}`")
    try:
        index = json.loads(path.read_text())
    except ValueError as e:
        raise StoreError(f"{path} is not valid JSON ({e}); prepare the store again with --overwrite") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise StoreError(f"{path} is not a fastalex store index")
    if index.get("version") != VERSION:
        raise StoreError(f"{path}: store format version {index.get('version')}, this fastalex reads version "
                         f"{VERSION}; prepare it again with --overwrite")
    return index


def verify_store(root) -> list[str]:
    """The files of a store whose sha256 differs from its index (empty: intact)."""
    root, index = Path(root), _read_index(root)
    bad = []
    for split in index["splits"].values():
        files = [(s["file"], s["sha256"]) for s in split["shards"]] + [(split["labels"], split["labels_sha256"])]
        bad += [f for f, digest in files if not (root / f).is_file() or _sha256(root / f) != digest]
    return bad


# ---------------------------------------------------------------------------------------------- reading

def _train_transform(size, sigma: float = 0.1):
    # The ImageFolder chain's random steps in its order (crop, flip, PCA alpha: the same draws), but
    # the crop and flip on the uint8 pixels before ToTensor: they commute with /255, so the result is
    # the same bits for a quarter of the copying.
    return T.Compose([T.RandomCrop(size), T.RandomHorizontalFlip(0.5), T.ToTensor(), T.PCAColorNoise(sigma),
                      T.Normalize()])


def _eval_transform(size):
    return T.Compose([T.CenterCrop(size), T.ToTensor(), T.Normalize()])


def _ten_crop_transform(size):
    return T.Compose([T.ToTensor(), T.Normalize(), T.TenCrop(size)])


class PreparedStore(Dataset):
    """One split of a prepared store; items (image, label).

    mode "raw": the stored uint8 (3, S, S) tensor (S = store.size); "train": the paper's training
    transform (random image_size crop, flip, PCA colour noise, ImageNet normalisation) -> float
    (3, h, w); "eval": centre crop + normalisation; "ten_crop": (10, 3, h, w). The random draws come
    from torch's global RNG in ImageFolder's order, so under the Trainer (which seeds it per item
    from (seed, epoch, index)) an item equals the ImageFolder item of the same index bit for bit.
    Only paths are held until the first item (shards are memory-mapped per process), so the
    Dataset pickles cheaply into DataLoader workers.
    """

    MODES = ("raw", "train", "eval", "ten_crop")

    def __init__(self, root, split: str = "train", mode: str = "raw", image_size=224, *, pca_sigma: float = 0.1):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.root, self.split, self.mode, self.pca_sigma = str(root), split, mode, pca_sigma
        index = _read_index(root)
        if split not in index["splits"]:
            raise DatasetNotFoundError(f"store {root} has no {split!r} split (it has {sorted(index['splits'])}; "
                                       f"its source had no {split}/ folder)")
        self.size, self.classes = int(index["size"]), list(index["classes"])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        info = index["splits"][split]
        self.skipped = list(info["skipped"])
        self._files = [s["file"] for s in info["shards"]]
        self._starts = np.cumsum([0] + [s["count"] for s in info["shards"]])
        self.targets = np.load(Path(root) / info["labels"])
        if len(self.targets) != info["count"] or self._starts[-1] != info["count"]:
            raise StoreError(f"store {root}: split {split} lists {info['count']} images but its shards / labels "
                             f"hold {self._starts[-1]} / {len(self.targets)}; prepare it again with --overwrite")
        self.image_size = T._size(image_size, "image_size")
        if max(self.image_size) > self.size:
            raise DataError(f"image_size {self.image_size} is larger than the store's {self.size}x{self.size} "
                            f"images (prepare with --size {max(self.image_size)})")
        self.transform = {"raw": None, "train": lambda: _train_transform(self.image_size, pca_sigma),
                          "eval": lambda: _eval_transform(self.image_size),
                          "ten_crop": lambda: _ten_crop_transform(self.image_size)}[mode]
        self.transform = self.transform() if self.transform else None
        self._shards = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __repr__(self) -> str:
        return (f"PreparedStore({self.root!r}, {self.split!r}, mode={self.mode!r}, {len(self.classes)} classes, "
                f"{len(self)} images)")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_shards"] = None  # memory maps are re-opened in each process
        return state

    def _open(self) -> list:
        if self._shards is None:
            shards = []
            for f in self._files:
                path = Path(self.root) / f
                try:
                    arr = np.load(path, mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError) as e:
                    raise StoreError(f"store {self.root}: cannot read shard {path}: {e}") from None
                if arr.dtype != np.uint8 or arr.shape[1:] != (3, self.size, self.size):
                    raise StoreError(f"store {self.root}: shard {path} holds {arr.dtype} {arr.shape}, expected uint8 "
                                     f"(n, 3, {self.size}, {self.size})")
                shards.append(arr)
            self._shards = shards
        return self._shards

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        i %= n
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        return s, i - int(self._starts[s])

    def image(self, i: int) -> torch.Tensor:
        """The stored image i: uint8 (3, S, S) (a copy: the memory map is read-only)."""
        s, j = self._locate(int(i))
        return torch.from_numpy(np.array(self._open()[s][j]))

    def __getitem__(self, i: int):
        img = self.image(i)
        return (self.transform(img) if self.transform is not None else img), int(self.targets[int(i)])

    def read_batch(self, indices: Sequence[int], pin_memory: bool | None = None,
                   out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 (B, 3, S, S), int64 (B,) labels) of these images, by indexing the memory-mapped shards.

        pin_memory: page-locked images (default: when CUDA is available), for asynchronous copies to
        the GPU. out: a uint8 (B, 3, S, S) CPU tensor to fill instead of a new one.
        """
        indices = [int(i) for i in indices]
        shape = (len(indices), 3, self.size, self.size)
        if out is None:
            pin = torch.cuda.is_available() if pin_memory is None else pin_memory
            out = torch.empty(shape, dtype=torch.uint8, pin_memory=pin)
        elif out.shape != shape or out.dtype != torch.uint8 or out.device.type != "cpu":
            raise ValueError(f"out must be a uint8 CPU tensor {shape}, got {out.dtype} {tuple(out.shape)} on "
                             f"{out.device}")
        dst, shards = out.numpy(), self._open()
        for k, i in enumerate(indices):
            s, j = self._locate(i)
            dst[k] = shards[s][j]
        labels = torch.from_numpy(self.targets[np.asarray(indices, dtype=np.int64) % max(len(self), 1)]
                                  if indices else np.zeros(0, np.int64))
        return out, labels


# ---------------------------------------------------------------------------------------------- batched path

class Draws(NamedTuple):
    """Per-image augmentation draws (CPU): tops, lefts (B,) int64; flips (B,) bool; alphas (B, 3) float64."""
    tops: torch.Tensor
    lefts: torch.Tensor
    flips: torch.Tensor
    alphas: torch.Tensor


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one item's draws: the Trainer's (fastalex._seeds)."""
    return _seeds.item_seed(seed, epoch, index)


def draw_augmentation(seed: int, epoch: int, indices: Sequence[int], image_size, src_size: int = 256, *,
                      pca_sigma: float = 0.1, flip_p: float = 0.5) -> Draws:
    """The draws PreparedStore(mode="train") makes under the Trainer for these items: per item a CPU
    generator seeded with item_seed(seed, epoch, index), then top, left, flip, alpha in that order."""
    h, w = T._size(image_size, "image_size")
    if h > src_size or w > src_size:
        raise ValueError(f"image_size {(h, w)} is larger than the {src_size}x{src_size} stored images")
    n = len(indices)
    tops, lefts = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64)
    flips, alphas = torch.empty(n, dtype=torch.bool), torch.empty(n, 3, dtype=torch.float64)
    g = torch.Generator()
    for k, i in enumerate(indices):
        g.manual_seed(item_seed(seed, epoch, int(i)))
        tops[k] = torch.randint(0, src_size - h + 1, (1,), generator=g)[0]
        lefts[k] = torch.randint(0, src_size - w + 1, (1,), generator=g)[0]
        flips[k] = torch.rand(1, generator=g)[0] < flip_p
        alphas[k] = pca_sigma * torch.randn(1, 3, generator=g, dtype=torch.float64)[0]
    return Draws(tops, lefts, flips, alphas)


def augment_batch(batch: torch.Tensor, draws: Draws | None, image_size=224, *, device=None, ten_crop: bool = False,
                  mean=T.IMAGENET_MEAN, std=T.IMAGENET_STD, eigval=T.PCA_EIGVAL, eigvec=T.PCA_EIGVEC,
                  dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None,
                  threads: int | None = None) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float (B, 3, h, w) on `device` (default: the batch's), batched there.

    draws given (draw_augmentation): crop at (top, left), mirror, PCA noise, normalise; the same bits
    as PreparedStore(mode="train") items for the same draws (the same ops in the same order, per
    element). draws None: the centre crop and normalisation (mode "eval"), or with ten_crop the
    (B, 10, 3, h, w) test crops (mode "ten_crop"). A pinned CPU batch goes to the GPU asynchronously.
    out: write the result there ((B, 3, h, w), dtype, on device) instead of a new tensor. threads:
    CPU threads (default torch.get_num_threads()).
    """
    if batch.dim() != 4 or batch.dtype != torch.uint8 or batch.shape[1] != 3:
        raise ValueError(f"batch must be uint8 (B, 3, S, S), got {batch.dtype} {tuple(batch.shape)}")
    h, w = T._size(image_size, "image_size")
    device = batch.device if device is None else torch.device(device)
    x = batch.to(device, non_blocking=True)
    n, src_h, src_w = x.shape[0], x.shape[2], x.shape[3]
    if h > src_h or w > src_w:
        raise ValueError(f"image_size {(h, w)} is larger than the batch's {src_h}x{src_w} images")
    if ten_crop:
        if draws is not None:
            raise ValueError("ten_crop takes no draws (the test crops are fixed)")
        return T.ten_crop(T.normalize(x.to(dtype).div_(255), mean, std), (h, w))
    if draws is not None and len(draws.tops) != n:
        raise ValueError(f"draws are for {len(draws.tops)} images, the batch has {n}")
    if out is None:
        out = torch.empty((n, 3, h, w), dtype=dtype, device=device)
    elif out.shape != (n, 3, h, w) or out.dtype != dtype or out.device != device:
        raise ValueError(f"out must be {dtype} {(n, 3, h, w)} on {device}, got {out.dtype} {tuple(out.shape)} on "
                         f"{out.device}")
    m = torch.as_tensor(mean, dtype=dtype, device=device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=dtype, device=device).view(-1, 1, 1)
    offset = (T.pca_offset(draws.alphas, eigval, eigvec, dtype=dtype, device=device).view(n, 3, 1, 1)
              if draws is not None else None)

    def finish(y: torch.Tensor, a: int) -> None:  # y holds the cropped pixels as floats (0..255)
        y.div_(255)                              # to_tensor
        if offset is not None:
            y.add_(offset[a:a + y.shape[0]])     # pca_color_noise
        y.sub_(m).div_(s)                        # normalize

    if device.type != "cpu" or dtype not in (torch.float32, torch.float64):
        # one gather, then one pass per op over the whole batch (on a GPU: a handful of kernels)
        out.copy_(T.center_crop(x, (h, w)) if draws is None
                  else T.crop_batch(x, draws.tops, draws.lefts, (h, w), draws.flips))
        finish(out, 0)
        return out
    if draws is None:
        t0, l0 = int(round((src_h - h) / 2.0)), int(round((src_w - w) / 2.0))
        crops = [(t0, l0, False)] * n
    else:
        crops = list(zip(draws.tops.tolist(), draws.lefts.tolist(), draws.flips.tolist()))
    _augment_cpu(x.numpy(), out.numpy(), crops, h, w, None if offset is None else offset.numpy(), m.numpy(),
                 s.numpy(), threads)
    return out


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _augment_cpu(x: np.ndarray, out: np.ndarray, crops, h: int, w: int, offset, m, s, threads: int | None) -> None:
    """The CPU batch in numpy, in `threads` threads (default torch.get_num_threads()), 8 images at a time.

    Why numpy in threads, not torch's ops: the same IEEE float ops (the tests check the bits), but
    numpy releases the GIL and has no OpenMP team to wait for. Measured on the shared 2-core machine
    with other jobs running: torch's ops fell from ~9,600 to ~600 images/s (a parallel region per
    image copy, each waiting for a descheduled thread), these from ~10,800 to ~10,200. Each crop
    (a view; flips are negative strides) is copied straight into its rows of out, and the 8-image
    chunk's four passes stay in cache.
    """
    n = out.shape[0]
    threads = max(1, min(threads or torch.get_num_threads(), n))

    def part(lo: int, hi: int) -> None:
        for c0 in range(lo, hi, 8):
            c1 = min(hi, c0 + 8)
            y = out[c0:c1]
            for k in range(c0, c1):
                t, l, f = crops[k]
                c = x[k, :, t:t + h, l:l + w]
                y[k - c0] = c[..., ::-1] if f else c
            np.divide(y, y.dtype.type(255), out=y)         # to_tensor
            if offset is not None:
                np.add(y, offset[c0:c1], out=y)            # pca_color_noise
            np.subtract(y, m, out=y)                       # normalize
            np.divide(y, s, out=y)

    if threads == 1:
        part(0, n)
        return
    pool = _POOLS.get(threads) or _POOLS.setdefault(threads, ThreadPoolExecutor(threads, "fastalex-augment"))
    for f in [pool.submit(part, i * n // threads, (i + 1) * n // threads) for i in range(threads)]:
        f.result()


def _storage_refs(t: torch.Tensor) -> int | None:
    """References to t's storage (torch's private count; None where this torch has none)."""
    try:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)
    except (AttributeError, RuntimeError, TypeError):
        return None


class _Buffers:
    """Output buffers reused once nobody else holds them: a fresh 77 MB batch costs the kernel ~19,000
    zeroed pages, measured as half the CPU augmentation time (4,000 -> 8,500 images/s reused). A buffer
    is reused only while its storage has no reference but ours (every batch handed out is a view), so
    a batch kept by the caller is never overwritten; without torch's count nothing is reused."""

    def __init__(self, keep: int = 4):
        self.keep, self.free_refs, self.pool = keep, _storage_refs(torch.empty(1)), []

    def get(self, shape, dtype, device) -> torch.Tensor:
        if self.free_refs is not None and device.type == "cpu":
            for b in self.pool:
                if b.shape[1:] == shape[1:] and b.shape[0] >= shape[0] and b.dtype == dtype \
                        and _storage_refs(b) == self.free_refs:
                    return b[:shape[0]]
            if len(self.pool) < self.keep:
                self.pool.append(torch.empty(shape, dtype=dtype))
                return self.pool[-1][:shape[0]]
        return torch.empty(shape, dtype=dtype, device=device)


class BatchedStore(Dataset):
    """A split of a store as the Trainer reads it a batch at a time: uint8 batches read (and their
    draws made) on its reader thread, then copied to the device and augmented there in one go.

    items: a PreparedStore of mode "train" (random crop, flip, PCA noise) or "eval" (centre crop);
    indices: the store items this set holds (a subset; default all). Item i is items[indices[i]],
    and under the Trainer's seeding the batch of positions p is bit for bit the stack of those items
    (the draws are keyed by position, as _Seeded keys an item of a Subset). The Trainer's protocol:
    load_batch on the reader thread (no global RNG), augment_batch after the copy to the device.
    """

    def __init__(self, items: PreparedStore, indices: Sequence[int] | None = None):
        if not isinstance(items, PreparedStore) or items.mode not in ("train", "eval"):
            raise ValueError(f"items must be a PreparedStore of mode 'train' or 'eval', got {items!r}")
        self.items = items
        self.indices = list(range(len(items))) if indices is None else [int(i) for i in indices]
        self.classes, self.class_to_idx = items.classes, items.class_to_idx
        self.targets = items.targets[np.asarray(self.indices, dtype=np.int64)]
        self._raw, self._out = _Buffers(), _Buffers()  # CPU batches (pinned ones: torch's caching allocator)

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return f"BatchedStore({self.items!r}, {len(self)} images)"

    def __getitem__(self, i: int):
        return self.items[self.indices[i]]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_raw"], state["_out"] = _Buffers(), _Buffers()  # (a DataLoader worker needs none of ours)
        return state

    def load_batch(self, seed: int, epoch: int, positions: Sequence[int], pin_memory: bool = False):
        """(uint8 (B, 3, S, S) images, int64 (B,) labels, Draws or None) of these positions: the CPU
        half, safe on another thread. pin_memory: page-locked, for an asynchronous copy to a GPU
        (new tensors, which torch's pinned allocator reuses only once their copies are done); else
        reused buffers (never one a caller still holds)."""
        idx = [self.indices[p] for p in positions]
        s = self.items.size
        out = None if pin_memory else self._raw.get((len(idx), 3, s, s), torch.uint8, torch.device("cpu"))
        images, labels = self.items.read_batch(idx, pin_memory=pin_memory, out=out)
        draws = (draw_augmentation(seed, epoch, positions, self.items.image_size, s, pca_sigma=self.items.pca_sigma)
                 if self.items.mode == "train" else None)
        return images, (labels.pin_memory() if pin_memory else labels), draws

    def augment_batch(self, images: torch.Tensor, draws: Draws | None) -> torch.Tensor:
        """uint8 (B, 3, S, S) -> float32 (B, 3, h, w) on the images' device: augment_batch with
        these draws (None: the centre crop), into a reused buffer on the CPU."""
        h, w = self.items.image_size
        out = self._out.get((images.shape[0], 3, h, w), torch.float32, images.device)
        return augment_batch(images, draws, (h, w), out=out)


# ---------------------------------------------------------------------------------------------- training

def load_for_training(root, *, image_size=227, subset: int | None = None, ten_crop: bool = False,
                      augment: bool = True) -> tuple[Dataset, Dataset, Dataset, list[str]]:
    """(train, val, test, classes) from a store, with load_for_training("imagefolder")'s semantics:
    train a BatchedStore (the Trainer reads it a batch at a time, augmenting on the device) with the
    paper's training transform (or the centre crop without augment), `subset` a random N (seed 0);
    val the centre crop of the val split, test the val split again (ten crops if ten_crop), both
    PreparedStores read item by item."""
    items = PreparedStore(root, "train", "train" if augment else "eval", image_size)
    index = _read_index(root)
    if "val" not in index["splits"]:
        raise DatasetNotFoundError(f"store {root} has no val split (its source had no val/ folder): training "
                                   f"validates on it; prepare from a folder with val/<class>/<image>")
    val = PreparedStore(root, "val", "eval", image_size)
    test = PreparedStore(root, "val", "ten_crop", image_size) if ten_crop else val
    keep = None
    if subset is not None:
        if isinstance(subset, bool) or not isinstance(subset, int) or subset < 1:
            raise DataError(f"subset must be a positive number of images, got {subset!r}")
        if subset > len(items):
            raise DataError(f"subset {subset} is larger than the store's training split ({len(items)} images)")
        keep = sorted(torch.randperm(len(items), generator=torch.Generator().manual_seed(0))[:subset].tolist())
    return BatchedStore(items, keep), val, test, list(val.classes)
