"""Images per second of the ImageNet input pipeline, stage by stage, on this machine.

    python -m perf.data --data /data/imagenet-256 --json store.json     # a prepared store (fastalex prepare)
    python -m perf.data --data /data/imagenet --json folder.json        # an ImageNet-style folder

Store (DATA has index.json), the Trainer's path (BatchedStore): `read` (load_batch, the reader
thread's work: fancy indexing of the memory-mapped shards into a uint8 batch, pinned with CUDA, and
the batch's draws), `augment` (augment_batch on a batch already on --device: crop, flip, PCA noise,
normalise, batched), `copy` (the pinned uint8 batch to the GPU; n/a without CUDA) and `loader`
(ready, augmented batches on --device exactly as Trainer.fit gets them: the epoch's order, the
reader thread two batches ahead, the copy, the augmentation).
Folder (DATA/train/<class>/<image>), the Dataset path: `decode` (Pillow decode, short side 256,
centre 256 crop: per image, in this process), `augment` (the paper transform's tensor steps per
image), `copy` (a float32 batch to the GPU) and `loader` (ImageFolder + DataLoader with --workers
processes, the paper's training transform).
Each stage: `warmup` batches untimed, then --batches timed; images/s = images / wall seconds. The
JSON: {"data", "kind", "device", "batch_size", "image_size", "workers", "stages": {name: {"images",
"seconds", "images_per_second"} or null}, "images_per_second" (the loader's), "environment"}; a
rich table on stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from fastalex.data import ImageFolder, collate_skip_unreadable, load_image, store
from fastalex.data import transforms as T
from perf._args import non_negative_int, positive_int


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m perf.data", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a prepared store (index.json) or a folder with train/<class>/*")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("-b", "--batch-size", type=positive_int, default=128)
    p.add_argument("--image-size", type=positive_int, default=224, help="the training crop (default 224)")
    p.add_argument("--batches", type=positive_int, default=20, help="timed batches per stage (default 20)")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="untimed batches first (default 1)")
    p.add_argument("-j", "--workers", type=non_negative_int, default=None,
                   help="DataLoader processes for a folder (default: all cores)")
    p.add_argument("--device", default=None, help="where the store path augments (default cuda if available, else cpu)")
    args = p.parse_args(argv)
    if not Path(args.data).is_dir():
        p.error(f"--data: {args.data} is not a folder")
    args.kind = "store" if store.is_store(args.data) else "imagefolder"
    if args.kind == "imagefolder" and not (Path(args.data) / "train").is_dir():
        p.error(f"--data: {args.data} is neither a prepared store (no index.json) nor a folder with train/<class>/*")
    if args.image_size > 256:
        p.error(f"--image-size must be at most 256 (the stored / resized images), got {args.image_size}")
    args.workers = (os.cpu_count() or 1) if args.workers is None else args.workers
    try:
        args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        p.error(f"--device: {e}")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step, batches: int, warmup: int, device: torch.device) -> dict:
    """step() -> images done; warmup untimed calls, then `batches` timed ones."""
    for _ in range(warmup):
        step()
    _sync(device)
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        n += step()
    _sync(device)
    s = time.perf_counter() - t0
    return {"images": n, "seconds": round(s, 4), "images_per_second": round(n / s, 1) if s > 0 else None}


def _cycle(make_iter):
    """Batches of a loader, epoch after epoch (the epoch number passed to make_iter)."""
    epoch = 0
    while True:
        empty = True
        for item in make_iter(epoch):
            empty = False
            yield item
        if empty:
            raise ValueError("the data holds no batch")
        epoch += 1


def measure_store(args) -> dict:
    from fastalex.trainer import _device_batches, _EpochBatches

    data = store.BatchedStore(store.PreparedStore(args.data, "train", "train", args.image_size))
    n, b = len(data), min(args.batch_size, len(data))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    batches = [order[(k * b) % (n - b + 1):(k * b) % (n - b + 1) + b] for k in range(args.batches + args.warmup)]
    it = iter(range(10 ** 9))
    stages = {}
    cuda = args.device.type == "cuda"
    stages["read"] = _time(lambda: data.load_batch(0, 0, batches[next(it) % len(batches)], cuda)[0].shape[0],
                           args.batches, args.warmup, torch.device("cpu"))
    images, _, draws = data.load_batch(0, 0, batches[0], cuda)
    on_device = images.to(args.device)
    stages["augment"] = _time(lambda: data.augment_batch(on_device, draws).shape[0], args.batches, args.warmup,
                              args.device)
    stages["copy"] = (_time(lambda: images.to(args.device, non_blocking=True).shape[0], args.batches, args.warmup,
                            args.device) if cuda else None)
    src = _cycle(lambda e: _device_batches(data, _EpochBatches(n, b, 0, e), 0, args.device))
    stages["loader"] = _time(lambda: next(src)[0].shape[0], args.batches, args.warmup, args.device)
    return stages


def measure_folder(args) -> dict:
    root = Path(args.data)
    train = ImageFolder(root, "train", transform=T.paper_train_transform(args.image_size), on_error="skip")
    paths = [p for p, _ in train.samples]
    b = min(args.batch_size, len(paths))
    it = iter(range(10 ** 9))
    base = T.Compose([T.ResizeShortSide(256), T.CenterCrop(256)])
    stages = {}

    def decode():
        k = next(it)
        for i in range(b):
            base(load_image(paths[(k * b + i) % len(paths)]))
        return b
    stages["decode"] = _time(decode, args.batches, args.warmup, torch.device("cpu"))
    decoded = [T.to_tensor(base(load_image(paths[i % len(paths)]))) for i in range(b)]
    tail = T.Compose(T.paper_train_transform(args.image_size).transforms[3:])  # crop, flip, PCA, normalise

    def augment():
        return len([tail(x) for x in decoded])
    stages["augment"] = _time(augment, args.batches, args.warmup, torch.device("cpu"))
    if args.device.type == "cuda":
        batch = torch.stack([tail(x) for x in decoded]).pin_memory()
        stages["copy"] = _time(lambda: batch.to(args.device, non_blocking=True).shape[0], args.batches, args.warmup,
                               args.device)
    else:
        stages["copy"] = None

    def epochs(e):
        return iter(torch.utils.data.DataLoader(train, batch_size=b, shuffle=True, num_workers=args.workers,
                                                generator=torch.Generator().manual_seed(e),
                                                collate_fn=collate_skip_unreadable,
                                                pin_memory=args.device.type == "cuda",
                                                persistent_workers=False))
    src = _cycle(epochs)

    def load():
        images, _, _ = next(src)
        return images.to(args.device, non_blocking=True).shape[0] if images is not None else 0
    stages["loader"] = _time(load, args.batches, args.warmup, args.device)
    return stages


def environment(device: torch.device) -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "cpu_threads": torch.get_num_threads(), "cuda": torch.version.cuda,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(), "date": dt.date.today().isoformat()}


def run(args) -> dict:
    stages = measure_store(args) if args.kind == "store" else measure_folder(args)
    return {"data": str(args.data), "kind": args.kind, "device": str(args.device), "batch_size": args.batch_size,
            "image_size": args.image_size, "workers": args.workers if args.kind == "imagefolder" else None,
            "stages": stages, "images_per_second": stages["loader"]["images_per_second"],
            "environment": environment(args.device)}


def print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    what = {"read": "uint8 batch from the memory-mapped shards", "decode": "Pillow decode + short side 256 + "
            "centre 256, one process", "augment": f"crop {res['image_size']} + flip + PCA + normalise" +
            (", batched" if res["kind"] == "store" else ", per image"),
            "copy": "batch to the GPU", "loader": "ready augmented batches" +
            (" (the Trainer's: reader thread + augment_batch)" if res["kind"] == "store" else f" (DataLoader, {res['workers']} workers)")}
    table = Table(title=f"{res['kind']} {res['data']} on {res['device']}, batch {res['batch_size']}")
    for col in ("stage", "images/s", "what"):
        table.add_column(col, justify="right" if col == "images/s" else "left")
    for name, st in res["stages"].items():
        table.add_row(name, f"{st['images_per_second']:,.0f}" if st else "n/a", what.get(name, ""))
    Console().print(table)


def main(argv=None) -> int:
    args = parse_args(argv)
    res = run(args)
    print_table(res)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
