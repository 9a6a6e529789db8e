"""fastalex.data.store and `fastalex prepare`: the store against the reference transform chain, pixel for
pixel; resume after a real SIGKILL; unreadable files; --overwrite; training from a store through the
command; the batched path against the per-item one; perf.data on a tiny store and folder."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from launch import child_env
from PIL import Image

from fastalex import cli
from fastalex.data import DataError, ImageFolder, load_for_training, load_image, store
from fastalex.data import transforms as T
from fastalex.data.store import (
    BatchedStore,
    PreparedStore,
    StoreExistsError,
    augment_batch,
    draw_augmentation,
)

CLASSES = ("ant", "bee", "cat")


def _write_folder(root: Path, n_train: int = 20, n_val: int = 6, seed: int = 0) -> Path:
    """root/train/<class>/*.jpg and root/val/...: small smooth JPEGs (60x45, some 45x60, one grey PNG)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            c = CLASSES[i % len(CLASSES)]
            (root / split / c).mkdir(parents=True, exist_ok=True)
            low = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
            size = (45, 60) if i % 4 == 3 else (60, 45)
            img = Image.fromarray(low).resize(size, Image.BICUBIC)
            if i == 5:
                img.convert("L").save(root / split / c / f"{split}_{i:03d}.png")
            else:
                img.save(root / split / c / f"{split}_{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _write_folder(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory):
    dst = tmp_path_factory.mktemp("store") / "s"
    store.prepare(folder, dst, shard_size=8, workers=0, progress=False, log=None)
    return dst


def _reference(path) -> np.ndarray:
    """The reference transform chain's first steps (transforms.py): short side 256, centre 256; CHW."""
    return np.asarray(T.center_crop(T.resize_short_side(load_image(path), 256), 256)).transpose(2, 0, 1)


def _seeded(data, seed: int, epoch: int, i: int):
    """Item i as the Trainer reads it: the global RNG seeded from (seed, epoch, index)."""
    from fastalex.trainer import _Seeded

    return _Seeded(data, seed)[(epoch, i)]


# ---------------------------------------------------------------------------------------------- prepare

def test_prepare_round_trips_pixel_exactly(folder, prepared):
    index = json.loads((prepared / "index.json").read_text())
    assert index["format"] == "fastalex-store" and index["version"] == 1 and index["size"] == 256
    assert index["classes"] == list(CLASSES) and index["layout"] == "NCHW uint8"
    assert {s: v["count"] for s, v in index["splits"].items()} == {"train": 20, "val": 6}
    assert [s["count"] for s in index["splits"]["train"]["shards"]] == [8, 8, 4]
    assert store.verify_store(prepared) == []
    assert not list(prepared.glob("*-0000?.json")) and not (prepared / "plan.json").exists()  # records cleared
    for split in ("train", "val"):
        ref = ImageFolder(folder, split)
        data = PreparedStore(prepared, split)
        assert data.classes == ref.classes and list(data.targets) == ref.targets and len(data) == len(ref)
        for i, (path, label) in enumerate(ref.samples):
            img, y = data[i]
            assert img.dtype == torch.uint8 and img.shape == (3, 256, 256) and y == label
            assert np.array_equal(img.numpy(), _reference(path)), path
        batch, labels = data.read_batch([3, 0, len(data) - 1])
        assert torch.equal(batch, torch.stack([data[3][0], data[0][0], data[len(data) - 1][0]]))
        assert labels.tolist() == [ref.targets[3], ref.targets[0], ref.targets[-1]]


def test_prepare_in_parallel_gives_the_same_store(folder, prepared, tmp_path):
    store.prepare(folder, tmp_path / "p", shard_size=8, workers=2, progress=False, log=None)
    for f in sorted(p.name for p in prepared.iterdir()):
        assert (tmp_path / "p" / f).read_bytes() == (prepared / f).read_bytes(), f


def test_resume_after_sigkill(folder, prepared, tmp_path):
    dst = tmp_path / "s"
    cmd = [sys.executable, "-m", "fastalex", "prepare", str(folder), str(dst), "--shard-size", "8", "--no-progress"]
    # A real SIGKILL of the preparing process once it has collected its first shard (the pool's other
    # worker may be half-way through another: its temporary file must not count).
    p = subprocess.Popen([*cmd, "-j", "2"], env=child_env(FASTALEX_PREPARE_KILL_AFTER="1"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # (the pipes close only when the pool's workers are gone too: they die with their parent)
        _, err = p.communicate(timeout=300)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # anything of this run left behind
        except ProcessLookupError:
            pass
    assert p.returncode == -signal.SIGKILL, err[-2000:]
    assert not (dst / "index.json").exists() and (dst / "plan.json").exists()
    assert len(list(dst.glob("*-0000?.json"))) >= 1
    p = subprocess.run([*cmd, "-j", "1"], env=child_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    kept = int(p.stdout.split(" shards kept")[0].rsplit(" ", 1)[1])
    assert kept >= 1, p.stdout
    for f in sorted(q.name for q in prepared.iterdir()):  # identical to the undisturbed run
        if f == "index.json":
            continue
        assert (dst / f).read_bytes() == (prepared / f).read_bytes(), f
    a, b = (json.loads((d / "index.json").read_text()) for d in (dst, prepared))
    assert a == b
    assert sorted(q.name for q in dst.iterdir()) == sorted(q.name for q in prepared.iterdir())


def test_resume_redoes_a_damaged_shard(folder, tmp_path):
    dst = tmp_path / "s"
    p = subprocess.run([sys.executable, "-m", "fastalex", "prepare", str(folder), str(dst), "--shard-size", "8",
                        "-j", "0", "--no-progress"], env=child_env(FASTALEX_PREPARE_KILL_AFTER="2"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL
    shard = dst / "train-00000.npy"
    good = shard.read_bytes()
    shard.write_bytes(good[:-10] + b"0123456789")  # a disk fault: same size, other bytes
    store.prepare(folder, dst, shard_size=8, workers=0, progress=False, log=None)
    assert shard.read_bytes() == good and store.verify_store(dst) == []


def test_unreadable_images_are_skipped_and_listed(tmp_path):
    src = _write_folder(tmp_path / "src", n_train=9, n_val=3)
    (src / "train" / "bee" / "zz_bad.jpg").write_bytes(b"definitely not a jpeg")
    good = (src / "train" / "ant" / "train_000.jpg").read_bytes()
    (src / "train" / "cat" / "zz_truncated.jpg").write_bytes(good[:len(good) // 2])
    index = store.prepare(src, tmp_path / "s", shard_size=4, workers=0, progress=False, log=None)
    skipped = index["splits"]["train"]["skipped"]
    assert sorted(s["path"] for s in skipped) == [os.path.join("train", "bee", "zz_bad.jpg"),
                                                  os.path.join("train", "cat", "zz_truncated.jpg")]
    assert all("cannot read image" in s["error"] for s in skipped)
    assert index["splits"]["train"]["count"] == 9 and index["splits"]["val"]["skipped"] == []
    data = PreparedStore(tmp_path / "s", "train")
    assert len(data) == 9 and len(data.skipped) == 2
    readable = [(p, y) for p, y in ImageFolder(src, "train").samples if "zz_" not in p]
    for i, (path, label) in enumerate(readable):
        assert np.array_equal(data[i][0].numpy(), _reference(path)) and data[i][1] == label


def test_overwrite_is_required(folder, prepared, tmp_path, capsys):
    with pytest.raises(StoreExistsError, match="already holds a prepared store"):
        store.prepare(folder, prepared, workers=0, progress=False, log=None)
    before = (prepared / "index.json").read_bytes()
    assert cli.main(["prepare", str(folder), str(prepared), "-j", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds a prepared store (index.json); pass --overwrite" in err
    assert (prepared / "index.json").read_bytes() == before
    dst = tmp_path / "again"
    store.prepare(folder, dst, shard_size=8, workers=0, progress=False, log=None)
    assert cli.main(["prepare", str(folder), str(dst), "-j", "0", "--no-progress", "--shard-size", "8",
                     "--overwrite"]) == 0
    assert (dst / "index.json").read_bytes() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StoreExistsError, match="holds other files"):
        store.prepare(folder, other, workers=0, progress=False, log=None)
    assert (other / "notes.txt").read_text() == "mine"


def test_an_unfinished_store_of_other_settings_is_not_continued(folder, tmp_path):
    dst = tmp_path / "s"
    p = subprocess.run([sys.executable, "-m", "fastalex", "prepare", str(folder), str(dst), "--shard-size", "8",
                        "-j", "0", "--no-progress"], env=child_env(FASTALEX_PREPARE_KILL_AFTER="1"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL
    with pytest.raises(StoreExistsError, match="unfinished store of another source or other settings"):
        store.prepare(folder, dst, shard_size=4, workers=0, progress=False, log=None)
    store.prepare(folder, dst, shard_size=4, workers=0, progress=False, log=None, overwrite=True)
    assert store.verify_store(dst) == []


@pytest.mark.parametrize("argv,msg", [
    (["prepare", "/nonexistent/imagenet", "DST"], "source folder /nonexistent/imagenet does not exist"),
    (["prepare", "SRC", "DST", "--shard-size", "0"], "--shard-size must be at least 1"),
    (["prepare", "SRC", "DST", "-j", "-1"], "--workers must be at least 0"),
])
def test_prepare_messages(argv, msg, folder, tmp_path, capsys):
    argv = [str(folder) if a == "SRC" else str(tmp_path / "d") if a == "DST" else a for a in argv]
    assert cli.main(argv) == 2
    assert msg in capsys.readouterr().err


def test_train_only_folder(tmp_path):
    src = _write_folder(tmp_path / "src", n_train=6, n_val=0)
    index = store.prepare(src, tmp_path / "s", workers=0, progress=False, log=None)
    assert list(index["splits"]) == ["train"] and index["splits"]["train"]["count"] == 6
    with pytest.raises(FileNotFoundError, match="has no 'val' split"):
        PreparedStore(tmp_path / "s", "val")
    with pytest.raises(FileNotFoundError, match="has no val split"):
        store.load_for_training(tmp_path / "s", image_size=32)
    with pytest.raises(DataError, match="larger than the store.s 256x256"):
        PreparedStore(tmp_path / "s", "train", "train", 257)


# ---------------------------------------------------------------------------------------------- reading

def test_items_equal_the_image_folder_items(folder, prepared):
    """The same (seed, epoch, index) gives the same pixels from the store as from the folder."""
    a = store.load_for_training(prepared, image_size=32, subset=7, ten_crop=True)
    b = load_for_training("imagefolder", folder, image_size=32, subset=7, ten_crop=True)
    assert a[3] == b[3] and [len(d) for d in a[:3]] == [len(d) for d in b[:3]] == [7, 6, 6]
    for i in range(7):
        for epoch in (0, 3):
            xa, ya = _seeded(a[0], 5, epoch, i)
            xb, yb = _seeded(b[0], 5, epoch, i)
            assert xa.shape == (3, 32, 32) and ya == yb and torch.equal(xa, xb), (i, epoch)
    for i in range(6):
        assert torch.equal(a[1][i][0], b[1][i][0]) and a[1][i][1] == b[1][i][1]
        assert a[2][i][0].shape == (10, 3, 32, 32) and torch.equal(a[2][i][0], b[2][i][0])
    plain = store.load_for_training(prepared, image_size=32, augment=False)[0]
    assert torch.equal(plain[4][0], load_for_training("imagefolder", folder, image_size=32, augment=False)[0][4][0])


def test_item_seed_is_the_trainers():
    from fastalex import trainer

    if not hasattr(trainer, "_Seeded"):
        pytest.skip("fastalex.trainer has no _Seeded: check store.item_seed against the new Trainer's contract")

    class Draw(torch.utils.data.Dataset):
        def __len__(self):
            return 100

        def __getitem__(self, i):
            return torch.randint(0, 2 ** 62, (2,))

    for seed, epoch, i in ((0, 0, 0), (3, 7, 41), (900_000, 2, 99)):
        want = torch.randint(0, 2 ** 62, (2,), generator=torch.Generator().manual_seed(store.item_seed(seed, epoch, i)))
        assert torch.equal(trainer._Seeded(Draw(), seed)[(epoch, i)], want)


def test_batched_path_equals_the_items(prepared):
    data = PreparedStore(prepared, "train")
    train = PreparedStore(prepared, "train", "train", (32, 40))
    idx = [11, 0, 19, 4, 4]
    images, labels = data.read_batch(idx)
    draws = draw_augmentation(9, 2, idx, (32, 40), data.size)
    x = augment_batch(images, draws, (32, 40))
    assert x.shape == (5, 3, 32, 40) and x.dtype == torch.float32
    assert torch.equal(x, torch.stack([_seeded(train, 9, 2, i)[0] for i in idx]))
    assert labels.tolist() == [int(data.targets[i]) for i in idx]
    ev = PreparedStore(prepared, "train", "eval", 32)
    assert torch.equal(augment_batch(images, None, 32), torch.stack([ev[i][0] for i in idx]))
    tc = PreparedStore(prepared, "train", "ten_crop", 32)
    assert torch.equal(augment_batch(images, None, 32, ten_crop=True), torch.stack([tc[i][0] for i in idx]))
    # into a given buffer; and the same on the "meta" device (no CPU tensor on the way)
    buf = torch.full((5, 3, 32, 40), float("nan"))
    assert augment_batch(images, draws, (32, 40), out=buf) is buf and torch.equal(buf, x)
    meta = augment_batch(images.to("meta"), draws, (32, 40))
    assert meta.device.type == "meta" and meta.shape == x.shape
    with pytest.raises(ValueError, match="draws are for 5 images, the batch has 2"):
        augment_batch(images[:2], draws, 32)
    with pytest.raises(ValueError, match="uint8"):
        augment_batch(images.float(), draws, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_path_on_cuda_equals_the_cpu(prepared):
    data = PreparedStore(prepared, "train")
    idx = list(range(len(data)))
    images, _ = data.read_batch(idx)
    assert images.is_pinned()
    draws = draw_augmentation(1, 0, idx, 32, data.size)
    assert torch.equal(augment_batch(images, draws, 32, device="cuda").cpu(), augment_batch(images, draws, 32))
    assert torch.equal(augment_batch(images, None, 32, device="cuda").cpu(), augment_batch(images, None, 32))


def _trainer_batches(data, seed: int = 0, epoch: int = 0, batch_size: int = 6, start: int = 0):
    """One epoch of a BatchedStore as the Trainer reads it: its order, the reader thread, augment_batch."""
    from fastalex.trainer import _device_batches, _EpochBatches

    batches = _EpochBatches(len(data), batch_size, seed, epoch, start)
    return list(_device_batches(data, batches, seed, torch.device("cpu")))


def test_trainer_batches_are_deterministic_and_equal_the_items(prepared):
    from fastalex.trainer import _EpochBatches

    data = store.load_for_training(prepared, image_size=32)[0]
    assert isinstance(data, BatchedStore) and len(data) == 20

    def batches(seed, epoch=0):
        return [(x.clone(), y) for x, y in _trainer_batches(data, seed, epoch)]

    a, b, c, d = batches(0), batches(0), batches(1), batches(0, epoch=1)
    assert [x.shape[0] for x, _ in a] == [6, 6, 6, 2]
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(a, b))
    for other in (c, d):
        assert not all(torch.equal(x, x2) for (x, _), (x2, _) in zip(a, other))
    # the Trainer's order, each image as PreparedStore(mode="train") under its seeding
    train = PreparedStore(prepared, "train", "train", 32)
    for (x, y), keys in zip(a, _EpochBatches(20, 6, 0, 0)):
        order = [i for _, i in keys]
        assert torch.equal(x, torch.stack([_seeded(train, 0, 0, i)[0] for i in order]))
        assert y.tolist() == [int(train.targets[i]) for i in order]
    # from a step on (a resumed epoch): the same batches
    assert all(torch.equal(x, x2) for (x, _), (x2, _) in zip(a[2:], _trainer_batches(data, 0, 0, start=2)))
    # without augmentation: the centre crops
    plain = store.load_for_training(prepared, image_size=32, augment=False)[0]
    ev = PreparedStore(prepared, "train", "eval", 32)
    for (x, _), keys in zip(_trainer_batches(plain), _EpochBatches(20, 6, 0, 0)):
        assert torch.equal(x, torch.stack([ev[i][0] for _, i in keys]))
    # a batch the caller keeps is never overwritten by the reused buffers
    kept = [x for x, _ in _trainer_batches(data)]
    assert all(torch.equal(k, x) for k, (x, _) in zip(kept, a))


def test_a_subset_reads_its_items_with_draws_by_position(prepared):
    data = store.load_for_training(prepared, image_size=(32, 40), subset=7)[0]
    items = torch.utils.data.Subset(PreparedStore(prepared, "train", "train", (32, 40)), data.indices)
    assert len(data) == 7 and data.indices == sorted(data.indices) and len(set(data.indices)) == 7
    assert list(data.targets) == [int(items.dataset.targets[i]) for i in data.indices]
    images, labels, draws = data.load_batch(3, 1, [6, 0, 2])
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 256, 256) and not images.is_pinned()
    x = data.augment_batch(images, draws)
    assert x.dtype == torch.float32 and x.shape == (3, 3, 32, 40)
    assert torch.equal(x, torch.stack([_seeded(items, 3, 1, p)[0] for p in (6, 0, 2)]))
    assert labels.tolist() == [_seeded(items, 3, 1, p)[1] for p in (6, 0, 2)]
    assert torch.equal(_seeded(data, 3, 1, 6)[0], x[0]) and _seeded(data, 3, 1, 6)[1] == labels[0]  # (its items)
    with pytest.raises(ValueError, match="items must be a PreparedStore of mode 'train' or 'eval'"):
        BatchedStore(PreparedStore(prepared, "train"))


def test_dataset_pickles_without_its_memory_maps(prepared):
    import pickle

    data = PreparedStore(prepared, "train", "eval", 32)
    first = data[0][0]
    copy = pickle.loads(pickle.dumps(data))
    assert copy._shards is None and torch.equal(copy[0][0], first)
    assert len(pickle.dumps(data)) < 10_000


# ---------------------------------------------------------------------------------------------- training, perf

def _net():
    torch.manual_seed(3)  # dropout: the reader thread must leave its random stream alone
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Dropout(0.3), torch.nn.Linear(4 * 8 * 8, 3))


def _fit(data, out=None, resume=False, **kw):
    from fastalex import Trainer

    t = Trainer(_net(), **dict(dict(epochs=2, batch_size=4, lr=0.05, out_dir=out, progress=False, seed=5), **kw))
    if resume:
        t.resume()
    t.fit(data)
    return t


def _prefetch_threads():
    import threading

    return [t for t in threading.enumerate() if t.name == "fastalex-prefetch"]


def test_trainer_on_the_batched_store_equals_the_per_item_path_and_resumes_exactly(prepared, tmp_path):
    batched = store.load_for_training(prepared, image_size=32, subset=14)[0]
    items = torch.utils.data.Subset(PreparedStore(prepared, "train", "train", 32), batched.indices)
    a, b = _fit(batched), _fit(items)
    assert a.step == b.step == 8
    wa, wb = a.module.state_dict(), b.module.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # stopped mid-epoch (a checkpoint at step 5, the prefetch thread left running ahead), then resumed
    stopped = _fit(batched, tmp_path, max_steps=5)
    assert stopped.step == 5 and not _prefetch_threads()
    resumed = _fit(batched, tmp_path, resume=True)
    assert resumed.step == 8
    wr = resumed.module.state_dict()
    assert all(torch.equal(wa[k], wr[k]) for k in wa)


def test_the_step_gets_uint8_batches_read_on_the_reader_thread(prepared):
    import threading

    seen = []

    class Recorded(BatchedStore):
        def load_batch(self, seed, epoch, positions, pin_memory=False):
            out = super().load_batch(seed, epoch, positions, pin_memory)
            seen.append(("load", threading.current_thread().name, out[0].dtype, tuple(out[0].shape)))
            return out

        def augment_batch(self, images, draws):
            seen.append(("augment", threading.current_thread().name, images.dtype, tuple(images.shape)))
            return super().augment_batch(images, draws)

    data = Recorded(PreparedStore(prepared, "train", "train", 32))
    _fit(data, epochs=1)
    assert [k for k, *_ in seen].count("load") == [k for k, *_ in seen].count("augment") == 5
    for kind, thread, dtype, shape in seen:
        assert dtype == torch.uint8 and shape[1:] == (3, 256, 256)
        assert thread == ("fastalex-prefetch" if kind == "load" else "MainThread"), (kind, thread)


def test_a_read_error_on_the_reader_thread_reaches_fit(prepared):
    data = store.load_for_training(prepared, image_size=32)[0]
    read, calls = data.items.read_batch, []

    def failing(indices, **kw):
        calls.append(len(indices))
        if len(calls) == 3:
            raise OSError("disk gone")
        return read(indices, **kw)

    data.items.read_batch = failing
    from fastalex import Trainer

    t = Trainer(_net(), epochs=1, batch_size=4, lr=0.05, out_dir=None, progress=False, seed=5)
    with pytest.raises(OSError, match="disk gone"):
        t.fit(data)
    assert t.step == 2 and len(calls) == 3 and not _prefetch_threads()


def test_train_from_the_store_through_the_command(prepared, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastalex", "train", "--dataset", "imagefolder", "--data", str(prepared), "--out",
           str(out), "--variant", "single", "--image-size", "67", "--epochs", "1", "-b", "4", "--subset", "8",
           "--backend", "torch", "--no-progress", "--init", "kaiming"]
    p = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    final = json.loads((out / "final.json").read_text())
    assert final["epochs"] == 1 and final["steps"] == 2 and final["test_images"] == 6
    assert final["image_size"] == [67, 67] and 0.0 <= final["test_top1"] <= final["test_top5"] <= 1.0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["class_names"] == list(CLASSES)
    assert state["args"]["workers"] == cli.default_workers("imagefolder")  # (the validation's DataLoader)


def test_perf_data_smoke(folder, prepared, tmp_path):
    from perf import data as perf_data

    for src, kind, stages in ((prepared, "store", ("read", "augment", "copy", "loader")),
                              (folder, "imagefolder", ("decode", "augment", "copy", "loader"))):
        path = tmp_path / f"{kind}.json"
        assert perf_data.main(["--data", str(src), "--json", str(path), "--batches", "2", "-b", "4",
                               "--image-size", "32", "--workers", "0"]) == 0
        res = json.loads(path.read_text())
        assert res["kind"] == kind and tuple(res["stages"]) == stages and res["images_per_second"] > 0
        for name in stages:
            st = res["stages"][name]
            if name == "copy" and not torch.cuda.is_available():
                assert st is None
            else:
                assert st["images"] == 8 and st["seconds"] > 0 and st["images_per_second"] > 0, name
        for key in ("data", "device", "batch_size", "image_size", "environment"):
            assert key in res
