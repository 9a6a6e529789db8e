"""The paper's ablations on Fashion-MNIST, as one command.

    python -m perf.ablate                              # quick preset: 5 runs, ~23 minutes on a 2-core CPU
    python -m perf.ablate --preset full                # on a GPU (fastalex's Triton kernels)
    python -m perf.ablate --runs relu,tanh --steps 100 --out runs/ablate-relu-tanh

Runs: AlexNet (paper variant) trained from the same initial weights (same seed; at the presets'
image sizes every run has the same parameter shapes) on the same batches in the same order; "relu" is the baseline and each
other run changes one thing:

    relu     ReLU, LRN on, overlapping max-pool (3, 2), no dropout (the CLI's quick preset)
    tanh     tanh instead of ReLU                      paper: ReLU reaches 25% training error 6x faster
    no-lrn   no local response normalisation           paper: LRN lowers top-1/top-5 error by 1.4/1.2 points
    pool22   non-overlapping max-pool (2, 2)           paper: overlapping pooling lowers them by 0.4/0.3
    dropout  dropout 0.5 before fc6 and fc7            paper: dropout roughly doubles the iterations to converge

(The paper's ReLU/tanh figure is a 4-layer CNN on CIFAR-10; the others are ImageNet numbers.)

Training: fastalex.Trainer (max_steps=steps, drop_last, no files), with a callback that keeps each
step's batch loss and error on the device: SGD with momentum and weight decay (0.9, 5e-4) and the
Trainer's lr schedule (linear warm-up then cosine to 0 over the run's steps, or constant). Batches are drawn in the Trainer's random order per epoch from
(seed, epoch), the same for every run (an epoch's incomplete last batch is left out). The training and test images are transformed once up front (what
load_for_training's datasets give: Fashion-MNIST's normalisation and the bilinear resize, no
augmentation) and kept on the device, so a step costs only the model's work.

Training error (the curves and the targets): each step's batch error, the fraction of the batch
that the forward pass of that step misclassified, i.e. before the step's update (in train mode:
with dropout active in the dropout run), averaged over the last `window` steps (fewer at the
start). Exact per step and free: no extra forward passes. The running training loss is the same
average of the batch losses.

Targets: "steps to X" is the first step (1-based) at which the running training error is <= X,
None ("not reached") if it never is; epochs to X = images seen by then / training images. 25% is
Figure 1's target; "converge" means reaching the preset's `converge_error` (quick 0.15, full 0.10):
that is the comparisons' "iterations to converge". Seconds to a target = training seconds x steps
to target / steps (every step costs the same; the untimed steps below are not counted).

Test error: top-1 / top-5 on the first `test_images` images of the Fashion-MNIST test split
(default all 10,000), single view, eval mode, after the last step.

Each run first takes `UNTIMED_STEPS` untimed steps on a throw-away copy of its model, so that
Triton's compilation (on a GPU) is not in its wall time. Backend: torch's ops on the CPU, the
default "auto" elsewhere (Triton on CUDA); --backend overrides.

Writes OUT/ablate.json (settings, every run with its per-step curves, the comparisons),
OUT/ablate.md (the tables) and OUT/ablate.png (training error vs step, one panel per comparison);
prints the tables. `main(argv) -> int` is the entry point (exit 2 for bad flags or data).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as TF

from fastalex.trainer import Callback
from perf._args import fraction, int_at_least, positive_float

RUNS = {  # name -> the AlexNet arguments it changes from the baseline's
    "relu": {},
    "tanh": {"activation": "tanh"},
    "no-lrn": {"lrn": False},
    "pool22": {"pool": (2, 2)},
    "dropout": {"dropout": 0.5},
}
BASELINE = "relu"
BASE_MODEL = dict(variant="paper", activation="relu", lrn=True, pool=(3, 2), dropout=0.0, init="kaiming")
FIG1_ERROR = 0.25  # Figure 1: steps to 25% training error

PRESETS = {
    # 2-core CPU, torch's ops, measured (20 steps of each run): 0.60 (no-lrn) to 0.95 s (dropout) per step
    # of 128 at 67x67, 4.2 s for one step of each of the five runs; 10,000 test images in 13-24 s.
    # 300 steps x 4.2 s + ~105 s of testing + ~15 s set-up ~ 23 minutes in all (< 26 at 10% slower).
    # The baseline reached 25% training error at step 73 and 15% at step 134 of 250 (tanh: 116, 209).
    "quick": dict(image_size=67, batch_size=128, steps=300, subset=12800, lr=0.02, momentum=0.9, wd=5e-4,
                  lr_schedule="cosine", warmup_steps=50, window=20, converge_error=0.15, test_images=10000),
    # GPU: the paper's 227x227 input, all 60,000 training images for 10 epochs (468 full batches each).
    "full": dict(image_size=227, batch_size=128, steps=4680, subset=None, lr=0.01, momentum=0.9, wd=5e-4,
                 lr_schedule="cosine", warmup_steps=200, window=50, converge_error=0.10, test_images=10000),
}
SCHEDULES = ("cosine", "constant")
UNTIMED_STEPS = 2  # untimed steps on a copy of each model: compilation, allocator, caches

# (comparison, run, what the paper says, [(metric, kind, paper value)]); kind says how the metric is made.
COMPARISONS = [
    ("relu-vs-tanh", "tanh", "a 4-layer CNN on CIFAR-10 reached 25% training error six times faster with ReLUs "
                             "than with tanh units (Figure 1)",
     [("steps to 25% train error, tanh / relu", "ratio:steps_to_25", 6.0),
      ("seconds to 25% train error, tanh / relu", "ratio:seconds_to_25", None)]),
    ("lrn", "no-lrn", "response normalization reduces top-1 and top-5 error rates by 1.4% and 1.2% (ImageNet)",
     [("top-1 test error, no-lrn - relu (points)", "delta:test_top1_error", 1.4),
      ("top-5 test error, no-lrn - relu (points)", "delta:test_top5_error", 1.2),
      ("steps to converge, no-lrn / relu", "ratio:steps_to_converge", None)]),
    ("pooling", "pool22", "overlapping pooling (3, 2) reduces top-1 and top-5 error by 0.4% and 0.3% compared "
                          "with (2, 2) (ImageNet)",
     [("top-1 test error, pool22 - relu (points)", "delta:test_top1_error", 0.4),
      ("top-5 test error, pool22 - relu (points)", "delta:test_top5_error", 0.3),
      ("steps to converge, pool22 / relu", "ratio:steps_to_converge", None)]),
    ("dropout", "dropout", "dropout roughly doubles the number of iterations required to converge (ImageNet)",
     [("steps to converge, dropout / relu", "ratio:steps_to_converge", 2.0),
      ("top-1 test error, dropout - relu (points)", "delta:test_top1_error", None),
      ("top-5 test error, dropout - relu (points)", "delta:test_top5_error", None)]),
]


class UsageError(Exception):
    """A bad flag or missing data: printed without a traceback, exit status 2."""


# -- definitions (unit-tested) -------------------------------------------------------------------


def running_mean(values, window: int) -> list[float]:
    """Mean of the last `window` values at each position (of all values so far at the first ones)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def steps_to_target(curve, target: float) -> int | None:
    """The first step (1-based) at which `curve` (one value per step) is <= target; None if never."""
    return next((i + 1 for i, v in enumerate(curve) if v <= target), None)


def images_seen(steps: int, n: int, batch_size: int) -> int:
    """Training images used by the first `steps` steps (full batches only: the Trainer's drop_last)."""
    return steps * min(batch_size, n)


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _delta_points(a, b):
    return None if a is None or b is None else 100.0 * (a - b)


def compare(runs: dict) -> list[dict]:
    """The comparisons whose run is in `runs` (run name -> result), each measured against the baseline.

    Ratios are other / baseline; differences other - baseline in points (positive: the baseline is
    better). A target the other run did not reach gives measured None and at_least = its steps (or
    seconds) / the baseline's; one the baseline did not reach gives None for both.
    """
    base = runs[BASELINE]
    out = []
    for name, other, claim, metrics in COMPARISONS:
        if other not in runs:
            continue
        rows = []
        for label, kind, paper in metrics:
            how, key = kind.split(":")
            mine = runs[other]
            value = (_ratio if how == "ratio" else _delta_points)(mine.get(key), base.get(key))
            # Not reached by the other run within its steps: the ratio is at least its whole run / the baseline's.
            at_least = None
            if how == "ratio" and mine.get(key) is None and base.get(key):
                whole = mine.get("steps" if key.startswith("steps") else "train_seconds")
                at_least = whole / base[key] if whole else None
            rows.append({"metric": label, "measured": value, "at_least": at_least, "paper": paper})
        out.append({"name": name, "baseline": BASELINE, "run": other, "paper_claim": claim, "metrics": rows})
    return out


# -- command line ----------------------------------------------------------------------------


def _run_names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"name at least one run of {', '.join(RUNS)}")
    bad = [n for n in names if n not in RUNS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown run {bad[0]!r}: choose from {', '.join(RUNS)}")
    return names


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m perf.ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="quick: 2-core CPU, ~23 min for all five runs; full: GPU, 227x227, 10 epochs each")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default: $FASTALEX_DATA, the Debian "
                                                "package, or a download)")
    p.add_argument("--out", type=Path, default=None, help="folder for ablate.json/.md/.png (default runs/ablate-PRESET)")
    p.add_argument("--json", type=Path, default=None, help="write the JSON here instead (default OUT/ablate.json)")
    p.add_argument("--markdown", type=Path, default=None, help="write the Markdown here instead (default OUT/ablate.md)")
    p.add_argument("--runs", type=_run_names, default=list(RUNS),
                   help=f"comma-separated subset of {','.join(RUNS)} ({BASELINE} is always run: the baseline)")
    p.add_argument("--steps", type=int_at_least(1), help="training steps per run")
    p.add_argument("--subset", type=int_at_least(1), help="train on the first N training images")
    p.add_argument("-b", "--batch-size", type=int_at_least(1))
    p.add_argument("--image-size", type=int_at_least(1))
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--lr-schedule", choices=SCHEDULES)
    p.add_argument("--warmup-steps", type=int_at_least(0), help="linear lr warm-up steps")
    p.add_argument("--window", type=int_at_least(1), help="steps in the running training error")
    p.add_argument("--converge-error", type=fraction, help="the training error that counts as converged")
    p.add_argument("--test-images", type=int_at_least(1), help="evaluate on the first N test images")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default=None,
                   help="fastalex ops (default: torch on the CPU, auto elsewhere)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def settings_from(args) -> dict:
    """The preset's values, overridden by the flags given, checked (UsageError) before any work."""
    from fastalex.model import smallest_image_size

    s = dict(PRESETS[args.preset], preset=args.preset)
    for key in ("steps", "subset", "batch_size", "image_size", "lr", "lr_schedule", "warmup_steps", "window",
                "converge_error", "test_images"):
        v = getattr(args, key)
        if v is not None:
            s[key] = v
    runs = list(dict.fromkeys([BASELINE] + args.runs))  # the baseline first, always; no repeats
    for run in runs:
        pool = RUNS[run].get("pool", BASE_MODEL["pool"])
        smallest = smallest_image_size(BASE_MODEL["variant"], pool)
        if s["image_size"] < smallest:
            raise UsageError(f"--image-size {s['image_size']} is too small for run {run!r}: AlexNet needs at least "
                             f"{smallest}x{smallest}")
    try:
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              "cpu" if args.device == "auto" else args.device)
    except RuntimeError as e:
        raise UsageError(f"--device {args.device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    backend = args.backend or ("torch" if device.type == "cpu" else "auto")
    if backend == "triton":
        from fastalex._backend import interpreter_enabled

        if device.type == "cpu" and not interpreter_enabled():
            raise UsageError("--backend triton on the CPU needs TRITON_INTERPRET=1 (Triton's interpreter); "
                             "use --backend torch")
    s.update(runs=runs, device=str(device), backend=backend, seed=args.seed, data=args.data,
             subset_given=args.subset is not None, test_images_given=args.test_images is not None)
    return s


# -- data and training -----------------------------------------------------------------------


def _on_device(data, n: int, device: torch.device, chunk: int = 1000):
    """The first n items of a FashionMNIST dataset, transformed once: (images (n, C, S, S), labels (n,)).

    C is 1 while the dataset's three channels are the same grey (its default normalisation): a third
    of the memory (12 GB instead of 37 for 60,000 images at 227x227); `_rgb` expands each batch to 3.
    Each chunk moves to the device as it is made, so the host holds one chunk at a time.
    """
    xs, ys, grey = [], [], True
    for start in range(0, n, chunk):
        x, y = data.batch(range(start, min(n, start + chunk)))
        if grey and not torch.equal(x[:, :1].expand_as(x), x):
            grey = False
            xs = [_rgb(t) for t in xs]
        xs.append((x[:, :1] if grey else x).to(device))
        ys.append(y.to(device))
    return torch.cat(xs), torch.cat(ys)


def _rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


class _OnDevice(torch.utils.data.Dataset):
    """(images, labels) tensors already on the device, read by the Trainer a batch at a time."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return _rgb(self.images[i:i + 1])[0], self.labels[i]

    def get_batch(self, epoch: int, indices: list[int]):
        idx = torch.as_tensor(indices, device=self.labels.device)
        return _rgb(self.images[idx]), self.labels[idx]


class _Curves(Callback):
    """Each step's batch loss and batch error (the forward pass before the step's update), kept on the
    device: no host sync per step."""

    def __init__(self, steps: int, device: torch.device):
        self.loss, self.error = torch.zeros(steps, device=device), torch.zeros(steps, device=device)

    def on_step(self, trainer, out) -> None:
        self.loss[out.step - 1] = out.loss_sum / out.kept
        self.error[out.step - 1] = (out.logits.argmax(dim=1) != out.labels).float().mean()


def build_model(run: str, s: dict, num_classes: int = 10):
    """The run's AlexNet (paper variant at s["image_size"]), from the seed's initial weights."""
    from fastalex import AlexNet

    kw = dict(BASE_MODEL, **RUNS[run])
    torch.manual_seed(s["seed"])  # every run starts from the same weights (the shapes are the same)
    return AlexNet(num_classes, kw.pop("variant"), kw.pop("dropout"), image_size=s["image_size"], **kw)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _trainer(model, s: dict, steps: int, callbacks=()):
    """The fastalex Trainer with the run's recipe: full batches, `steps` steps, no files."""
    from fastalex import Trainer

    return Trainer(model, epochs=10**9, max_steps=steps, batch_size=s["batch_size"], lr=s["lr"],
                   momentum=s["momentum"], weight_decay=s["wd"], lr_schedule=s["lr_schedule"],
                   warmup_steps=s["warmup_steps"], device=s["device"], out_dir=None, seed=s["seed"],
                   progress=False, drop_last=True, callbacks=callbacks, log_every=25)


def train_run(run: str, s: dict, train, test, progress=None) -> dict:
    """One run: `steps` SGD steps of fastalex.Trainer on train = (images, labels) (on the device), then
    the test error on test."""
    from fastalex import TrainingDiverged

    device = torch.device(s["device"])
    images, labels = train
    n = len(labels)
    s = dict(s, batch_size=min(s["batch_size"], n))  # fewer images than a batch: one batch of all of them
    data = _OnDevice(images, labels)
    model = build_model(run, s).to(device)

    # Untimed warm-up steps on a copy: kernel compilation and allocator warm-up stay out of the wall time.
    with contextlib.suppress(TrainingDiverged):  # (the timed run below says so)
        _trainer(copy.deepcopy(model), s, UNTIMED_STEPS).fit(data)
    _sync(device)

    steps = s["steps"]
    curves = _Curves(steps, device)
    task = progress.add_task(run, total=steps) if progress is not None else None

    class _Bar(Callback):  # the progress bar, at the Trainer's log rows (no extra sync)
        def on_log(self, trainer, row):
            progress.update(task, completed=row["step"], description=f"{run}  loss {row['loss']:.3f}")

    trainer = _trainer(model, s, steps, [curves] + ([_Bar()] if task is not None else []))
    diverged = None
    t0 = time.perf_counter()
    try:
        trainer.fit(data)
    except TrainingDiverged as e:
        diverged = e.step
    _sync(device)
    seconds = time.perf_counter() - t0
    done = steps if diverged is None else diverged - 1  # the curves keep the finite steps
    if task is not None:
        progress.update(task, completed=done)

    loss_list, err_list = curves.loss[:done].tolist(), curves.error[:done].tolist()
    run_loss, run_err = running_mean(loss_list, s["window"]), running_mean(err_list, s["window"])
    to25, toc = steps_to_target(run_err, FIG1_ERROR), steps_to_target(run_err, s["converge_error"])

    t1 = time.perf_counter()
    test_res = evaluate(model, test, s["batch_size"]) if diverged is None else {}
    eval_seconds = time.perf_counter() - t1
    per_step = seconds / done if done else None
    return {
        "run": run, "model": {k: (list(v) if isinstance(v, tuple) else v) for k, v in
                              dict(BASE_MODEL, **RUNS[run]).items()},
        "steps": done, "diverged_at_step": diverged, "train_seconds": seconds, "eval_seconds": eval_seconds,
        "images_per_second": images_seen(done, n, s["batch_size"]) / seconds if seconds else None,
        "epochs": images_seen(done, n, s["batch_size"]) / n,
        "final_train_loss": run_loss[-1] if run_loss else None,
        "final_train_error": run_err[-1] if run_err else None,
        "steps_to_25": to25, "epochs_to_25": None if to25 is None else images_seen(to25, n, s["batch_size"]) / n,
        "seconds_to_25": None if to25 is None else seconds * to25 / done,
        "steps_to_converge": toc,
        "epochs_to_converge": None if toc is None else images_seen(toc, n, s["batch_size"]) / n,
        "seconds_to_converge": None if toc is None else seconds * toc / done,
        "test_top1_error": test_res.get("top1_error"), "test_top5_error": test_res.get("top5_error"),
        "test_loss": test_res.get("loss"), "test_images": test_res.get("images"),
        "seconds_per_step": per_step,
        "curve": {"batch_error": err_list, "batch_loss": loss_list, "train_error": run_err, "train_loss": run_loss},
    }


@torch.no_grad()
def evaluate(model, test, batch_size: int) -> dict:
    """Top-1 / top-5 error and mean loss of `model` (eval mode) on test = (images, labels)."""
    images, labels = test
    model.eval()
    miss1 = miss5 = 0
    loss = 0.0
    chunk = max(batch_size, 256)
    for start in range(0, len(labels), chunk):
        x, y = images[start:start + chunk], labels[start:start + chunk]
        logits = model(_rgb(x)).float()
        loss += float(TF.cross_entropy(logits, y, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        miss1 += int((top[:, 0] != y).sum())
        miss5 += int((top != y[:, None]).all(dim=1).sum())
    model.train()
    n = len(labels)
    return {"top1_error": miss1 / n, "top5_error": miss5 / n, "loss": loss / n, "images": n}


def load_data(s: dict):
    """((train images, labels), (test images, labels)) on s["device"], transformed once (see _on_device)."""
    from fastalex import data

    try:
        train, _, test, _ = data.load_for_training("fashion-mnist", s["data"], image_size=s["image_size"],
                                                    augment=False)
    except (FileNotFoundError, NotADirectoryError, data.DataError) as e:
        raise UsageError(f"--data: {e}") from None
    # The first N images (load_for_training's subset too); a preset's N is "at most N".
    n = len(train) if s["subset"] is None else min(s["subset"], len(train))
    if s["subset_given"] and s["subset"] > len(train):
        raise UsageError(f"--subset {s['subset']} is more than the training split has ({len(train)})")
    if s["test_images"] > len(test):
        if s["test_images_given"]:
            raise UsageError(f"--test-images {s['test_images']} is more than the test split has ({len(test)})")
        s["test_images"] = len(test)
    device = torch.device(s["device"])
    return _on_device(train, n, device), _on_device(test, s["test_images"], device)


def run_all(s: dict, progress: bool = True) -> dict:
    """Every run of s["runs"], then the comparisons: the result the files are written from."""
    import fastalex

    started = time.perf_counter()
    s = dict(s)
    train, test = load_data(s)  # may lower a preset's test_images to what the test split has
    prep = time.perf_counter() - started
    s["train_images"] = len(train[1])
    runs = {}
    bar = _progress() if progress else contextlib.nullcontext()
    with fastalex.backend(s["backend"]), bar as p:
        for run in s["runs"]:
            runs[run] = r = train_run(run, s, train, test, p)
            line = (f"{run}: {r['steps']} steps in {r['train_seconds']:.0f}s, train error {_pct(r['final_train_error'])}, "
                    f"to 25%: {_steps(r['steps_to_25'])}, test top-1 error {_pct(r['test_top1_error'])}")
            if r["diverged_at_step"]:
                line += f" [the loss became NaN/inf at step {r['diverged_at_step']}: the run stopped; try a lower --lr]"
            (p.console.print if p is not None else print)(line)
    return {
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()},
        "definitions": {
            "train_error": f"running mean over the last {s['window']} steps of each step's batch error, measured in "
                           f"the step's forward pass before its update (train mode)",
            "steps_to_25": "first step (1-based) at which the running train error is <= 0.25 (Figure 1's target)",
            "steps_to_converge": f"first step at which the running train error is <= {s['converge_error']}",
            "test_error": f"top-1 / top-5 on the first {s['test_images']} images of the Fashion-MNIST test split",
        },
        "environment": _environment(s),
        "prep_seconds": prep, "total_seconds": time.perf_counter() - started,
        "runs": runs, "comparisons": compare(runs),
    }


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def _environment(s: dict) -> dict:
    from fastalex import backend, backend_info

    with backend(s["backend"]):
        info = backend_info(s["device"])
    device = torch.device(s["device"])
    return {"device": s["device"], "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(), "backend": info.backend, "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


# -- output ----------------------------------------------------------------------------------


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _steps(v) -> str:
    return "not reached" if v is None else str(v)


def _num(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def run_table(result: dict) -> tuple[list[str], list[list[str]]]:
    conv = result["settings"]["converge_error"]
    headers = ["run", "steps", "epochs", "train s", "loss", "train err", "to 25%", "s to 25%",
               f"to {100 * conv:g}%", "top-1 err", "top-5 err"]
    rows = []
    for name, r in result["runs"].items():
        steps = str(r["steps"]) + (f" (diverged at {r['diverged_at_step']})" if r["diverged_at_step"] else "")
        rows.append([name, steps, _num(r["epochs"]), _num(r["train_seconds"], "{:.0f}"),
                     _num(r["final_train_loss"], "{:.3f}"), _pct(r["final_train_error"]),
                     _steps(r["steps_to_25"]) + (f" ({r['epochs_to_25']:.2f} ep)" if r["steps_to_25"] else ""),
                     _num(r["seconds_to_25"], "{:.0f}"), _steps(r["steps_to_converge"]),
                     _pct(r["test_top1_error"]), _pct(r["test_top5_error"])])
    return headers, rows


def comparison_table(result: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["comparison", "metric", "measured", "paper"]
    rows = []
    for c in result["comparisons"]:
        for m in c["metrics"]:
            fmt = "{:+.2f}" if "points" in m["metric"] else "{:.2f}x"
            if m["measured"] is not None:
                measured = fmt.format(m["measured"])
            elif m.get("at_least") is not None:
                measured = f"> {m['at_least']:.2f}x (not reached)"
            else:
                measured = "not reached" if " to " in m["metric"] else "-"
            rows.append([c["name"], m["metric"], measured, _num(m["paper"], fmt)])
    return headers, rows


def _title(result: dict) -> str:
    s, e = result["settings"], result["environment"]
    return (f"AlexNet (paper variant) ablations on Fashion-MNIST, preset {s['preset']}: {s['steps']} steps of "
            f"{s['batch_size']} at {s['image_size']}x{s['image_size']} on {s['train_images']} training images, "
            f"lr {s['lr']:g} {s['lr_schedule']} ({s['warmup_steps']} warm-up), {e['device']} / {e['backend']}")


def _notes(result: dict) -> list[str]:
    d = result["definitions"]
    return ["Columns: training steps, epochs and seconds; the final running training loss and error; steps "
            "(and seconds) to reach the targets; test error.",
            f"train err: {d['train_error']}.",
            f"steps to X: {d['steps_to_25'].replace('0.25', 'X')}; converge: {d['steps_to_converge']}.",
            f"test error: {d['test_error']}.",
            "The paper's ReLU/tanh figure is CIFAR-10 (4-layer CNN); its LRN, pooling and dropout numbers are "
            "ImageNet. Ratios are other run / relu; differences are other run - relu (positive: relu better)."]


def print_report(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a file or pipe: room for the whole table rather than 80 columns
        console = Console(width=130)
    for title, (headers, rows) in ((_title(result), run_table(result)), ("vs the paper", comparison_table(result))):
        t = Table(title=title)
        for h in headers:
            t.add_column(h, justify="left" if h in ("run", "comparison", "metric") else "right")
        for row in rows:
            t.add_row(*row)
        console.print(t)
    for line in _notes(result):
        console.print(line)


def to_markdown(result: dict) -> str:
    def md(headers, rows):
        left = ("run", "comparison", "metric")
        out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if h in left else "---:" for h in headers) + "|"]
        return "\n".join(out + ["| " + " | ".join(row) + " |" for row in rows])

    parts = [f"**{_title(result)}**", md(*run_table(result))]
    if result["comparisons"]:
        parts.append(md(*comparison_table(result)))
    parts.append("\n".join(f"- {line}" for line in _notes(result)))
    return "\n\n".join(parts) + "\n"


def plot(result: dict, path: Path) -> None:
    """PNG: running training error vs step, one panel per comparison (the baseline alone if none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs, conv = result["runs"], result["settings"]["converge_error"]
    panels = [(c["name"], c["run"]) for c in result["comparisons"]] or [("baseline", None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), dpi=100, squeeze=False)
    for ax, (name, other) in zip(axes[0], panels):
        for run in (BASELINE, other):
            if run is not None:
                curve = runs[run]["curve"]["train_error"]
                ax.plot(range(1, len(curve) + 1), [100 * v for v in curve], label=run)
        target = FIG1_ERROR if name == "relu-vs-tanh" else conv
        ax.axhline(100 * target, color="grey", linestyle=":",
                   label=f"{100 * target:g}% ({'Figure 1' if name == 'relu-vs-tanh' else 'converged'})")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(f"training error, % (last {result['settings']['window']} steps)")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed the problem; an int either way, for `fastalex ablate`
        return e.code if isinstance(e.code, int) else 2
    try:
        s = settings_from(args)
        out = args.out or Path(f"runs/ablate-{s['preset']}")
        paths = {"json": args.json or out / "ablate.json", "md": args.markdown or out / "ablate.md",
                 "png": out / "ablate.png"}
        for p in paths.values():
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UsageError(f"cannot write {p}: {e}") from None
        if args.preset == "full" and torch.device(s["device"]).type == "cpu":
            print("perf.ablate: the full preset is meant for a GPU; on the CPU it takes many hours", file=sys.stderr)
        result = run_all(s, progress=not args.no_progress)
    except UsageError as e:
        print(f"perf.ablate: {e}", file=sys.stderr)
        return 2
    print_report(result)
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    paths["md"].write_text(to_markdown(result))
    plot(result, paths["png"])
    print(f"results: {paths['json']}, {paths['md']}, {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
