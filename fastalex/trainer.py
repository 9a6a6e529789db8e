"""Trainer: the paper's recipe (SGD, momentum 0.9, weight decay 5e-4, lr 0.01 divided by 10 when the
validation error stops improving, at most 3 times, batch 128), with exact resume.

    trainer = fastalex.Trainer(model, epochs=90, out_dir="runs/alexnet")
    trainer.fit(train_data, val_data)          # datasets of (image (3, S, S), label)
    trainer.evaluate(test_data)                # {"top1_error": ..., "top5_error": ..., ...}

Everything a run depends on is in its checkpoint (model, optimizer, schedule, epoch and step, RNG
state), the data order is a function of (seed, epoch) and each image's augmentation of
(seed, epoch, index), dropout's stream of (seed, rank): a run stopped at any moment and resumed
ends with the same weights as one that never stopped, bit for bit on the CPU, where the arithmetic
is deterministic (and on a GPU with deterministic=True, where torch's ops allow it).
"""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as TF
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from fastalex import _faults
from fastalex import checkpoint as ckpt
from fastalex import distributed as fdist
from fastalex._backend import backend_info

__all__ = ["Trainer", "TrainingDiverged", "use_deterministic_algorithms"]

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
SCHEDULES = ("plateau", "cosine", "constant")
STRATEGIES = ("single", "towers", "ddp", "hybrid")


def use_deterministic_algorithms() -> None:
    """Make torch's own ops deterministic, as torchvision's --use-deterministic-algorithms does:
    torch.use_deterministic_algorithms(True) (an op without a deterministic implementation raises,
    naming itself), cuDNN's deterministic mode without benchmarking, and the cuBLAS workspace
    setting that deterministic GEMMs need (if not set already; it must precede CUDA's first use).
    fastalex's Triton kernels need none of it: they use no atomics, and split-K sums its partials in
    a fixed order."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class _Seeded(Dataset):
    """Wraps a dataset so each item's random augmentation depends only on (seed, epoch, index)."""

    def __init__(self, data: Dataset, seed: int):
        self.data, self.seed = data, seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key):
        epoch, index = key
        # Seed the CPU generator for this item and put the caller's state (dropout's) back after.
        # (The default generator directly: torch.manual_seed costs ~25x more per call.)
        gen = torch.default_generator
        state = gen.get_state()
        gen.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
        try:
            return self.data[index]
        finally:
            gen.set_state(state)


class _EpochBatches(Sampler):
    """Batches of (epoch, index) in the epoch's own random order, from batch `start` on.

    With world_size > 1 each step's global batch (batch_size x world_size images) is cut into
    world_size equal parts and this rank gets part `rank`: per-epoch shuffled, disjoint shards, as
    with DistributedSampler, but aligned to global batches (so a step over all ranks sees exactly
    the images one process would see with the combined batch, and a resume starts at the exact
    step). The last, incomplete global batch is dropped then (every rank must take equal steps).
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, epoch, start
        self.rank, self.world_size = rank, world_size

    def steps(self) -> int:
        """Steps in a whole epoch."""
        if self.world_size == 1:
            return math.ceil(self.n / self.batch_size)
        return self.n // (self.batch_size * self.world_size)

    def __len__(self) -> int:
        return max(0, self.steps() - self.start)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        gb = self.batch_size * self.world_size
        for b in range(self.start, self.steps()):
            mine = order[b * gb:(b + 1) * gb][self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            yield [(self.epoch, i) for i in mine]


_STATE_KEYS = ("model", "optimizer", "lr_scheduler", "epoch", "step", "step_in_epoch", "history", "rng")


def _check_training_state(state: dict, path: Path) -> None:
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise ckpt.CheckpointError(f"{path} is not a training checkpoint of fastalex.Trainer (it has no "
                                   f"{', '.join(missing)})")


def _collate(batch):
    """default_collate, dropping items a dataset returned as None (an unreadable image it skipped,
    with a warning naming the file): (images, labels, skipped), images None if none was readable."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return None, None, len(batch)
    images, labels = default_collate(kept)
    return images, labels, len(batch) - len(kept)


def _topk_errors(logits_or_probs: torch.Tensor, labels: torch.Tensor, k: int = 5) -> tuple[int, int]:
    """(number of top-1 misses, number of top-k misses) in a batch."""
    k = min(k, logits_or_probs.shape[1])
    top = logits_or_probs.topk(k, dim=1).indices
    hit = top == labels[:, None]
    return int((~hit[:, 0]).sum()), int((~hit.any(dim=1)).sum())


class Trainer:
    """Trains a classifier (by default with the paper's recipe) and evaluates it.

    precision: "32", "bf16-mixed" or "16-mixed" (autocast; "16-mixed" scales the loss, GPU only).
    lr_schedule: "plateau" (the paper: lr / 10 when validation error stops improving for `patience`
    epochs, at most `max_lr_drops` times), "cosine" (per step, to 0 at the end) or "constant".
    checkpoint_every: also save every this many steps (besides each epoch's end).
    strategy: "single" (one device), "towers" (the paper's model parallelism: the paper net's two
    towers on `devices`, two of them), "ddp" (data parallel, DistributedDataParallel under torchrun:
    NCCL on GPUs, gloo on CPUs) or "hybrid" (Krizhevsky's one weird trick under torchrun: the convs
    data parallel, the FC layers split across ranks; see fastalex.hybrid). Under ddp and hybrid
    `batch_size` is per process (the global batch is batch_size x world size), the lr is taken as
    given, and only rank 0 logs, shows progress and writes files; every rank must call fit,
    evaluate and save together.
    seed: decides the data order, each image's augmentation and (seeded at the start of a fresh fit,
    per rank) dropout; the model's initial weights are the model's own (AlexNet(seed=...)).
    deterministic: torch's deterministic algorithms and cuDNN's deterministic mode (see
    use_deterministic_algorithms); fastalex's Triton kernels are deterministic either way.
    """

    def __init__(self, model: torch.nn.Module, *, epochs: int, batch_size: int = 128, lr: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 5e-4, lr_schedule: str = "plateau",
                 precision: str = "32", device: str = "auto", out_dir: str | Path = "runs/fastalex", seed: int = 0,
                 workers: int = 0, checkpoint_every: int = 0, patience: int = 1, max_lr_drops: int = 3,
                 warmup_steps: int = 0, progress: bool = True, class_names: Sequence[str] | None = None,
                 args: dict | None = None, strategy: str = "single", devices: Sequence | None = None,
                 deterministic: bool = False):
        for name, v, lo in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("workers", workers, 0),
                            ("checkpoint_every", checkpoint_every, 0), ("patience", patience, 1),
                            ("max_lr_drops", max_lr_drops, 0), ("warmup_steps", warmup_steps, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if not lr > 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"need lr > 0, 0 <= momentum < 1, weight_decay >= 0; got {lr}, {momentum}, {weight_decay}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {lr_schedule!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.strategy, self.dist = strategy, fdist.Env()
        if strategy == "towers":
            if devices is None or len(devices) != 2:
                raise ValueError(f"strategy 'towers' needs devices=(device0, device1), one per tower; got {devices!r}")
            if getattr(model, "devices", None) is None:
                if not hasattr(model, "to_towers"):
                    raise ValueError("strategy 'towers' needs a fastalex.AlexNet(variant='paper')")
                model = model.to_towers(devices)
            device = str(model.devices[0])
        elif devices is not None:
            raise ValueError(f"devices is for strategy 'towers' (ddp and hybrid take one device per process from "
                             f"torchrun's LOCAL_RANK); got devices={devices!r} with strategy {strategy!r}")
        if strategy in ("ddp", "hybrid"):
            if getattr(model, "devices", None) is not None:
                raise ValueError(f"strategy {strategy!r} needs a single-device model, not the towers model")
            local = fdist.env().local_rank
            if device == "auto":
                device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        if precision == "16-mixed" and self.device.type != "cuda":
            raise ValueError("precision '16-mixed' needs a CUDA device (use '32' or 'bf16-mixed' on the CPU)")
        self.arch = {k: getattr(model, k, None) for k in ("variant", "image_size")}
        if strategy in ("ddp", "hybrid"):
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            self.dist = fdist.init(self.device)
            model = model.to(self.device)
            fdist.broadcast_module(model)  # every rank starts from rank 0's weights
            if strategy == "ddp":
                from torch.nn.parallel import DistributedDataParallel

                model = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)
            else:
                from fastalex.hybrid import HybridAlexNet

                model = HybridAlexNet(model)
        self.model = model if getattr(model, "devices", None) else model.to(self.device)
        self.epochs, self.batch_size, self.lr, self.seed = epochs, batch_size, lr, seed
        self.lr_schedule, self.precision, self.workers = lr_schedule, precision, workers
        self.checkpoint_every, self.patience, self.max_lr_drops = checkpoint_every, patience, max_lr_drops
        self.warmup_steps, self.progress = warmup_steps, progress
        self.class_names = list(class_names) if class_names is not None else None
        self.args = dict(args or {})
        self.out_dir = Path(out_dir)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum,
                                         weight_decay=weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "16-mixed")
        # Progress of the run: everything here goes into the checkpoint.
        self.epoch, self.step, self.step_in_epoch = 0, 0, 0
        self.lr_drops, self.bad_epochs, self.best_error = 0, 0, float("inf")
        self.history: list[dict] = []
        self.last_val: dict | None = None  # the latest validation result of this process (not checkpointed)
        self.train_seconds, self.train_images = 0.0, 0
        self.epoch_loss_sum, self.epoch_seen = 0.0, 0  # the current epoch's running training loss
        self.skipped_images = 0  # unreadable training images skipped so far (by all ranks)
        self._stop = False
        self.last_progress = time.monotonic()  # when the last step (or the start) finished: for error messages
        self._item_shape: tuple | None = None  # one training image's shape, for stand-ins of unreadable ones
        self._fresh = True  # no checkpoint loaded: fit seeds dropout's stream from (seed, rank)
        if deterministic:
            use_deterministic_algorithms()

    @property
    def module(self) -> torch.nn.Module:
        """The model itself (unwrapped from DistributedDataParallel)."""
        return getattr(self.model, "module", self.model) if self.strategy == "ddp" else self.model

    def close(self) -> None:
        """Leave the process group (ddp, hybrid), the DDP wrapper released first; nothing for one process.
        Call it on every way out (the fastalex command does, in a finally): a process that exits with
        the group alive can abort at exit while its communication threads still run."""
        if self.strategy == "ddp" and self.model is not self.module:
            self.model = self.module
        if self.strategy in ("ddp", "hybrid"):
            gc.collect()  # the DDP reducer and autograd's hooks hold the group: free them before it goes
            fdist.shutdown()

    # -- schedule ------------------------------------------------------------------------------

    def current_lr(self, total_steps: int) -> float:
        lr = self.lr * 0.1 ** self.lr_drops
        if self.lr_schedule == "cosine":
            lr = self.lr * 0.5 * (1 + math.cos(math.pi * min(self.step, total_steps) / max(total_steps, 1)))
        if self.warmup_steps and self.step < self.warmup_steps:
            lr *= (self.step + 1) / self.warmup_steps
        return lr

    def _after_epoch(self, val_error: float | None) -> None:
        if val_error is None:
            return
        if val_error < self.best_error - 1e-6:
            self.best_error, self.bad_epochs = val_error, 0
            return
        self.bad_epochs += 1
        if self.lr_schedule == "plateau" and self.bad_epochs >= self.patience and self.lr_drops < self.max_lr_drops:
            self.lr_drops += 1
            self.bad_epochs = 0

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything to resume from (the same on every rank; collective under ddp and hybrid)."""
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        if self.strategy == "hybrid":
            model_state, opt_state = self.model.full_state_dict(), self.model.gather_optimizer_state(self.optimizer)
        else:
            model_state, opt_state = self.module.state_dict(), self.optimizer.state_dict()
        return {
            "model": model_state, "optimizer": opt_state, "world_size": self.dist.world_size,
            "rng_per_rank": fdist.all_gather_object(rng),
            "lr_scheduler": {"schedule": self.lr_schedule, "lr_drops": self.lr_drops, "bad_epochs": self.bad_epochs,
                             "best_error": self.best_error},
            "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step": self.step,
            "step_in_epoch": self.step_in_epoch, "history": self.history, "rng": rng,
            "train_seconds": self.train_seconds, "train_images": self.train_images,
            "epoch_loss_sum": self.epoch_loss_sum, "epoch_seen": self.epoch_seen,
            "skipped_images": self.skipped_images, "class_names": self.class_names, "args": self.args,
        }

    def load_state_dict(self, state: dict) -> None:
        saved_world = state.get("world_size", 1)
        if saved_world != self.dist.world_size and state["step_in_epoch"] != 0:
            raise ValueError(
                f"this checkpoint was written mid-epoch by {saved_world} process(es); resuming it with "
                f"{self.dist.world_size} would change every later batch. Resume with {saved_world} process(es), or "
                f"from a checkpoint written at the end of an epoch")
        if self.strategy == "hybrid":
            self.model.load_full_state_dict(state["model"])
            self.model.load_optimizer_state(self.optimizer, state["optimizer"])
        else:
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        sched = state["lr_scheduler"]
        self.lr_drops, self.bad_epochs, self.best_error = sched["lr_drops"], sched["bad_epochs"], sched["best_error"]
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
        self.history = list(state["history"])
        self.train_seconds, self.train_images = state["train_seconds"], state["train_images"]
        self.epoch_loss_sum, self.epoch_seen = state["epoch_loss_sum"], state["epoch_seen"]
        self.skipped_images = state.get("skipped_images", 0)
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        if len(per_rank) == self.dist.world_size:  # each rank continues its own dropout stream
            rng = per_rank[self.dist.rank]
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        else:
            self._seed_rank()
        self._fresh = False
        if state.get("class_names") and not self.class_names:
            self.class_names = list(state["class_names"])

    def save(self, name: str = "checkpoint.pt") -> Path:
        """Write out_dir/name atomically; for checkpoint.pt the file it replaces is kept as
        checkpoint.prev.pt (rank 0 writes; every rank must call it under ddp and hybrid)."""
        state, path = self.state_dict(), self.out_dir / name
        if self.dist.is_main:
            ckpt.save_atomic(state, path, keep_previous=name == "checkpoint.pt")
        fdist.barrier()
        return path

    def resume(self, path: str | Path | None = None, missing_ok: bool = False) -> bool:
        """Continue from a checkpoint (default: out_dir/checkpoint.pt), or from the one before it
        (NAME.prev.pt) if it cannot be read, saying so on stderr in one line. With missing_ok, no
        checkpoint at all means a fresh start (what a worker restarted by torchrun wants); returns
        whether it resumed. FileNotFoundError / checkpoint.CheckpointError (one line) otherwise."""
        path = Path(path or self.out_dir / "checkpoint.pt")
        try:
            state, used, problems = ckpt.load_newest(path, check=_check_training_state)
        except FileNotFoundError:
            if missing_ok:
                return False
            raise
        if problems and self.dist.is_main:
            print(f"fastalex: {problems[0]}; continuing from {used} (step {state['step']})", file=sys.stderr)
        self.load_state_dict(state)
        return True

    def _seed_rank(self) -> None:
        # Dropout's stream (torch's global RNG, every device) from (seed, rank): each rank its own, the same
        # for the same seed; then saved in every checkpoint and restored on resume.
        torch.manual_seed((self.seed * 1_000_003 + self.dist.rank) * 7919 + 17)

    # -- training ------------------------------------------------------------------------------

    def _autocast(self):
        dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _loader(self, data: Dataset, batches: Sampler) -> DataLoader:
        # Its own generator: a DataLoader iterator otherwise draws a seed from the global RNG, which
        # would shift dropout's random stream by where a resumed run re-creates the iterator.
        return DataLoader(data, batch_sampler=batches, num_workers=self.workers, generator=torch.Generator(),
                          collate_fn=_collate, pin_memory=self.device.type == "cuda", persistent_workers=False)

    def _install_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):  # finish the step in flight, save, stop
            self._stop = True

        return signal.signal(signal.SIGINT, handler)

    def fit(self, train_data: Dataset, val_data: Dataset | None = None) -> list[dict]:
        """Train for the remaining epochs; returns the per-epoch history (also in metrics.jsonl).

        Ctrl-C finishes the current step, saves checkpoint.pt and returns. A NaN/inf loss raises
        TrainingDiverged, keeping the last good checkpoint.
        """
        if len(train_data) == 0:
            raise ValueError("train_data is empty")
        world = self.dist.world_size
        if world > 1 and len(train_data) < self.batch_size * world:
            raise ValueError(f"train_data has {len(train_data)} images, fewer than one global batch "
                             f"({self.batch_size} x {world} processes)")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        seeded = _Seeded(train_data, self.seed)
        steps_per_epoch = _EpochBatches(len(train_data), self.batch_size, self.seed, 0, 0, 0, world).steps()
        total_steps = steps_per_epoch * self.epochs
        if self._fresh:
            self._seed_rank()
            self._fresh = False
        old_handler = self._install_sigint()
        self._stop = False
        try:
            with _Progress(self.progress and self.dist.is_main, total_steps, self.step) as bar:
                while self.epoch < self.epochs and not self._stop:
                    self._train_epoch(seeded, steps_per_epoch, total_steps, bar)
                    if self.dist.world_size > 1:  # a stop asked for after the epoch's last step: all agree
                        self._stop = fdist.all_reduce_sum([float(self._stop)], self.device)[0] > 0
                    if self._stop:
                        break
                    self._end_epoch(val_data, bar)
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
        if self._stop:
            self.save()
        return self.history

    def _train_epoch(self, data: Dataset, steps_per_epoch: int, total_steps: int, bar) -> None:
        self.model.train()
        batches = _EpochBatches(len(data), self.batch_size, self.seed, self.epoch, self.step_in_epoch,
                                self.dist.rank, self.dist.world_size)
        out_device = self.model.devices[0] if getattr(self.model, "devices", None) else self.device
        if self.step_in_epoch == 0:
            self.epoch_loss_sum, self.epoch_seen = 0.0, 0
        t0, seen = time.perf_counter(), 0
        world = self.dist.world_size
        for images, labels, skipped in self._loader(data, batches):
            kept = 0 if images is None else images.shape[0]
            if world == 1 and images is None:  # every image of this batch was unreadable: the step is kept, empty
                self.skipped_images += skipped
                self.step += 1
                self.step_in_epoch += 1
                continue
            if world > 1 and skipped:
                # Every rank must run the same collectives on equal-size batches (hybrid gathers rows; DDP
                # all-reduces after every backward): unreadable images become zero rows that the loss ignores.
                images, labels = self._pad_batch(images, labels, kept + skipped)
            self._item_shape = tuple(images.shape[1:])
            lr = self.current_lr(total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(out_device, non_blocking=True)
            with self._autocast():
                # A sum (padded rows, label -100, add nothing), divided below by the number of readable
                # images in the global batch: every rank's gradient is then that of the global mean.
                loss_sum = TF.cross_entropy(self.model(images), labels, reduction="sum")
            local = loss_sum.detach().float().reshape(())
            counts = torch.tensor([float(kept), float(self._stop), float(skipped)], device=local.device)  # one copy
            stats = torch.cat([local.reshape(1), counts])
            if world > 1:
                # One small all-reduce: the loss and image count (so every rank sees, and stops at, the same
                # mean loss), whether any rank was asked to stop (so all stop after the same step) and the
                # unreadable images skipped (counted over all ranks).
                torch.distributed.all_reduce(stats)
            global_sum, total, stop, skipped = stats.tolist()
            stop = stop > 0
            self.skipped_images += int(skipped)
            if total == 0:  # no rank read any image of this global batch: all skip the step alike
                self.step += 1
                self.step_in_epoch += 1
                if stop:
                    self._stop = True
                    break
                continue
            shown = global_sum / total
            if not math.isfinite(shown):
                raise TrainingDiverged(
                    f"the loss became {shown} at epoch {self.epoch + 1}, step {self.step + 1} (lr {lr:g}); "
                    f"the last good checkpoint is kept in {self.out_dir} — try a lower --lr")
            loss = loss_sum * (world / total)  # DDP and hybrid average over ranks: x world
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.strategy == "hybrid":
                self.model.finish_gradients()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step += 1
            self.step_in_epoch += 1
            seen += int(total)
            self.epoch_seen += int(total)  # over all ranks (the same on each: a mid-epoch checkpoint holds them)
            self.epoch_loss_sum += global_sum
            elapsed = time.perf_counter() - t0
            bar.update(self.epoch, self.epochs, self.step, shown, lr, seen / max(elapsed, 1e-9))
            if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                self._account(elapsed, seen)
                t0, seen = time.perf_counter(), 0
                self.save()
            self.last_progress = time.monotonic()
            _faults.point("step")
            if stop:
                self._stop = True
                break
        self._account(time.perf_counter() - t0, seen)

    def _pad_batch(self, images: torch.Tensor | None, labels: torch.Tensor | None, n: int):
        """Pad a batch with unreadable images dropped back to n rows: zero images labelled -100
        (cross_entropy's ignore_index), so every rank's batch has the same size."""
        shape = tuple(images.shape[1:]) if images is not None else self._item_shape
        if shape is None and self.arch["image_size"]:
            shape = (3, *self.arch["image_size"])
        if shape is None:
            raise RuntimeError("the first training batch of this rank was all unreadable images and the model does "
                               "not say its input size (image_size): cannot make a stand-in batch of equal size")
        kept = 0 if images is None else images.shape[0]
        pad_x = torch.zeros((n - kept, *shape), dtype=images.dtype if images is not None else torch.float32)
        pad_y = torch.full((n - kept,), -100, dtype=labels.dtype if labels is not None else torch.int64)
        if images is None:
            return pad_x, pad_y
        return torch.cat([images, pad_x]), torch.cat([labels, pad_y])

    def _account(self, seconds: float, images: int) -> None:
        self.train_seconds += seconds
        self.train_images += images  # over all ranks

    def _end_epoch(self, val_data: Dataset | None, bar) -> None:
        t0 = time.perf_counter()
        metrics = {"epoch": self.epoch + 1, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
                   "train_loss": self.epoch_loss_sum / max(1, self.epoch_seen)}
        if val_data is not None:
            v = self.last_val = self.evaluate(val_data, _fault="validation")
            metrics.update(val_top1_error=v["top1_error"], val_top5_error=v["top5_error"], val_loss=v["loss"])
        metrics["seconds_train_total"] = round(self.train_seconds, 3)
        metrics["seconds_eval"] = round(time.perf_counter() - t0, 3)
        improved = val_data is not None and metrics["val_top1_error"] < self.best_error - 1e-6
        self._after_epoch(metrics.get("val_top1_error"))
        self.history.append(metrics)
        self.epoch += 1
        self.step_in_epoch = 0
        if self.dist.is_main:
            self._write_metrics()
        path = self.save()
        if improved:  # the state just saved: best.pt is a second name for it, not a second copy
            if self.dist.is_main:
                ckpt.link_atomic(path, self.out_dir / "best.pt")
            fdist.barrier()
        _faults.point("epoch-saved")
        bar.epoch_done(metrics)

    def _write_metrics(self) -> None:
        text = "".join(json.dumps(m) + "\n" for m in self.history)
        tmp = self.out_dir / ".metrics.jsonl.tmp"
        tmp.write_text(text)
        tmp.replace(self.out_dir / "metrics.jsonl")

    # -- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, data: Dataset, ten_crop: bool = False, batch_size: int | None = None,
                 _fault: str = "test") -> dict:
        """Top-1 / top-5 error (fractions) and mean loss on `data`.

        ten_crop: items are (10, 3, S, S) crops of one image (see fastalex.data); the softmax is
        averaged over the crops, as in the paper.
        """
        if len(data) == 0:
            raise ValueError("evaluation data is empty")
        model = self._eval_model()
        was_training = model.training
        model.eval()
        out_device = model.devices[0] if getattr(model, "devices", None) else self.device
        if self.dist.world_size > 1:  # each rank its share of the images; the counts are summed below
            data = torch.utils.data.Subset(data, range(self.dist.rank, len(data), self.dist.world_size))
        loader = DataLoader(data, batch_size=batch_size or self.batch_size, num_workers=self.workers,
                            generator=torch.Generator(), collate_fn=_collate)
        n = miss1 = miss5 = skipped_total = 0
        loss_sum = 0.0
        try:
            for images, labels, skipped in loader:
                skipped_total += skipped
                if images is None:
                    continue
                labels = labels.to(out_device)
                probs = self._probs(model, images, ten_crop)
                loss_sum += float(TF.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum"))
                m1, m5 = _topk_errors(probs, labels)
                miss1, miss5, n = miss1 + m1, miss5 + m5, n + labels.shape[0]
                if n == labels.shape[0]:
                    _faults.point(_fault)
        finally:
            model.train(was_training)
        n, miss1, miss5, loss_sum, skipped_total = (
            int(v) if i != 3 else v for i, v in enumerate(fdist.all_reduce_sum([n, miss1, miss5, loss_sum,
                                                                              skipped_total], self.device)))
        if n == 0:
            raise ValueError(f"no readable image in the evaluation data ({skipped_total} skipped)")
        return {"top1_error": miss1 / n, "top5_error": miss5 / n, "top1": 1 - miss1 / n, "top5": 1 - miss5 / n,
                "loss": loss_sum / n, "images": n, "skipped_images": skipped_total}

    def _eval_model(self) -> torch.nn.Module:
        # No collectives in evaluation: ddp's bare module; hybrid's full net (gathered, so collective).
        return self.model.full_model() if self.strategy == "hybrid" else self.module

    def _probs(self, model: torch.nn.Module, images: torch.Tensor, ten_crop: bool = False) -> torch.Tensor:
        images = images.to(self.device)
        if ten_crop:
            if images.dim() != 5:
                raise ValueError(f"ten_crop needs items of shape (crops, 3, S, S), got a batch of {tuple(images.shape)}")
            b, c = images.shape[:2]
            with self._autocast():
                logits = model(images.flatten(0, 1))
            return logits.float().softmax(dim=1).view(b, c, -1).mean(dim=1)
        with self._autocast():
            logits = model(images)
        return logits.float().softmax(dim=1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, num_classes) for images (N, 3, S, S) or one image (3, S, S).
        (Under hybrid every rank must call it: the FC slices are gathered first.)"""
        if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4):
            raise ValueError("images must be a tensor of shape (N, 3, S, S) or (3, S, S)")
        single = images.dim() == 3
        model = self._eval_model()
        was_training = model.training
        model.eval()
        try:
            probs = self._probs(model, images.unsqueeze(0) if single else images)
        finally:
            model.train(was_training)
        return probs[0] if single else probs

    def describe(self) -> dict:
        """What ran, for final.json."""
        info = backend_info(self.device)
        return {"device": str(self.device), "backend": info.backend, "variant": self.arch["variant"],
                "image_size": list(self.arch["image_size"] or ()) or None, "precision": self.precision,
                "strategy": self.strategy, "world_size": self.dist.world_size,
                "devices": [str(d) for d in self.module.devices] if getattr(self.module, "devices", None) else None,
                "epochs": self.epoch, "steps": self.step, "skipped_train_images": self.skipped_images,
                "images_per_second": self.train_images / self.train_seconds if self.train_seconds else None,
                "train_seconds": self.train_seconds}


class _Progress:
    """Rich progress bar (epoch, step, loss, lr, images/s, ETA) and per-epoch summaries; silent if off."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.enabled, self.total, self.done = enabled, total, done

    def __enter__(self):
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2g}  "
                                           "{task.fields[ips]:.0f} img/s"), TimeElapsedColumn(), TimeRemainingColumn())
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=self.total, completed=self.done, epoch="-", loss=float("nan"),
                                          lr=0.0, ips=0.0)
        return self

    def update(self, epoch, epochs, step, loss, lr, ips):
        if self.enabled:
            self.bar.update(self.task, completed=step, epoch=f"{epoch + 1}/{epochs}", loss=loss, lr=lr, ips=ips)

    def epoch_done(self, m: dict):
        if self.enabled:
            val = (f"  val top-1 err {m['val_top1_error']:.4f}  top-5 err {m['val_top5_error']:.4f}"
                   if "val_top1_error" in m else "")
            self.bar.console.print(f"epoch {m['epoch']}: train loss {m['train_loss']:.4f}{val}  "
                                   f"({m['seconds_train_total']:.0f}s training so far)")

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
        return False
