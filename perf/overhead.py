"""Images per second of `fastalex train`'s Trainer against a bare training loop over the same net.

    python -m perf.overhead                                  # the quick preset: 5 + 60 steps, interleaved
    python -m perf.overhead --data-path per-item --json per-item.json   # the Trainer's per-image path
    python -m perf.overhead --only trainer                   # one side alone (to time whole commands)

Both sides train the quick preset's net (fastalex.cli.PRESETS["quick"]: variant, image size, init,
dropout; from the same --seed) with SGD at the preset's lr schedule, momentum and weight decay, on
the same batches: the Trainer's first warmup + steps batches of its epoch-0 order of the
Fashion-MNIST training split, loaded as `fastalex train` loads it (fastalex.data.load_for_training
with the preset's augmentation; --subset keeps the first N images). They train alike: the last
losses are compared ("same_training"; equal where the arithmetic is deterministic, as on a CPU).
- bare: `lr = ...; opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()` over
  batches that were all made (read, normalised, resized) before the clock starts;
- trainer: `fastalex.Trainer(...).fit(train)` as the command runs it (progress bar unless
  --no-progress, a run folder in a temporary directory, per-step stats), max_steps = warmup +
  steps; its batches are made while it runs, as in a real run. Its time per step runs from the end
  of one step to the end of the next (read by a Callback, which costs it one small object a step):
  the wait for the batch, the step, the stats and the progress bar.
The sides are interleaved so that both see the same load on a shared machine: after each of the
Trainer's timed steps the Callback runs one bare step (its time is not the Trainer's); --warmup
steps of each side first, untimed. ratio = the Trainer's seconds / the bare loop's (= bare images/s
over the Trainer's; 1.0: no overhead); step_ratios: the same per pair of steps (median, min, max).
--data-path batched (default) lets the Trainer read the dataset a batch at a time
(FashionMNIST.get_batch); per-item hides get_batch, so it reads one image at a time through a
DataLoader (the path before get_batch existed).
The JSON: {"mode" ("interleaved", "bare" or "trainer": --only), "settings" (the preset's), "data_path",
"steps", "warmup", "batch_size", "subset", "bare" and "trainer": {"images", "seconds",
"images_per_second"} (null for the side --only leaves out), "ratio", "step_ratios": {"median", "min",
"max", "n"}, "last_loss": {"bare", "trainer"}, "same_training", "environment" (with "backend": the
ops that ran, torch's or fastalex's Triton kernels)}; null where a side did not run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastalex import optim
from fastalex._seeds import order_seed
from perf._args import non_negative_int, positive_int

SIDES = ("bare", "trainer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m perf.overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="the Fashion-MNIST folder (default: as `fastalex train` finds it)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--steps", type=positive_int, default=60, help="timed steps of each side (default 60)")
    p.add_argument("--warmup", type=positive_int, default=5, help="untimed steps first, at least 1 (default 5)")
    p.add_argument("-b", "--batch-size", type=positive_int, default=None, help="default: the preset's (128)")
    p.add_argument("--image-size", type=positive_int, default=None, help="default: the preset's (67)")
    p.add_argument("--subset", type=positive_int, default=None, help="train on the first N images")
    p.add_argument("--data-path", choices=("batched", "per-item"), default="batched",
                   help="how the Trainer reads the dataset (default batched: FashionMNIST.get_batch)")
    p.add_argument("--only", choices=SIDES, default=None, help="run one side only, not interleaved")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default=None,
                   help="fastalex.backend for both sides (default: as the command, auto)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--no-progress", action="store_true", help="the Trainer without its progress bar")
    args = p.parse_args(argv)
    from fastalex.cli import PRESETS

    s = dict(PRESETS["quick"])
    for key in ("batch_size", "image_size"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    args.settings = s
    return args


def load_data(args):
    """(training split as `fastalex train` loads it, number of classes)."""
    from fastalex.data import load_for_training

    s = args.settings
    train, _, _, classes = load_for_training("fashion-mnist", args.data, image_size=s["image_size"],
                                             subset=args.subset, augment=s["augment"])
    need = (args.warmup + args.steps) * s["batch_size"]
    if need > len(train):  # both sides take full batches from one epoch
        raise SystemExit(f"perf.overhead: {args.warmup} + {args.steps} steps of {s['batch_size']} need {need} "
                         f"training images, the data has {len(train)}: use fewer --steps or a larger --subset")
    return train, len(classes)


def build_model(args, num_classes: int):
    from fastalex import AlexNet
    from fastalex.cli import MODEL_KEYS

    return AlexNet(num_classes=num_classes, seed=args.seed,
                   **{k: args.settings[k] for k in MODEL_KEYS if k in args.settings})


def lr_at(s: dict, step: int, total_steps: int) -> float:
    """The preset's lr at `step` (0-based) of `total_steps`, as Trainer.current_lr computes it."""
    lr = s["lr"]
    if s["lr_schedule"] == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    elif s["lr_schedule"] != "plateau":
        raise ValueError(f"perf.overhead: lr_schedule {s['lr_schedule']!r} is not known here")
    if s["warmup_steps"] and step < s["warmup_steps"]:
        lr *= (step + 1) / s["warmup_steps"]
    return lr


class _PerItem(torch.utils.data.Dataset):
    """The dataset without get_batch: the Trainer then reads it one image at a time (DataLoader)."""

    def __init__(self, data):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


class BareLoop:
    """The bare loop: the model, SGD and all warmup + steps batches (images float (B, 3, S, S),
    labels int64 (B,)) made up front; step() trains on the next batch and returns its seconds."""

    def __init__(self, args, train, num_classes: int):
        s, b, self.n = args.settings, args.settings["batch_size"], args.warmup + args.steps
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(order_seed(args.seed, 0)))
        self.batches = [train.batch(order[k * b:(k + 1) * b]) for k in range(self.n)]
        self.model = build_model(args, num_classes).train()
        self.opt = optim.sgd(self.model.parameters(), lr=s["lr"], momentum=s["momentum"], weight_decay=s["wd"])
        self.settings, self.k, self.loss = s, 0, None

    def step(self) -> float:
        t0 = time.perf_counter()
        x, y = self.batches[self.k]
        self.opt.param_groups[0]["lr"] = lr_at(self.settings, self.k, self.n)
        self.opt.zero_grad(set_to_none=True)
        self.loss = F.cross_entropy(self.model(x), y)
        self.loss.backward()
        self.opt.step()
        self.k += 1
        return time.perf_counter() - t0


def _clock_callback(warmup: int, bare: BareLoop | None):
    """A Trainer Callback timing each step after the first `warmup` (from the end of the previous
    one); after each timed step it runs one step of `bare` if given, outside the Trainer's time."""
    from fastalex.trainer import Callback

    class Clock(Callback):
        def __init__(self):
            self.trainer_seconds, self.bare_seconds, self.mark = [], [], None

        def on_step(self, trainer, out):
            now = time.perf_counter()
            if out.step > warmup:
                self.trainer_seconds.append(now - self.mark)
                if bare is not None:
                    self.bare_seconds.append(bare.step())
            self.loss_sum, self.kept = out.loss_sum, out.kept
            self.mark = time.perf_counter()

    return Clock()


def run_trainer(args, train, num_classes: int, clock) -> None:
    """Trainer.fit as `fastalex train` runs it (max_steps = warmup + steps), `clock` its callback."""
    from fastalex import Trainer

    s = args.settings
    data = _PerItem(train) if args.data_path == "per-item" else train
    with tempfile.TemporaryDirectory(prefix="perf-overhead-") as out:
        trainer = Trainer(build_model(args, num_classes), epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"],
                          momentum=s["momentum"], weight_decay=s["wd"], lr_schedule=s["lr_schedule"],
                          warmup_steps=s["warmup_steps"], device="auto", out_dir=out, seed=args.seed,
                          progress=not args.no_progress, callbacks=[clock], max_steps=args.warmup + args.steps)
        try:
            trainer.fit(data)
        finally:
            trainer.close()


def _rate(images: int, seconds: float) -> dict:
    return {"images": images, "seconds": round(seconds, 4), "images_per_second": round(images / seconds, 2)}


def environment() -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "cpu_threads": torch.get_num_threads(), "device": "cuda" if torch.cuda.is_available() else "cpu",
            "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
            or platform.machine(), "date": dt.date.today().isoformat()}


def run(args) -> dict:
    import fastalex
    from fastalex._backend import backend_info

    train, num_classes = load_data(args)
    b = args.settings["batch_size"]
    bare_s, trainer_s, losses = [], [], {"bare": None, "trainer": None}
    with fastalex.backend(args.backend) if args.backend else contextlib.nullcontext():
        bare = BareLoop(args, train, num_classes) if args.only != "trainer" else None
        if bare is not None:
            for _ in range(args.warmup):
                bare.step()
        if args.only == "bare":
            bare_s = [bare.step() for _ in range(args.steps)]
        else:
            clock = _clock_callback(args.warmup, None if args.only else bare)
            run_trainer(args, train, num_classes, clock)
            trainer_s, bare_s = clock.trainer_seconds, clock.bare_seconds
            losses["trainer"] = clock.loss_sum.item() / clock.kept
        if bare is not None:
            losses["bare"] = bare.loss.item()
        backend = backend_info().backend
    out = {"mode": args.only or "interleaved", "settings": args.settings, "data_path": args.data_path,
           "steps": args.steps, "warmup": args.warmup, "batch_size": b, "subset": args.subset,
           "bare": _rate(b * len(bare_s), sum(bare_s)) if bare_s else None,
           "trainer": _rate(b * len(trainer_s), sum(trainer_s)) if trainer_s else None,
           "ratio": None, "step_ratios": None, "last_loss": losses, "same_training": None}
    if bare_s and trainer_s:
        pairs = [t / a for t, a in zip(trainer_s, bare_s)]
        out["ratio"] = round(sum(trainer_s) / sum(bare_s), 4)
        out["step_ratios"] = {"median": round(statistics.median(pairs), 4), "min": round(min(pairs), 4),
                              "max": round(max(pairs), 4), "n": len(pairs)}
        out["same_training"] = losses["bare"] == losses["trainer"]
    out["environment"] = dict(environment(), backend=backend)
    return out


def print_summary(res: dict) -> None:
    for side in SIDES:
        if res[side] is not None:
            r = res[side]
            print(f"{side:8s} {r['images_per_second']:8.1f} images/s ({r['seconds']:.2f} s for {r['images']} images; "
                  f"last loss {res['last_loss'][side]:.6f})")
    if res["ratio"] is not None:
        q = res["step_ratios"]
        print(f"trainer seconds / bare seconds: {res['ratio']:.3f} (per step pair: median {q['median']:.3f}, "
              f"{q['min']:.3f}..{q['max']:.3f}, {q['n']} pairs); same training: {res['same_training']}; "
              f"Trainer data path: {res['data_path']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    res = run(args)
    print_summary(res)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
