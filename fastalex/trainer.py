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

import json
import math
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import NamedTuple

import torch
import torch.nn.functional as TF
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from fastalex import _faults
from fastalex import checkpoint as ckpt
from fastalex import distributed as fdist
from fastalex import optim as foptim
from fastalex import strategy as fstrategy
from fastalex._backend import backend_info
from fastalex._seeds import item_seed, order_seed, rank_seed

__all__ = ["Trainer", "TrainingDiverged", "Callback", "StepOutput", "RunState", "TensorBoard",
           "use_deterministic_algorithms"]

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
_AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
SCHEDULES = ("plateau", "cosine", "constant")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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
    """The loss became NaN or infinite (at `.step`); the last good checkpoint is kept."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


@dataclass
class RunState:
    """A run's progress: saved in every checkpoint (top-level keys) and restored whole."""

    epoch: int = 0  # epochs finished
    step: int = 0  # steps taken (a step whose images were all unreadable counts, with no update)
    step_in_epoch: int = 0
    history: list = field(default_factory=list)  # a row per epoch (metrics.jsonl's "epoch" rows)
    log: list = field(default_factory=list)  # a row per log_every steps ("step" rows)
    lr_drops: int = 0  # the plateau schedule: lr / 10 this many times so far
    bad_epochs: int = 0
    best_error: float = math.inf
    train_seconds: float = 0.0
    train_images: int = 0  # over all ranks
    epoch_loss_sum: float = 0.0  # the current epoch's summed training loss, over all ranks
    epoch_seen: int = 0  # and its readable images
    skipped_images: int = 0  # unreadable training images skipped so far, over all ranks

    @classmethod
    def from_checkpoint(cls, state: dict) -> "RunState":
        sched = state.get("lr_scheduler", {})  # (checkpoints before 2026-12-03 kept these three only there)
        return cls(**{f.name: state.get(f.name, sched.get(f.name, f.default if f.default is not MISSING else []))
                      for f in fields(cls)})


class StepOutput(NamedTuple):
    """What Callback.on_step sees after each optimizer step: device tensors, nothing read back."""

    step: int  # steps taken, this one included
    epoch: int  # the epoch it belongs to (0-based)
    logits: torch.Tensor  # (B, classes), detached; rows past `kept` are unreadable images' stand-ins
    labels: torch.Tensor  # (B,), -100 for the stand-ins
    kept: int  # readable images of this rank's batch
    loss_sum: torch.Tensor  # () this rank's summed loss
    lr: float


class Callback:
    """Hooks into Trainer.fit (on every rank); override what you need. on_step must not read tensors
    back (a host sync per step): keep them on the device, read them in on_log or after fit."""

    def on_step(self, trainer: "Trainer", out: StepOutput) -> None:
        """After each optimizer step."""

    def on_log(self, trainer: "Trainer", row: dict) -> None:
        """Every log_every steps: the "step" row written to metrics.jsonl."""

    def on_epoch_end(self, trainer: "Trainer", row: dict) -> None:
        """After each epoch's validation and checkpoint: the "epoch" row."""


class TensorBoard(Callback):
    """TensorBoard event files in `log_dir` (rank 0): the step rows' numbers as train/*, the epoch rows'
    as epoch/*, each at its step. Needs the tensorboard package."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("TensorBoard logging needs the tensorboard package: pip install tensorboard") from None
        self._writer_class, self.log_dir, self.writer = SummaryWriter, Path(log_dir), None

    def _write(self, trainer, prefix: str, row: dict) -> None:
        if not trainer.dist.is_main:
            return
        if self.writer is None:
            self.writer = self._writer_class(str(self.log_dir))
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "kind"):
                self.writer.add_scalar(f"{prefix}/{k}", v, row["step"])
        self.writer.flush()

    def on_log(self, trainer, row):
        self._write(trainer, "train", row)

    def on_epoch_end(self, trainer, row):
        self._write(trainer, "epoch", row)


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
        gen.manual_seed(item_seed(self.seed, epoch, index))
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
    step). The last, incomplete global batch is dropped then (every rank must take equal steps), and
    with drop_last in one process too.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False):
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, epoch, start
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last

    def steps(self) -> int:
        """Steps in a whole epoch."""
        if self.world_size == 1 and not self.drop_last:
            return math.ceil(self.n / self.batch_size)
        return self.n // (self.batch_size * self.world_size)

    def __len__(self) -> int:
        return max(0, self.steps() - self.start)

    def __iter__(self):
        g = torch.Generator().manual_seed(order_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=g).tolist()
        gb = self.batch_size * self.world_size
        for b in range(self.start, self.steps()):
            mine = order[b * gb:(b + 1) * gb][self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            yield [(self.epoch, i) for i in mine]


def _prefetch(items, depth: int = 2):
    """Iterate `items` on a background thread, at most `depth` items ahead, in order. An exception
    there is raised here, after the items before it; closing this generator (or dropping it, as a
    loop that breaks does) stops the thread and waits for it."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def run():
        try:
            it = iter(items)
            while not stop.is_set():
                item = next(it, end)
                q.put([item, None])
                if item is end:
                    return
        except BaseException as e:  # (handed to the consumer, raised there)
            q.put([None, e])

    t = threading.Thread(target=run, daemon=True, name="fastalex-prefetch")
    t.start()
    try:
        while True:
            got = q.get()  # [item, exception]
            if got[1] is not None:
                raise got[1]
            if got[0] is end:
                return
            yield got.pop(0)  # (no reference kept here meanwhile: an item may hold a buffer its maker reuses)
    finally:
        stop.set()
        while t.is_alive():  # a reader blocked on the full queue: make room until it sees the stop
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            t.join(timeout=0.01)


def _device_batches(data: Dataset, batches, seed: int, device: torch.device):
    """(images on `device`, labels) of a load_batch / augment_batch dataset (see Trainer) over `batches`
    (lists of (epoch, index)): each read on the reader thread (_prefetch), pinned for a GPU, copied
    without blocking, then augmented on the device."""
    pin = device.type == "cuda"
    raw = _prefetch(data.load_batch(seed, keys[0][0], [i for _, i in keys], pin) for keys in batches)
    for images, labels, draws in raw:
        x = data.augment_batch(images.to(device, non_blocking=True), draws)
        del images  # (a CPU buffer the reader may reuse while the step runs)
        yield x, labels


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

    The optimizer is torch's SGD (lr, momentum, weight_decay), fused where torch has the kernel
    (fastalex.optim.sgd: one pass over the parameters a step).
    precision: "32", "bf16-mixed" or "16-mixed" (autocast; "16-mixed" scales the loss, GPU only).
    lr_schedule: "plateau" (the paper: lr / 10 when validation error stops improving for `patience`
    epochs, at most `max_lr_drops` times), "cosine" (per step, to 0 at the end) or "constant".
    checkpoint_every: also save every this many steps (besides each epoch's end).
    strategy: "single" (one device), "towers" (the paper's model parallelism: the paper net's two
    towers on `devices`, two of them), "ddp" (data parallel, DistributedDataParallel under torchrun:
    NCCL on GPUs, gloo on CPUs) or "hybrid" (Krizhevsky's one weird trick under torchrun: the convs
    data parallel, the FC layers split across ranks); see fastalex.strategy. Under ddp and hybrid
    `batch_size` is per process (the global batch is batch_size x world size), the lr is taken as
    given, and only rank 0 logs, shows progress and writes files; every rank must call fit,
    evaluate and save together.
    seed: decides the data order, each image's augmentation and (seeded at the start of a fresh fit,
    per rank) dropout; the model's initial weights are the model's own (AlexNet(seed=...)).
    deterministic: torch's deterministic algorithms and cuDNN's deterministic mode (see
    use_deterministic_algorithms); fastalex's Triton kernels are deterministic either way.
    log_every: a "step" row in metrics.jsonl every this many steps (loss, lr, images/s, data wait,
    step time; mfu on GPUs). On a GPU the losses are read back only then (and at checkpoints and
    epoch ends): one host sync per log_every steps, so a NaN loss is seen up to log_every steps late
    (it still stops the run, and no checkpoint after it is written).
    callbacks: Callback objects (on_step, on_log, on_epoch_end).
    max_steps: stop after this many steps in all (the cosine schedule ends there), saving a checkpoint.
    drop_last: leave out each epoch's incomplete last batch (every step then has the same shape).
    out_dir None: write nothing (no checkpoints, no metrics.jsonl).
    compile: torch.compile the training forward (True: mode "default"; or a mode: "reduce-overhead"
    captures CUDA graphs on GPUs, "max-autotune"); fastalex's custom ops compile without graph
    breaks. Evaluation and checkpoints use the model itself.
    Batch datasets are read a batch at a time, without a DataLoader: with `get_batch(epoch, indices)
    -> (images, labels)` (e.g. images already on the device; the draws of their augmentation, if
    any, are theirs to derive from (epoch, index)), called in the training loop; or with
    `load_batch(seed, epoch, indices, pin_memory) -> (raw images, labels, draws)` and
    `augment_batch(raw images, draws) -> images` (fastalex.data.store.BatchedStore: uint8 in): the
    first on a reader thread, two batches ahead (CPU work only, no global RNG: pinned when the
    device is a GPU), the second after the copy to the device, on the device.
    """

    def __init__(self, model: torch.nn.Module, *, epochs: int, batch_size: int = 128, lr: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 5e-4, lr_schedule: str = "plateau",
                 precision: str = "32", device: str = "auto", out_dir: str | Path = "runs/fastalex", seed: int = 0,
                 workers: int = 0, checkpoint_every: int = 0, patience: int = 1, max_lr_drops: int = 3,
                 warmup_steps: int = 0, progress: bool = True, class_names: Sequence[str] | None = None,
                 args: dict | None = None, strategy: str = "single", devices: Sequence | None = None,
                 deterministic: bool = False, log_every: int = 50, callbacks: Sequence[Callback] = (),
                 max_steps: int | None = None, drop_last: bool = False, compile: bool | str = False):
        for name, v, lo in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("workers", workers, 0),
                            ("checkpoint_every", checkpoint_every, 0), ("patience", patience, 1),
                            ("max_lr_drops", max_lr_drops, 0), ("warmup_steps", warmup_steps, 0),
                            ("log_every", log_every, 1), ("max_steps", 1 if max_steps is None else max_steps, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if not lr > 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"need lr > 0, 0 <= momentum < 1, weight_decay >= 0; got {lr}, {momentum}, {weight_decay}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {lr_schedule!r}")
        if compile is not False and compile is not True and compile not in COMPILE_MODES:
            raise ValueError(f"compile must be True, False or one of {COMPILE_MODES}, got {compile!r}")
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be fastalex.trainer.Callback objects, got {type(cb).__name__}")
        self.arch = {k: getattr(model, k, None) for k in ("variant", "image_size")}
        self.strategy, self.strategy_name = fstrategy.make(strategy, model, device, devices), strategy
        self.model, self.device, self.dist = self.strategy.model, self.strategy.device, self.strategy.dist
        if compile:  # (the strategy keeps the plain model: state dicts and evaluation use it)
            self.model = torch.compile(self.model, mode="default" if compile is True else compile)
        if precision == "16-mixed" and self.device.type != "cuda":
            raise ValueError("precision '16-mixed' needs a CUDA device (use '32' or 'bf16-mixed' on the CPU)")
        self.epochs, self.batch_size, self.lr, self.seed = epochs, batch_size, lr, seed
        self.lr_schedule, self.precision, self.workers = lr_schedule, precision, workers
        self.checkpoint_every, self.patience, self.max_lr_drops = checkpoint_every, patience, max_lr_drops
        self.warmup_steps, self.progress, self.log_every = warmup_steps, progress, log_every
        self.callbacks = list(callbacks)
        self.class_names = list(class_names) if class_names is not None else None
        self.args = dict(args or {})
        self.out_dir = None if out_dir is None else Path(out_dir)
        self._files = self.out_dir is not None and self.dist.is_main  # this process writes the run's files
        self.max_steps, self.drop_last = max_steps, drop_last
        self.optimizer = foptim.sgd(self.model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "16-mixed")
        self.state = RunState()  # everything that says how far the run is: in every checkpoint
        self.last_val: dict | None = None  # the latest validation result of this process (not checkpointed)
        self.last_progress = time.monotonic()  # when the last step (or the start) finished: for error messages
        self._stop_asked = False  # Ctrl-C on this rank
        self._stop = False  # all ranks agreed to stop
        self._pending: list[torch.Tensor] = []  # per step since the last sync: (loss sum, images, stop, unreadable)
        # CPU tensors read back for free: look every step there; on a GPU every log_every steps.
        self._sync_every = 1 if self.device.type == "cpu" else log_every
        self._item_shape: tuple | None = None  # one training image's shape, for stand-ins of unreadable ones
        self._fresh = True  # no checkpoint loaded: fit seeds dropout's stream from (seed, rank)
        self._flops_per_image: float | None = None  # training FLOPs (3x forward) of one image, for mfu
        self._meter, self._bar = _Meter(), _Progress(False, 0, 0)
        if deterministic:
            use_deterministic_algorithms()

    @property
    def module(self) -> torch.nn.Module:
        """The model itself (unwrapped from DistributedDataParallel)."""
        return self.strategy.module

    def close(self) -> None:
        """Leave the process group (ddp, hybrid), the DDP wrapper released first; nothing for one process.
        Call it on every way out (the fastalex command does, in a finally): a process that exits with
        the group alive can abort at exit while its communication threads still run."""
        self.model = self.strategy.module  # the DDP wrapper must go before the group does: no reference here
        self.strategy.close()

    # -- schedule ------------------------------------------------------------------------------

    def current_lr(self, total_steps: int) -> float:
        s = self.state
        lr = self.lr * 0.1 ** s.lr_drops
        if self.lr_schedule == "cosine":
            lr = self.lr * 0.5 * (1 + math.cos(math.pi * min(s.step, total_steps) / max(total_steps, 1)))
        if self.warmup_steps and s.step < self.warmup_steps:
            lr *= (s.step + 1) / self.warmup_steps
        return lr

    def _after_epoch(self, val_error: float | None) -> None:
        s = self.state
        if val_error is None:
            return
        if val_error < s.best_error - 1e-6:
            s.best_error, s.bad_epochs = val_error, 0
            return
        s.bad_epochs += 1
        if self.lr_schedule == "plateau" and s.bad_epochs >= self.patience and s.lr_drops < self.max_lr_drops:
            s.lr_drops += 1
            s.bad_epochs = 0

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything to resume from (the same on every rank; collective under ddp and hybrid)."""
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        model_state, opt_state = self.strategy.state_dicts(self.optimizer)
        s = self.state
        return {
            "model": model_state, "optimizer": opt_state, "world_size": self.dist.world_size,
            "rng": rng, "rng_per_rank": fdist.all_gather_object(rng),
            "lr_scheduler": {"schedule": self.lr_schedule, "lr_drops": s.lr_drops, "bad_epochs": s.bad_epochs,
                             "best_error": s.best_error},
            "scaler": self.scaler.state_dict(), "class_names": self.class_names, "args": self.args,
            **asdict(s),
        }

    def load_state_dict(self, state: dict) -> None:
        saved_world = state.get("world_size", 1)
        if saved_world != self.dist.world_size and state["step_in_epoch"] != 0:
            raise ValueError(
                f"this checkpoint was written mid-epoch by {saved_world} process(es); resuming it with "
                f"{self.dist.world_size} would change every later batch. Resume with {saved_world} process(es), or "
                f"from a checkpoint written at the end of an epoch")
        with foptim.kept_form(self.optimizer):  # a checkpoint of another optimizer form: this one's
            self.strategy.load_state_dicts(self.optimizer, state["model"], state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.state = RunState.from_checkpoint(state)
        self._pending = []
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
        checkpoint.prev.pt (rank 0 writes; every rank must call it under ddp and hybrid). Steps not
        yet read back are read first: a NaN among them raises TrainingDiverged, and nothing is saved."""
        self._sync()
        if self.out_dir is None:
            return None
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
        if path is None and self.out_dir is None:
            raise ValueError("resume() needs a path when the Trainer has no out_dir")
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
        torch.manual_seed(rank_seed(self.seed, self.dist.rank))

    # -- training ------------------------------------------------------------------------------

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
        per_epoch = _EpochBatches(len(train_data), self.batch_size, self.seed, 0, 0, 0, world, self.drop_last).steps()
        if per_epoch == 0:
            raise ValueError(f"train_data has {len(train_data)} images, fewer than one batch of {self.batch_size} "
                             f"(drop_last leaves no step)")
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        data = _Seeded(train_data, self.seed)
        total_steps = min(per_epoch * self.epochs, self.max_steps or math.inf)
        if self._fresh:
            self._seed_rank()
            self._fresh = False
        if self._files:
            self._write_metrics()  # a resumed run's file: exactly its checkpoint's rows
        old_handler = self._install_sigint()
        self._stop_asked = self._stop = False
        try:
            with _Progress(self.progress and self.dist.is_main, total_steps, self.state.step) as self._bar:
                while self.state.epoch < self.epochs and self.state.step < total_steps and not self._stop:
                    self._train_epoch(data, total_steps)
                    if self._stop:
                        break
                    if self.state.step_in_epoch < per_epoch:  # max_steps reached inside the epoch
                        self.save()
                        break
                    # a stop asked for after the epoch's last step: all ranks agree on it
                    self._stop = fdist.all_reduce_sum([float(self._stop_asked)], self.device)[0] > 0
                    if not self._stop:
                        self._end_epoch(val_data)
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
        if self._stop:
            self.save()
        return self.state.history

    def _train_epoch(self, data: Dataset, total_steps: int) -> None:
        s = self.state
        self.model.train()
        if s.step_in_epoch == 0:
            s.epoch_loss_sum, s.epoch_seen = 0.0, 0
        batches = _EpochBatches(len(data), self.batch_size, self.seed, s.epoch, s.step_in_epoch, self.dist.rank,
                                self.dist.world_size, self.drop_last)
        self._meter = _Meter()
        for images, labels, kept in self._batches(data, batches):
            self._pending.append(self._train_step(images, labels, kept, total_steps))
            s.step += 1
            s.step_in_epoch += 1
            checkpoint = self.checkpoint_every and s.step % self.checkpoint_every == 0
            if checkpoint or s.step % self._sync_every == 0:
                self._sync()
            if checkpoint:
                self._account()
                self.save()
                self._meter.restart_clock()
            self.last_progress = time.monotonic()
            _faults.point("step")
            if self._stop or s.step == total_steps:
                break
        self._sync()
        self._account()

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor, kept: int, total_steps: int) -> torch.Tensor:
        """One optimizer step on this rank's batch, whose rows past `kept` are stand-ins for unreadable
        images (label -100: the loss ignores them). Returns (loss sum, readable images, stop asked,
        unreadable images) summed over the ranks: a device tensor, not read back here."""
        lr = self.current_lr(total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.strategy.out_device, non_blocking=True)
        with self._autocast():
            logits = self.model(images)
            loss_sum = TF.cross_entropy(logits, labels, reduction="sum")
        counts = [kept, self._stop_asked, labels.shape[0] - kept]
        stats = self.strategy.reduce(torch.cat([loss_sum.detach().float().reshape(1),
                                                torch.tensor(counts, dtype=torch.float32).to(loss_sum.device)]))
        if kept == 0 and stats[1].item() == 0:  # no rank read any image of this global batch: all skip the step
            return stats
        # The gradient of the mean loss over the global batch's readable images (DDP and hybrid average
        # the ranks' gradients: hence x world).
        loss = loss_sum * (self.dist.world_size / stats[1])
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.strategy.finish_gradients()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.callbacks:
            out = StepOutput(self.state.step + 1, self.state.epoch, logits.detach(), labels, kept, loss_sum.detach(), lr)
            for cb in self.callbacks:
                cb.on_step(self, out)
        return stats

    def _batches(self, data: Dataset, batches: Sampler):
        """This rank's batches as (images, labels, readable rows): every batch of the epoch's size, with
        unreadable images as stand-in rows at the end; the time spent waiting for each goes to the meter
        (for a load_batch dataset that includes the copy to the device and the augmentation there)."""
        if hasattr(data.data, "load_batch"):
            it = ((x, y, 0) for x, y in _device_batches(data.data, batches, self.seed, self.device))
        elif hasattr(data.data, "get_batch"):
            it = ((*data.data.get_batch(self.state.epoch, [i for _, i in keys]), 0) for keys in batches)
        else:
            it = iter(self._loader(data, batches))
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                return
            self._meter.data_wait += time.perf_counter() - t0
            images, labels, skipped = batch
            kept = 0 if images is None else images.shape[0]
            if skipped:
                images, labels = self._pad_batch(images, labels, kept + skipped)
            self._item_shape = tuple(images.shape[1:])
            yield images, labels, kept

    def _sync(self) -> None:
        """Read back the steps not yet seen (the one host sync): a NaN loss raises TrainingDiverged;
        the epoch's loss, the unreadable-image count and an agreed stop are updated; on every
        log_every-th step, a "step" row."""
        if not self._pending:
            return
        s, rows = self.state, torch.stack(self._pending).tolist()
        self._pending = []
        first = s.step - len(rows) + 1
        for i, (loss_sum, total, stop, skipped) in enumerate(rows):
            s.skipped_images += int(skipped)
            self._stop = self._stop or stop > 0
            if total == 0:
                continue
            if not math.isfinite(loss_sum / total):
                lr = self.optimizer.param_groups[0]["lr"]
                raise TrainingDiverged(
                    f"the loss became {loss_sum / total} at epoch {s.epoch + 1}, step {first + i} (lr {lr:g}); "
                    f"the last good checkpoint is kept in {self.out_dir} — try a lower --lr", step=first + i)
            s.epoch_loss_sum += loss_sum
            s.epoch_seen += int(total)  # over all ranks (the same on each: a mid-epoch checkpoint holds them)
            self._meter.add(loss_sum, int(total))
        m = self._meter
        self._bar.update(s.epoch, self.epochs, s.step, m.last_loss, self.optimizer.param_groups[0]["lr"],
                         m.images_per_second(), m.wait_fraction())
        if s.step % self.log_every == 0 and m.steps:
            self._log_row()

    def _log_row(self) -> None:
        s, m = self.state, self._meter
        row = {"kind": "step", "epoch": s.epoch + 1, "step": s.step, "loss": m.mean_loss(),
               "lr": self.optimizer.param_groups[0]["lr"], "images_per_second": m.images_per_second(),
               "data_wait_seconds": round(m.data_wait_logged(), 6), "step_seconds": m.step_seconds()}
        if self.device.type == "cuda":
            row["mfu"] = self._mfu(row["images_per_second"])
        m.start_interval()
        s.log.append(row)
        if self._files:
            with open(self.out_dir / "metrics.jsonl", "a") as f:  # (rewritten whole, atomically, each epoch)
                f.write(json.dumps(row) + "\n")
        for cb in self.callbacks:
            cb.on_log(self, row)

    def _mfu(self, images_per_second: float) -> float | None:
        """Model FLOPs utilisation: training FLOPs/s (3x fastalex.flops' forward) over the measured
        matmul rate of the step's dtype on this GPU (per rank)."""
        if self._flops_per_image is None:
            from fastalex import flops

            try:
                forward = flops.count(self.module, batch_size=1).macs * 2
            except (TypeError, ValueError):  # not an AlexNet: no formula
                forward = 0
            dtype = _AUTOCAST_DTYPES.get(self.precision, torch.float32)
            self._flops_per_image, self._peak = 3.0 * forward, _matmul_rate(self.device, dtype)
        if not self._flops_per_image or not images_per_second:
            return None
        return self._flops_per_image * images_per_second / self.dist.world_size / self._peak

    def _account(self) -> None:
        seconds, images = self._meter.take_clock()
        self.state.train_seconds += seconds
        self.state.train_images += images  # over all ranks

    def _end_epoch(self, val_data: Dataset | None) -> None:
        s = self.state
        t0 = time.perf_counter()
        row = {"kind": "epoch", "epoch": s.epoch + 1, "step": s.step, "lr": self.optimizer.param_groups[0]["lr"],
               "train_loss": s.epoch_loss_sum / max(1, s.epoch_seen)}
        if val_data is not None:
            v = self.last_val = self.evaluate(val_data, _fault="validation")
            row.update(val_top1_error=v["top1_error"], val_top5_error=v["top5_error"], val_loss=v["loss"])
        row["seconds_train_total"] = round(s.train_seconds, 3)
        row["seconds_eval"] = round(time.perf_counter() - t0, 3)
        improved = val_data is not None and row["val_top1_error"] < s.best_error - 1e-6
        self._after_epoch(row.get("val_top1_error"))
        s.history.append(row)
        s.epoch += 1
        s.step_in_epoch = 0
        if self._files:
            self._write_metrics()
        path = self.save()
        if improved and self.out_dir is not None:  # the state just saved: best.pt is a second name for it
            if self.dist.is_main:
                ckpt.link_atomic(path, self.out_dir / "best.pt")
            fdist.barrier()
        _faults.point("epoch-saved")
        self._bar.epoch_done(row)
        for cb in self.callbacks:
            cb.on_epoch_end(self, row)

    def _write_metrics(self) -> None:
        """metrics.jsonl from the state, atomically: step and epoch rows in step order."""
        rows = sorted(self.state.log + self.state.history, key=lambda r: (r["step"], r.get("kind") == "epoch"))
        tmp = self.out_dir / ".metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(self.out_dir / "metrics.jsonl")

    def _autocast(self):
        dtype = _AUTOCAST_DTYPES.get(self.precision)
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
            self._stop_asked = True

        return signal.signal(signal.SIGINT, handler)

    def _pad_batch(self, images: torch.Tensor | None, labels: torch.Tensor | None, n: int):
        """Pad a batch with unreadable images dropped back to n rows: zero images labelled -100
        (cross_entropy's ignore_index), so every batch of an epoch, on every rank, has its full size."""
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
        model = self.strategy.eval_model()
        was_training = model.training
        model.eval()
        out_device = self.strategy.out_device
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
        model = self.strategy.eval_model()
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
                "strategy": self.strategy_name, "world_size": self.dist.world_size,
                "devices": [str(d) for d in self.module.devices] if getattr(self.module, "devices", None) else None,
                "epochs": self.epoch, "steps": self.step, "skipped_train_images": self.skipped_images,
                "images_per_second": self.train_images / self.train_seconds if self.train_seconds else None,
                "train_seconds": self.train_seconds}


def _state_property(name: str) -> property:
    return property(lambda self: getattr(self.state, name), lambda self, v: setattr(self.state, name, v),
                    doc=f"trainer.state.{name}")


for _name in ("epoch", "step", "step_in_epoch", "history", "lr_drops", "bad_epochs", "best_error", "train_seconds",
              "train_images", "skipped_images"):
    setattr(Trainer, _name, _state_property(_name))


class _Meter:
    """Training time and images since the clock last went to train_seconds; and for the current log
    interval: steps, loss, images, data wait (all host numbers, from rows already read back)."""

    def __init__(self):
        self.data_wait = 0.0  # seconds waiting for batches, since the start
        self.restart_clock()
        self.start_interval()
        self.last_loss = float("nan")

    def restart_clock(self) -> None:
        self.clock, self.clock_images = time.perf_counter(), 0

    def take_clock(self) -> tuple[float, int]:
        out = time.perf_counter() - self.clock, self.clock_images
        self.restart_clock()
        return out

    def start_interval(self) -> None:
        self.t0, self.wait0, self.steps, self.loss_sum, self.images = time.perf_counter(), self.data_wait, 0, 0.0, 0

    def add(self, loss_sum: float, images: int) -> None:
        self.steps, self.loss_sum, self.images = self.steps + 1, self.loss_sum + loss_sum, self.images + images
        self.clock_images += images
        self.last_loss = loss_sum / images

    def mean_loss(self) -> float:
        return self.loss_sum / max(self.images, 1)

    def images_per_second(self) -> float:
        return self.images / max(time.perf_counter() - self.t0, 1e-9)

    def step_seconds(self) -> float:
        return (time.perf_counter() - self.t0) / max(self.steps, 1)

    def data_wait_logged(self) -> float:
        return self.data_wait - self.wait0

    def wait_fraction(self) -> float:
        return self.data_wait_logged() / max(time.perf_counter() - self.t0, 1e-9)


def _matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 4096, reps: int = 10) -> float:
    """Measured FLOP/s of an n x n matmul on a GPU in `dtype` (fp32 as torch runs it: tf32 if allowed)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    end.synchronize()
    return 2 * n ** 3 * reps / (start.elapsed_time(end) / 1e3)


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
                                           "{task.fields[ips]:.0f} img/s  data wait {task.fields[wait]:.0%}"),
                                TimeElapsedColumn(), TimeRemainingColumn())
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=self.total, completed=self.done, epoch="-", loss=float("nan"),
                                          lr=0.0, ips=0.0, wait=0.0)
        return self

    def update(self, epoch, epochs, step, loss, lr, ips, wait):
        if self.enabled:
            self.bar.update(self.task, completed=step, epoch=f"{epoch + 1}/{epochs}", loss=loss, lr=lr, ips=ips,
                            wait=wait)

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
