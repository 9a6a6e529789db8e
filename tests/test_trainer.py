"""Trainer: learning, exact resume after SIGINT and SIGKILL, atomic checkpoints, divergence, evaluation."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import fastalex
from fastalex import Trainer, TrainingDiverged
from fastalex import checkpoint as ckpt

# A small, learnable problem with random augmentation and dropout, so that resume must restore
# the data order, the augmentation and the dropout RNG to be exact.
PROBLEM = textwrap.dedent("""
    import torch
    from torch import nn

    class Blobs(torch.utils.data.Dataset):
        def __init__(self, n=96, seed=0):
            centers = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
            g = torch.Generator().manual_seed(seed)
            self.y = torch.randint(0, 4, (n,), generator=g)
            self.x = centers[self.y] + 0.8 * torch.randn(n, 3, 8, 8, generator=g)
        def __len__(self):
            return len(self.y)
        def __getitem__(self, i):
            x = self.x[i] + 0.1 * torch.randn(3, 8, 8)       # augmentation noise: global RNG
            return (x.flip(-1) if torch.rand(()) < 0.5 else x), self.y[i]

    def small_net():
        torch.manual_seed(5)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Dropout(0.3),
                             nn.Linear(512, 4))
""")
exec(PROBLEM)

DRIVER = PROBLEM + textwrap.dedent("""
    import sys, time, fastalex
    out, resume = sys.argv[1], sys.argv[2] == "resume"

    class SlowBlobs(Blobs):  # slow enough that the test's signal lands mid-run
        def __getitem__(self, i):
            time.sleep(0.01)
            return super().__getitem__(i)

    t = fastalex.Trainer(small_net(), epochs=3, batch_size=8, lr=0.05, out_dir=out, checkpoint_every=2,
                         progress=False, seed=7)
    if resume:
        t.resume()
    t.fit(SlowBlobs(), Blobs(32, seed=1))
    print("DONE", t.step, flush=True)
""")


def _trainer(tmp_path, **kw):
    args = dict(epochs=3, batch_size=8, lr=0.05, out_dir=tmp_path, checkpoint_every=2, progress=False, seed=7)
    args.update(kw)
    return Trainer(small_net(), **args)  # noqa: F821 (defined by exec above)


def test_loss_falls_and_outputs_are_written(tmp_path):
    t = _trainer(tmp_path, epochs=4)
    hist = t.fit(Blobs(), Blobs(32, seed=1))  # noqa: F821
    assert len(hist) == 4 and hist[-1]["train_loss"] < 0.6 * hist[0]["train_loss"]
    assert hist[-1]["val_top1_error"] < 0.3
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "epoch", "step", "args", "rng"} <= state.keys()
    assert state["epoch"] == 4 and state["step"] == 48
    assert (tmp_path / "best.pt").is_file()


def test_best_is_the_best_epochs_checkpoint_without_a_second_copy(tmp_path):
    t = _trainer(tmp_path, epochs=1)
    t.fit(Blobs(), Blobs(32, seed=1))  # noqa: F821
    best, last = tmp_path / "best.pt", tmp_path / "checkpoint.pt"
    assert os.path.samefile(best, last), "best.pt should be a link to the checkpoint just saved"
    epoch1 = ckpt.load(last)
    t.epochs = 2
    t.best_error = -1.0  # epoch 2 cannot improve on it: best.pt must stay epoch 1's
    t.fit(Blobs(), Blobs(32, seed=1))  # noqa: F821
    assert not os.path.samefile(best, last) and ckpt.load(last)["epoch"] == 2
    kept = ckpt.load(best)
    assert kept["epoch"] == 1 and all(torch.equal(kept["model"][k], v) for k, v in epoch1["model"].items())
    assert not list(tmp_path.glob(".*.tmp"))


def _final_weights(path: Path) -> dict:
    return ckpt.load(path / "checkpoint.pt")["model"]


def _run_driver(out: Path, mode: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(out), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _wait_for_checkpoint_step(out: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "checkpoint.pt").is_file():
            try:
                if ckpt.load(out / "checkpoint.pt")["step"] >= step:
                    return
            except ValueError:  # never torn: this would be a bug, but keep polling to report it below
                pass
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    proc = _run_driver(out, "fresh")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    yield _final_weights(out)
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "sigint"])
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, uninterrupted, sig):
    proc = _run_driver(tmp_path, "fresh")
    _wait_for_checkpoint_step(tmp_path, proc, 6)
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 0, "Ctrl-C must save and exit cleanly"
    stopped_at = ckpt.load(tmp_path / "checkpoint.pt")["step"]
    assert stopped_at < 36, "the run finished before the signal; the test proves nothing"
    proc = _run_driver(tmp_path, "resume")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "DONE 36" in stdout
    resumed = _final_weights(tmp_path)
    for k, v in uninterrupted.items():
        assert torch.equal(resumed[k], v), f"{k} differs after resuming from step {stopped_at}"


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    t = _trainer(tmp_path, epochs=1)
    t.fit(Blobs(), None)  # noqa: F821
    before = (tmp_path / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def torn_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        t.save()
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert ckpt.load(tmp_path / "checkpoint.pt")["step"] == 12
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "temporary file left behind"


def test_corrupt_checkpoint_gives_clear_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable fastalex checkpoint"):
        _trainer(tmp_path).resume()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _trainer(tmp_path / "nothing").resume()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    t = _trainer(tmp_path, epochs=3, lr=1e6, checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match="the loss became"):
        t.fit(Blobs(), None)  # noqa: F821
    state = ckpt.load(tmp_path / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_plateau_schedule_divides_lr_at_most_max_times(tmp_path):
    t = _trainer(tmp_path, max_lr_drops=3, patience=1)
    for err in (0.5, 0.4, 0.4, 0.45, 0.41, 0.42, 0.43):
        t._after_epoch(err)
    assert t.lr_drops == 3 and t.current_lr(100) == pytest.approx(0.05e-3)
    c = _trainer(tmp_path, lr_schedule="cosine")
    c.step = 50
    assert c.current_lr(100) == pytest.approx(0.025)


def test_evaluate_ten_crop_and_predict(tmp_path):
    t = _trainer(tmp_path)
    x = torch.randn(6, 3, 8, 8)
    crops = torch.stack([x, x.flip(-1)] * 5, dim=1)  # (6, 10, 3, 8, 8)
    labels = torch.arange(6) % 4
    probs = t.predict(x)
    assert probs.shape == (6, 4) and torch.allclose(probs.sum(1), torch.ones(6))
    t.model.eval()
    with torch.no_grad():
        expect = (t.model(x).softmax(1) + t.model(x.flip(-1)).softmax(1)) / 2
    res = t.evaluate(torch.utils.data.TensorDataset(crops, labels), ten_crop=True)
    miss1 = int((expect.argmax(1) != labels).sum())
    assert res["top1_error"] == pytest.approx(miss1 / 6) and res["images"] == 6
    assert t.predict(x[0]).shape == (4,)


@pytest.mark.parametrize("kw,msg", [
    (dict(epochs=0), "epochs must be an int >= 1"),
    (dict(precision="64"), "precision must be one of"),
    (dict(precision="16-mixed", device="cpu"), "needs a CUDA device"),
    (dict(lr_schedule="step"), "lr_schedule must be one of"),
    (dict(lr=-1.0), "need lr > 0"),
])
def test_bad_arguments(tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg):
        _trainer(tmp_path, **kw)


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_alexnet_trains_through_the_trainer(tmp_path, precision):
    # torch's ops: the whole net through the interpreted kernels is tested in test_model.py
    model = fastalex.AlexNet(num_classes=4, variant="single", image_size=67, init="torch")
    t = Trainer(model, epochs=1, batch_size=4, lr=0.01, out_dir=tmp_path, progress=False, precision=precision)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 67, 67), torch.arange(8) % 4)
    with fastalex.backend("torch"):
        t.fit(data, data)
        info = t.describe()
    assert info["variant"] == "single" and info["image_size"] == [67, 67] and info["steps"] == 2
    assert info["backend"] == "torch"
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())
    assert os.path.isfile(tmp_path / "best.pt") or t.history[0]["val_top1_error"] >= 1.0


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_step_rows_every_log_every_steps_beside_the_epoch_rows(tmp_path):
    t = _trainer(tmp_path, epochs=1, log_every=5)  # 12 steps an epoch
    t.fit(Blobs(), Blobs(32, seed=1))  # noqa: F821
    rows = _rows(tmp_path)
    assert [(r["kind"], r["step"]) for r in rows] == [("step", 5), ("step", 10), ("epoch", 12)]
    for r in rows[:2]:
        assert {"epoch", "loss", "lr", "images_per_second", "data_wait_seconds", "step_seconds"} <= r.keys()
        assert r["epoch"] == 1 and r["images_per_second"] > 0 and r["data_wait_seconds"] >= 0 and r["step_seconds"] > 0
        assert "mfu" not in r  # GPUs only
    # the interval's mean loss: the 5 steps' summed losses over their images, as the epoch row's mean
    assert 0 < rows[0]["loss"] < 10 and rows[2]["train_loss"] > 0
    # resumed for a second epoch: the file is rewritten from the checkpoint, then goes on
    t2 = _trainer(tmp_path, epochs=2, log_every=5)
    t2.resume()
    t2.fit(Blobs(), Blobs(32, seed=1))  # noqa: F821
    assert [(r["kind"], r["step"]) for r in _rows(tmp_path)] == [
        ("step", 5), ("step", 10), ("epoch", 12), ("step", 15), ("step", 20), ("epoch", 24)]
    assert ckpt.load(tmp_path / "checkpoint.pt")["log"][-1]["step"] == 20


def test_callbacks_see_every_step_log_row_and_epoch(tmp_path):
    seen = {"steps": [], "logs": [], "epochs": []}

    class Record(fastalex.trainer.Callback):
        def on_step(self, trainer, out):
            assert out.logits.shape == (out.labels.shape[0], 4) and not out.logits.requires_grad
            seen["steps"].append((out.step, out.epoch, out.kept, out.loss_sum))

        def on_log(self, trainer, row):
            seen["logs"].append(row["step"])

        def on_epoch_end(self, trainer, row):
            seen["epochs"].append(row["epoch"])

    t = _trainer(tmp_path, epochs=2, log_every=4, callbacks=[Record()])
    t.fit(Blobs(), None)  # noqa: F821
    assert [s[0] for s in seen["steps"]] == list(range(1, 25)) and seen["steps"][12][1] == 1
    assert seen["logs"] == [4, 8, 12, 16, 20, 24] and seen["epochs"] == [1, 2]
    # the per-step losses (device tensors, read only now) add up to the epoch's training loss
    epoch2 = sum(float(s[3]) for s in seen["steps"][12:]) / sum(s[2] for s in seen["steps"][12:])
    assert epoch2 == pytest.approx(t.history[1]["train_loss"], rel=1e-6)
    with pytest.raises(TypeError, match="callbacks must be"):
        _trainer(tmp_path, callbacks=[print])


def test_losses_are_read_back_once_per_sync_not_per_step(tmp_path, monkeypatch):
    """As on a GPU: with a sync every 5 steps the step loop reads no tensor back; a NaN is still
    caught (at its own step number), and no checkpoint after it is written."""
    reads = []

    def guard(name):
        original = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            caller = sys._getframe(1).f_code
            if caller.co_filename.endswith("trainer.py") and caller.co_name in ("_train_step", "_train_epoch"):
                reads.append((caller.co_name, name))
            return original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        guard(name)
    t = _trainer(tmp_path, epochs=1, checkpoint_every=0)  # 12 steps
    t._sync_every = 5
    syncs = []
    real_sync = t._sync
    t._sync = lambda: (syncs.append(len(t._pending)), real_sync())
    t.fit(Blobs(), None)  # noqa: F821
    assert reads == [], "the step loop read tensors back"
    assert [n for n in syncs if n] == [5, 5, 2]  # steps 1-5, 6-10, and 11-12 at the epoch's end

    first_nan = []
    for every in (1, 5):
        out = tmp_path / f"nan{every}"
        t = _trainer(out, epochs=3, lr=10.0, checkpoint_every=7)  # first NaN at step 15
        t._sync_every = every
        with pytest.raises(TrainingDiverged, match="the loss became") as e:
            t.fit(Blobs(), None)  # noqa: F821
        first_nan.append(e.value.step)
        state = ckpt.load(out / "checkpoint.pt")
        assert state["step"] < e.value.step and all(torch.isfinite(v).all() for v in state["model"].values())
    assert first_nan[0] == first_nan[1] > 7


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")  # a test dependency (pyproject's test extra)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = _trainer(tmp_path, epochs=1, log_every=4, callbacks=[fastalex.trainer.TensorBoard(tmp_path / "tb")])
    t.fit(Blobs(), Blobs(32, seed=1))  # noqa: F821
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/images_per_second", "epoch/train_loss", "epoch/val_top1_error"} <= set(tags)
    assert [e.step for e in acc.Scalars("train/loss")] == [4, 8, 12]


def test_max_steps_drop_last_and_no_files(tmp_path, monkeypatch):
    # max_steps inside epoch 2 (12 steps an epoch): stops there with a checkpoint; epoch 1's row only
    t = _trainer(tmp_path / "a", epochs=3, max_steps=17, checkpoint_every=0)
    hist = t.fit(Blobs(), Blobs(32, seed=1))  # noqa: F821
    assert t.step == 17 and len(hist) == 1 and ckpt.load(tmp_path / "a" / "checkpoint.pt")["step"] == 17
    # drop_last: 100 images in batches of 8 are 12 full steps an epoch, not 13
    t = _trainer(tmp_path / "b", epochs=1, drop_last=True, batch_size=8)
    t.fit(Blobs(100), None)  # noqa: F821
    assert t.step == 12
    with pytest.raises(ValueError, match="fewer than one batch"):
        _trainer(tmp_path / "c", epochs=1, drop_last=True, batch_size=128).fit(Blobs(100), None)  # noqa: F821
    # out_dir None: nothing written anywhere
    monkeypatch.chdir(tmp_path / "b")
    before = sorted(p.name for p in (tmp_path / "b").iterdir())
    t = _trainer(None, epochs=1, log_every=3)
    t.fit(Blobs(), Blobs(32, seed=1))  # noqa: F821
    assert t.step == 12 and len(t.state.log) == 4 and sorted(p.name for p in (tmp_path / "b").iterdir()) == before
    with pytest.raises(ValueError, match="needs a path"):
        t.resume()
    with pytest.raises(ValueError, match="max_steps must be"):
        _trainer(None, epochs=1, max_steps=0)


def test_compiled_training_step_matches_eager(tmp_path):
    """Trainer(compile=True): torch.compile'd forward and backward (on the CPU: inductor's C++), the
    same losses and weights as eager to float tolerance; checkpoints hold the plain model's names."""
    torch._dynamo.reset()
    runs = {}
    for mode in (False, True):
        model = small_net()  # noqa: F821
        model[3].p = 0.0  # (compiled dropout draws from inductor's own random stream, not eager's)
        t = Trainer(model, epochs=1, batch_size=8, lr=0.05, out_dir=tmp_path / str(mode), progress=False, seed=7,
                    compile=mode)
        t.fit(Blobs(48), None)  # noqa: F821
        runs[mode] = (t.history[0]["train_loss"], ckpt.load(tmp_path / str(mode) / "checkpoint.pt")["model"])
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-4)
    assert runs[True][1].keys() == runs[False][1].keys()
    for k, v in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][k], v, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="compile must be"):
        _trainer(tmp_path, compile="fast")


def test_any_seed_the_cli_accepts_trains(tmp_path):
    """Seeds up to 2**63 - 1 (the CLI's range): the derived seeds stay valid torch seeds (a seed of
    2**63 - 1 overflowed the per-item seed); small seeds keep their old streams."""
    from fastalex import _seeds

    assert _seeds.item_seed(7, 2, 5) == (7 * 1_000_003 + 2) * 10_000_019 + 5
    for seed in (10**6, 2**63 - 1):
        t = _trainer(tmp_path / str(seed), epochs=1, seed=seed, checkpoint_every=0)
        t.fit(Blobs(16), None)  # noqa: F821
        assert t.step == 2


def test_prefetch_keeps_order_stays_bounded_raises_in_place_and_stops():
    import threading

    from fastalex.trainer import _prefetch

    made = []

    def items(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise KeyError(f"item {i} unreadable")
            made.append(i)
            yield i

    def threads():
        return [t for t in threading.enumerate() if t.name == "fastalex-prefetch"]

    assert list(_prefetch(items(7))) == list(range(7)) and not threads()
    made.clear()
    it = _prefetch(items(100), depth=2)
    assert next(it) == 0
    time.sleep(0.2)
    assert len(made) <= 1 + 2 + 1, made  # the one taken, a full queue, one waiting to be put
    it.close()
    assert not threads() and len(made) < 100
    got = []
    with pytest.raises(KeyError, match="item 3 unreadable"):
        for i in _prefetch(items(10, fail_at=3)):
            got.append(i)
    assert got == [0, 1, 2] and not threads()
    for i in _prefetch(items(100)):  # a loop that breaks drops the generator: the thread stops
        if i == 1:
            break
    assert not threads()


class _Bytes(torch.utils.data.Dataset):
    """uint8 images; items (per-image path, the global RNG under the Trainer's seeding) or batches
    (load_batch / augment_batch, draws from generators seeded alike): the same floats either way."""

    def __init__(self, n=40):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(n) % 4

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i].float() / 255 + 0.1 * torch.randn(3, 1, 1), self.y[i]

    def load_batch(self, seed, epoch, indices, pin_memory=False):
        from fastalex._seeds import item_seed

        noise = torch.stack([0.1 * torch.randn(3, 1, 1, generator=torch.Generator().manual_seed(
            item_seed(seed, epoch, i))) for i in indices])
        return self.x[indices], self.y[indices], noise

    def augment_batch(self, images, noise):
        assert images.dtype == torch.uint8
        return images.float() / 255 + noise.to(images.device)


def test_a_load_batch_dataset_trains_as_its_items_do():
    runs = [_trainer(None, epochs=2, checkpoint_every=0) for _ in range(2)]
    runs[0].fit(_Bytes(), None)
    runs[1].fit(torch.utils.data.Subset(_Bytes(), range(40)), None)  # a Subset has no load_batch: per item
    assert runs[0].step == runs[1].step == 10
    a, b = runs[0].module.state_dict(), runs[1].module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
