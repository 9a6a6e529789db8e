"""The `fastalex` command: `fastalex train` (flags after torchvision's training reference) and `fastalex eval`.

    fastalex train                          # the default: Fashion-MNIST, the quick preset, CPU-friendly
    fastalex train --preset paper --dataset imagefolder --data /data/imagenet
    fastalex prepare /data/imagenet /data/imagenet-256    # once; then train with --data /data/imagenet-256
    fastalex eval --checkpoint runs/fashion-mnist/best.pt
    fastalex train --strategy towers --devices cuda:0,cuda:1          # the paper's two-GPU split
    fastalex predict shoe.png --checkpoint runs/fashion-mnist/best.pt             # Figure 4 (left): top-5
    fastalex neighbors --checkpoint CKPT --query shoe.png --out grid.png          # Figure 4 (right)
    fastalex filters --checkpoint CKPT --out kernels.png                          # Figure 3: conv1's kernels
    torchrun --nproc-per-node 2 -m fastalex train --strategy ddp        # data parallel (or hybrid)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

# What each preset sets; explicit flags override. "quick" is the default on Fashion-MNIST: it is
# measured to reach >= 85% test accuracy within 10 minutes on a 2-core CPU (see README).
PRESETS = {
    "quick": dict(variant="paper", image_size=67, epochs=1, batch_size=128, lr=0.02, momentum=0.9, wd=5e-4,
                  lr_schedule="cosine", warmup_steps=50, init="kaiming", dropout=0.0, augment=False,
                  ten_crop=False),
    "paper": dict(variant="paper", image_size=227, epochs=90, batch_size=128, lr=0.01, momentum=0.9, wd=5e-4,
                  lr_schedule="plateau", warmup_steps=0, init="paper", dropout=0.5, augment=True,
                  ten_crop=True),
}
MODEL_KEYS = ("variant", "image_size", "dropout", "init", "activation", "lrn", "pool")


class UsageError(Exception):
    """A problem with the command line or the data: printed without a traceback, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastalex", description="AlexNet on fused Triton kernels.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train AlexNet (default: Fashion-MNIST, quick preset)")
    t.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="quick (default for fashion-mnist) or paper (the 2012 recipe at full size)")
    t.add_argument("--dataset", choices=("fashion-mnist", "imagefolder"), default="fashion-mnist")
    t.add_argument("--data", default=None, help="dataset folder (default: $FASTALEX_DATA, the Debian package, "
                                                "or a download for fashion-mnist)")
    t.add_argument("--variant", choices=("paper", "single", "torchvision"))
    t.add_argument("--image-size", type=int)
    t.add_argument("--epochs", type=int)
    t.add_argument("-b", "--batch-size", type=int, help="images per step (per process)")
    t.add_argument("--lr", type=float)
    t.add_argument("--momentum", type=float)
    t.add_argument("--wd", "--weight-decay", dest="wd", type=float)
    t.add_argument("--lr-schedule", choices=("plateau", "cosine", "constant"))
    t.add_argument("--dropout", type=float)
    t.add_argument("--init", choices=("paper", "torch", "kaiming"))
    t.add_argument("--warmup-steps", type=int)
    t.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random training augmentation (default: the preset's)")
    t.add_argument("--precision", choices=("32", "bf16-mixed", "16-mixed"), default="32")
    t.add_argument("--device", default="auto")
    t.add_argument("--strategy", choices=("single", "towers", "ddp", "hybrid"), default="single",
                   help="towers: the paper's split of the net over --devices; ddp / hybrid: under torchrun, "
                        "data parallel / convs data parallel and FC layers split (one weird trick)")
    t.add_argument("--devices", default=None, help="two devices for --strategy towers, e.g. cuda:0,cuda:1")
    t.add_argument("--backend", choices=("auto", "triton", "torch"), default=None)
    t.add_argument("-j", "--workers", type=int, default=None,
                   help="DataLoader processes (default: 0 for fashion-mnist, which is in memory and measured slower "
                        "with workers on a 2-core machine; else the cores, at most 8)")
    t.add_argument("--seed", type=int, default=0, help="decides everything random in the run: initial weights, "
                                                        "dropout, data order, augmentation (default 0)")
    t.add_argument("--deterministic", action="store_true",
                   help="torch's deterministic algorithms and cuDNN's deterministic mode (for bit-exact GPU runs)")
    t.add_argument("--subset", type=int, default=None, help="train on the first N images")
    t.add_argument("--out", default=None, help="output folder (default: runs/<dataset>-<variant>)")
    t.add_argument("--resume", nargs="?", const="", default=None,
                   help="continue a run: its checkpoint (default: OUT/checkpoint.pt)")
    t.add_argument("--overwrite", action="store_true", help="start afresh in an OUT that already holds a run")
    t.add_argument("--test-only", action="store_true", help="only evaluate (with --resume PATH: that checkpoint)")
    t.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS")
    t.add_argument("--log-every", type=int, default=50, metavar="STEPS",
                   help="a step row in OUT/metrics.jsonl every this many steps (default 50)")
    t.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile the training step (MODE default; reduce-overhead: CUDA graphs on GPUs)")
    t.add_argument("--tensorboard", action="store_true",
                   help="TensorBoard event files in OUT/tensorboard (needs the tensorboard package)")
    t.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("eval", help="evaluate a checkpoint on the test set")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", default=None)
    e.add_argument("--ten-crop", action="store_true")
    e.add_argument("--device", default="auto")
    e.add_argument("-b", "--batch-size", type=int, default=256)
    e.add_argument("-j", "--workers", type=int, default=None, help="DataLoader processes (default: as for train)")
    e.add_argument("--json", default=None, help="also write the result here")

    pr = sub.add_parser("predict", help="top classes of image files (the paper's Figure 4, left)")
    pr.add_argument("images", nargs="+", metavar="IMAGE", help="PNG / JPEG files, any size, grey or colour")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("--top", type=int, default=5, help="classes shown per image")
    pr.add_argument("--json", default=None, help="also write the predictions here")
    pr.add_argument("--device", default="auto")
    pr.add_argument("--backend", choices=("auto", "triton", "torch"), default=None)
    pr.add_argument("-b", "--batch-size", type=int, default=64)

    nb = sub.add_parser("neighbors", help="training images nearest to queries in the last hidden layer "
                                          "(the paper's Figure 4, right)")
    nb.add_argument("--checkpoint", required=True)
    nb.add_argument("--query", nargs="+", required=True, metavar="IMAGE", help="PNG / JPEG files")
    nb.add_argument("--data", default=None, help="dataset folder (default: the checkpoint's)")
    nb.add_argument("-k", type=int, default=6, help="neighbours per query")
    nb.add_argument("--out", default="neighbors.png", help="the picture: a row per query, then its neighbours")
    nb.add_argument("--json", default=None, help="also write indices and distances here")
    nb.add_argument("--tile", type=int, default=96, help="pixels per image in the picture")
    nb.add_argument("-b", "--batch-size", type=int, default=256)
    nb.add_argument("-j", "--workers", type=int, default=None, help="DataLoader processes (default: as for train)")
    nb.add_argument("--device", default="auto")
    nb.add_argument("--backend", choices=("auto", "triton", "torch"), default=None)
    nb.add_argument("--no-progress", action="store_true")

    fi = sub.add_parser("filters", help="conv1's kernels as a picture (the paper's Figure 3)")
    fi.add_argument("--checkpoint", required=True)
    fi.add_argument("--out", required=True, help="PNG file to write")
    fi.add_argument("--scale", type=int, default=4, help="pixels per kernel weight")
    fi.add_argument("--normalize", choices=("kernel", "global"), default="kernel",
                    help="stretch each kernel to [0, 1] by its own range (default) or all by one range")

    pp = sub.add_parser("prepare", help="an ImageNet-style folder -> a store of 256x256 uint8 images for fast "
                                        "training (fastalex.data.store)")
    pp.add_argument("src", metavar="SRC", help="folder with train/<class>/<image> (and optionally val/...)")
    pp.add_argument("dst", metavar="DST", help="the store's folder (then: fastalex train --dataset imagefolder "
                                               "--data DST)")
    pp.add_argument("-j", "--workers", type=int, default=None, help="processes (default: all cores)")
    pp.add_argument("--size", type=int, default=256, help="short side and centre crop (default 256, the paper's)")
    pp.add_argument("--shard-size", type=int, default=1024, help="images per shard file (default 1024: 201 MB)")
    pp.add_argument("--overwrite", action="store_true", help="replace a finished store in DST")
    pp.add_argument("--no-progress", action="store_true")
    return p


def default_workers(dataset: str) -> int:
    """--workers when not given. fashion-mnist: 0; it is in memory and its batches are one indexing
    op, so workers only compete with the training step for the cores (the quick preset measured
    54-64 instead of 81-82 images/s with 2 workers on the shared 2-core machine). Otherwise the cores
    this process may use, shared among torchrun's processes on the machine, at most 8 (each worker
    holds a copy of the dataset and its prefetched batches): decoding JPEGs (imagefolder) or
    evaluating a store's items needs them; a store's training batches are read on a thread."""
    if dataset == "fashion-mnist":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))))


def _workers(args, dataset: str) -> int:
    """args.workers, or default_workers(dataset) when not given; checked."""
    if args.workers is None:
        return default_workers(dataset)
    _at_least(args.workers, "--workers", 0)
    return args.workers


def _settings(args) -> dict:
    """The preset's values, overridden by the flags given."""
    preset = args.preset or ("quick" if args.dataset == "fashion-mnist" else "paper")
    s = dict(PRESETS[preset], preset=preset)
    for key in ("variant", "image_size", "epochs", "batch_size", "lr", "momentum", "wd", "lr_schedule", "dropout",
                "init", "warmup_steps", "augment"):
        v = getattr(args, key)
        if v is not None:
            s[key] = v
    for key in ("epochs", "batch_size", "image_size"):
        if s[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be at least 1, got {s[key]}")
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.subset is not None and args.subset < 1:
        raise UsageError(f"--subset must be at least 1, got {args.subset}")
    if args.log_every < 1:
        raise UsageError(f"--log-every must be at least 1, got {args.log_every}")
    return s


def _datasets(dataset: str, data_dir, image_size: int, subset, ten_crop: bool, augment: bool = True):
    """(train, val, test, class_names) for the chosen dataset."""
    from fastalex import data

    try:
        root = data_dir if data_dir is not None else os.environ.get("FASTALEX_DATA") or None
        if dataset == "imagefolder" and data.store.is_store(root):  # a folder `fastalex prepare` wrote
            return data.store.load_for_training(root, image_size=image_size, subset=subset, ten_crop=ten_crop,
                                                augment=augment)
        return data.load_for_training(dataset, data_dir, image_size=image_size, subset=subset, ten_crop=ten_crop,
                                      augment=augment)
    except (FileNotFoundError, NotADirectoryError, data.DataError) as e:
        raise UsageError(str(e)) from None


def _model_from(settings: dict, num_classes: int, seed: int | None = None):
    from fastalex import AlexNet

    kw = {k: settings[k] for k in MODEL_KEYS if k in settings}
    try:
        return AlexNet(num_classes=num_classes, seed=seed, **kw)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _trainer(args, s, model, out, classes, run_args, devices):
    from fastalex import Trainer
    from fastalex.trainer import TensorBoard

    try:
        callbacks = [TensorBoard(out / "tensorboard")] if args.tensorboard else []
    except ImportError as e:
        raise UsageError(f"--tensorboard: {e}") from None
    return Trainer(model, epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"], momentum=s["momentum"],
                   weight_decay=s["wd"], lr_schedule=s["lr_schedule"], warmup_steps=s["warmup_steps"],
                   precision=args.precision, device=args.device, out_dir=out, seed=args.seed, workers=args.workers,
                   checkpoint_every=args.checkpoint_every, progress=not args.no_progress, class_names=classes,
                   args={k: v for k, v in run_args.items() if isinstance(v, (str, int, float, bool, type(None)))},
                   strategy=args.strategy, devices=devices, deterministic=args.deterministic,
                   log_every=args.log_every, callbacks=callbacks, compile=args.compile or False)


def train(args) -> int:
    from fastalex.distributed import DistributedError, shutdown

    s = _settings(args)
    out = Path(args.out or f"runs/{args.dataset}-{s['variant']}")
    devices = args.devices.split(",") if args.devices else None
    if (args.strategy == "towers") != (devices is not None):
        raise UsageError("--strategy towers needs --devices DEV0,DEV1 (one per tower), and --devices is only for it")
    if devices is not None and len(devices) != 2:
        raise UsageError(f"--devices must name two devices, one per tower, e.g. cuda:0,cuda:1; got {args.devices!r}")
    # A worker that torchrun restarted (--max-restarts) continues from the last checkpoint.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    if (args.resume is None and not restarted and not args.test_only and (out / "checkpoint.pt").exists()
            and not args.overwrite):
        raise UsageError(f"{out} already holds a run (checkpoint.pt): pass --resume to continue it, --out for a "
                         f"new folder, or --overwrite to start afresh there")
    args.workers = _workers(args, args.dataset)
    train_set, val_set, test_set, classes = _datasets(args.dataset, args.data, s["image_size"], args.subset,
                                                      s["ten_crop"], s["augment"])
    model = _model_from(s, len(classes), seed=args.seed)  # the seed decides the initial weights too
    run_args = dict(vars(args), **s, num_classes=len(classes), dataset=args.dataset)
    try:
        trainer = _trainer(args, s, model, out, classes, run_args, devices)
    except DistributedError as e:
        print(f"fastalex: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        shutdown()  # (if the group was formed before the error)
        raise UsageError(str(e)) from None
    try:
        return _run_training(args, s, trainer, out, train_set, val_set, test_set, restarted)
    finally:
        trainer.close()  # every way out leaves the process group in order (ddp, hybrid)


def _run_training(args, s, trainer, out, train_set, val_set, test_set, restarted: bool) -> int:
    """train's part after the Trainer exists: resume, then _fit_and_test; a lost rank said in one line."""
    import fastalex

    try:
        if args.resume is not None:
            trainer.resume(args.resume or None)
        elif restarted and trainer.resume(missing_ok=True) and trainer.dist.is_main:
            print(f"fastalex: restarted by torchrun; continuing from step {trainer.step}", file=sys.stderr)
    except (FileNotFoundError, ValueError) as e:  # (checkpoint.CheckpointError is a ValueError: one line)
        raise UsageError(f"cannot resume: {e}") from None
    backend = fastalex.backend(args.backend) if args.backend else contextlib.nullcontext()
    try:
        with backend:
            return _fit_and_test(args, s, trainer, out, train_set, val_set, test_set)
    except Exception as e:
        from fastalex import distributed as fdist

        if trainer.dist.world_size == 1 or not fdist.lost_peers(e):
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"fastalex: rank {trainer.dist.rank} of {trainer.dist.world_size} lost the other ranks at epoch "
              f"{trainer.epoch + 1}, step {trainer.step} ({time.monotonic() - trainer.last_progress:.1f}s after its "
              f"last completed step; collectives wait at most ${fdist.TIMEOUT_VAR} = {fdist.timeout().total_seconds():g}s)"
              f": {type(e).__name__}: {first}", file=sys.stderr)
        return 1


def _fit_and_test(args, s, trainer, out, train_set, val_set, test_set) -> int:
    """fit (unless --test-only), the final test, final.json; the exit status."""
    from fastalex import TrainingDiverged

    if not args.test_only:
        started = time.perf_counter()
        try:
            trainer.fit(train_set, val_set)
        except TrainingDiverged as e:
            print(f"fastalex: training stopped: {e}", file=sys.stderr)
            return 1
        if trainer.epoch < trainer.epochs:  # stopped by Ctrl-C
            if trainer.dist.is_main:
                print(f"fastalex: stopped at epoch {trainer.epoch + 1}, step {trainer.step}; checkpoint saved in "
                      f"{out}. Continue with: fastalex train --resume --out {out}", file=sys.stderr)
            return 130
        wall = time.perf_counter() - started
    else:
        wall = 0.0
    if test_set is val_set and trainer.last_val is not None:
        test = trainer.last_val  # the last epoch's validation already ran on these images and weights
    else:
        test = trainer.evaluate(test_set, ten_crop=s["ten_crop"])
    if not trainer.dist.is_main:
        return 0
    final = dict(trainer.describe(), test_top1=test["top1"], test_top5=test["top5"], test_loss=test["loss"],
                 test_images=test["images"], wall_seconds=wall, dataset=args.dataset, preset=s["preset"],
                 skipped_images=trainer.skipped_images + test.get("skipped_images", 0))
    (out / "final.json").write_text(json.dumps(final, indent=1))
    print(f"test top-1 accuracy {test['top1']:.4f}, top-5 {test['top5']:.4f} on {test['images']} images; "
          f"{final['epochs']} epochs in {wall:.0f}s; results in {out}/final.json")
    return 0


def evaluate(args) -> int:
    from fastalex import Trainer, checkpoint

    try:
        state = checkpoint.load(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    a = state.get("args") or {}
    if "variant" not in a:
        raise UsageError(f"{args.checkpoint} has no model settings: it was not written by `fastalex train`")
    _, _, test_set, classes = _datasets(a.get("dataset", "fashion-mnist"), args.data or a.get("data"),
                                        a["image_size"], None, args.ten_crop)
    model = _model_from(a, len(classes))
    model.load_state_dict(state["model"])
    trainer = Trainer(model, epochs=1, batch_size=args.batch_size, device=args.device,
                      workers=_workers(args, a.get("dataset", "fashion-mnist")),
                      progress=False, out_dir=Path(args.checkpoint).parent)
    res = trainer.evaluate(test_set, ten_crop=args.ten_crop)
    print(json.dumps(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


def _at_least(value: int, flag: str, minimum: int = 1) -> None:
    if value < minimum:
        raise UsageError(f"{flag} must be at least {minimum}, got {value}")


def _files_exist(checkpoint: str, images) -> None:
    """Every named file is there: checked before any work, so a typo costs nothing."""
    if not Path(checkpoint).is_file():
        raise UsageError(f"no checkpoint at {checkpoint}")
    for image in images:
        if not Path(image).is_file():
            raise UsageError(f"no image file at {image}")


def _load_run(path: str) -> tuple[dict, dict]:
    """(checkpoint, its run settings) of a checkpoint written by `fastalex train`."""
    from fastalex import checkpoint

    try:
        state = checkpoint.load(path)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    a = (state.get("args") or {}) if isinstance(state, dict) else {}
    if "variant" not in a or "image_size" not in a or not isinstance(state.get("model"), dict):
        raise UsageError(f"{path} has no model settings or weights: it was not written by `fastalex train`")
    return state, a


def _num_classes(state: dict, a: dict) -> int:
    n = a.get("num_classes") or len(state.get("class_names") or [])
    if not n:
        last = [v for k, v in state["model"].items() if k.startswith("classifier.") and k.endswith(".weight")]
        n = last[-1].shape[0] if last else 0
    if not n:
        raise UsageError("the checkpoint does not say how many classes its model has")
    return int(n)


def _class_name(names, i: int) -> str:
    return str(names[i]) if names and i < len(names) else str(i)


def _checkpoint_model(state: dict, a: dict, device: str):
    """The checkpoint's model (built from its settings like `fastalex eval`), weights loaded, on `device`."""
    import torch

    try:
        dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    except RuntimeError as e:
        raise UsageError(f"--device: {e}") from None
    model = _model_from(a, _num_classes(state, a))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UsageError(f"the checkpoint's weights do not fit its model settings: {e}") from None
    return model.to(dev).eval()


def _queries(paths, a: dict):
    from fastalex import explore
    from fastalex.data import UnreadableImageError

    try:
        return explore.preprocess_images(paths, a.get("dataset", "fashion-mnist"), a["image_size"])
    except (UnreadableImageError, ValueError) as e:
        raise UsageError(str(e)) from None


def _write(path: str, write) -> None:
    """write(path), with an unwritable path reported as a usage error."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write(path)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e}") from None


def _backend(name):
    import fastalex

    return fastalex.backend(name) if name else contextlib.nullcontext()


def predict(args) -> int:
    """Top classes per image file: rich bars on stdout, and JSON
    [{"image": path, "top": [{"class": name, "index": i, "probability": p}, ...]}, ...] with --json."""
    from rich.bar import Bar
    from rich.console import Console
    from rich.table import Table

    from fastalex import explore

    _at_least(args.top, "--top")
    _at_least(args.batch_size, "--batch-size")
    _files_exist(args.checkpoint, args.images)
    state, a = _load_run(args.checkpoint)
    x = _queries(args.images, a)
    model = _checkpoint_model(state, a, args.device)
    with _backend(args.backend):
        probs = explore.probabilities(model, x, args.batch_size)
    p, idx = probs.topk(min(args.top, probs.shape[1]), dim=1)
    names = state.get("class_names")
    results = [{"image": str(path), "top": [{"class": _class_name(names, int(i)), "index": int(i),
                                             "probability": float(v)} for v, i in zip(pv, iv)]}
               for path, pv, iv in zip(args.images, p, idx)]
    console = Console()
    for r in results:
        # the path on a line of its own, never wrapped (a table title would fold a long path)
        console.print(r["image"], style="bold", soft_wrap=True, markup=False, highlight=False)
        table = Table(show_header=False, box=None)
        for t in r["top"]:
            table.add_row(t["class"], Bar(1.0, 0.0, t["probability"], width=30, color="green"),
                          f"{100 * t['probability']:6.2f}%")
        console.print(table)
    if args.json:
        _write(args.json, lambda p: Path(p).write_text(json.dumps(results, indent=1)))
    return 0


def neighbors(args) -> int:
    """The k training images nearest to each query in the last hidden layer: a picture (--out) and JSON
    [{"query": path, "neighbors": [{"index": i, "distance": d, "label": l, "class": name}, ...]}, ...]
    (index: position in the training split; "path" too for image folders), nearest first."""
    from rich.console import Console

    from fastalex import explore
    from fastalex.data import ImageFolder, load_image

    _at_least(args.k, "-k")
    _at_least(args.batch_size, "--batch-size")
    _at_least(args.tile, "--tile")
    _files_exist(args.checkpoint, args.query)
    state, a = _load_run(args.checkpoint)
    args.workers = _workers(args, a.get("dataset", "fashion-mnist"))
    queries = _queries(args.query, a)
    train_set = _datasets(a.get("dataset", "fashion-mnist"), args.data or a.get("data"), a["image_size"], None,
                          False, augment=False)[0]
    if args.k > len(train_set):
        raise UsageError(f"-k {args.k} is more than the training split's {len(train_set)} images")
    model = _checkpoint_model(state, a, args.device)
    with _backend(args.backend):
        dist, idx = explore.nearest_neighbors(model, train_set, queries, args.k, args.batch_size,
                                              workers=args.workers, progress=not args.no_progress)
    names = state.get("class_names") or getattr(train_set, "classes", None)
    targets = getattr(train_set, "targets", None)
    results = []
    for path, drow, irow in zip(args.query, dist.tolist(), idx.tolist()):
        found = []
        for d, i in zip(drow, irow):
            label = int(targets[i]) if targets is not None else int(train_set[i][1])
            entry = {"index": i, "distance": d, "label": label, "class": _class_name(names, label)}
            if isinstance(train_set, ImageFolder):
                entry["path"] = train_set.samples[i][0]
            found.append(entry)
        results.append({"query": str(path), "neighbors": found})
    grid = explore.neighbor_grid([[load_image(r["query"])] + [explore.display_image(train_set, n["index"])
                                                               for n in r["neighbors"]] for r in results],
                                 tile=args.tile)
    _write(args.out, lambda p: explore.save_png(grid, p))
    if args.json:
        _write(args.json, lambda p: Path(p).write_text(json.dumps(results, indent=1)))
    console = Console()
    for r in results:
        console.print(f"[bold]{r['query']}[/]: " + ", ".join(f"{n['class']} #{n['index']} ({n['distance']:.3g})"
                                                             for n in r["neighbors"]))
    console.print(f"wrote {args.out} ({grid.width}x{grid.height})" + (f" and {args.json}" if args.json else ""))
    return 0


def filters(args) -> int:
    """conv1's kernels as a PNG (explore.filter_grid): the paper net's two towers in separate blocks of rows."""
    from fastalex import explore

    _at_least(args.scale, "--scale")
    _files_exist(args.checkpoint, ())
    state, a = _load_run(args.checkpoint)
    try:
        weight = explore.conv1_weight(state["model"], a["variant"])
    except KeyError as e:
        raise UsageError(f"{args.checkpoint}: {e.args[0]}") from None
    grid = explore.filter_grid(weight, groups=2 if a["variant"] == "paper" else 1, scale=args.scale,
                               normalize=args.normalize)
    _write(args.out, lambda p: explore.save_png(grid, p))
    print(f"wrote {args.out}: {weight.shape[0]} kernels {tuple(weight.shape[1:])}, {grid.shape[1]}x{grid.shape[0]} "
          f"pixels" + (" (tower 1 above, tower 2 below)" if a["variant"] == "paper" else ""))
    return 0


def prepare(args) -> int:
    """The paper's preprocessing done once: SRC (train/, val/) -> the store DST (fastalex.data.store.prepare)."""
    from fastalex.data import DataError, store

    for value, flag, lo in ((args.size, "--size", 1), (args.shard_size, "--shard-size", 1)):
        _at_least(value, flag, lo)
    if args.workers is not None:
        _at_least(args.workers, "--workers", 0)
    try:
        store.prepare(args.src, args.dst, size=args.size, shard_size=args.shard_size, workers=args.workers,
                      overwrite=args.overwrite, progress=not args.no_progress)
    except (DataError, FileNotFoundError, NotADirectoryError) as e:
        raise UsageError(str(e)) from None
    except KeyboardInterrupt:
        print("fastalex: prepare interrupted; the finished shards are kept: rerun the same command to continue",
              file=sys.stderr)
        return 130
    return 0


COMMANDS = {"train": train, "eval": evaluate, "predict": predict, "neighbors": neighbors, "filters": filters,
            "prepare": prepare}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(f"fastalex: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
