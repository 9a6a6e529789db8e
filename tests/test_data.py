"""fastalex.data: IDX files (Debian's real ones and synthetic/corrupt ones written here), where
Fashion-MNIST is looked for, the download (against a local HTTP server), the Dataset (values,
augmentation, subsets, DataLoader workers) and ImageFolder on a tiny tree of images."""

import gzip
import hashlib
import http.server
import pickle
import re
import struct
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from PIL import Image
from torch.utils.data import DataLoader

import fastalex.data.fashion_mnist as fm
from fastalex.data import (
    CLASSES, ChecksumError, DataError, DatasetNotFoundError, FashionMNIST, IDXError, ImageFolder,
    UnreadableImageError, collate_skip_unreadable, find_fashion_mnist, load_fashion_mnist, load_for_training,
    parse_idx, read_idx,
)
from fastalex.data import transforms as T

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
needs_debian = pytest.mark.skipif(not (DEBIAN / "t10k-labels-idx1-ubyte.gz").is_file(),
                                  reason="Debian's dataset-fashion-mnist is not installed (apt-get install "
                                         "dataset-fashion-mnist; .ci/run does)")
NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ---------------------------------------------------------------------------------------------- helpers

def idx_bytes(a: np.ndarray, code: int | None = None) -> bytes:
    """An IDX file written by hand (independent of fastalex's reader)."""
    codes = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}
    code = codes[a.dtype.kind + str(a.dtype.itemsize)] if code is None else code
    head = bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    return head + a.astype(a.dtype.newbyteorder(">")).tobytes()


def synthetic(n_train=12, n_test=6, size=28, seed=0):
    rng = np.random.default_rng(seed)
    return {"train": (rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
                      rng.integers(0, 10, n_train).astype(np.uint8)),
            "t10k": (rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
                     rng.integers(0, 10, n_test).astype(np.uint8))}


def write_dataset(folder: Path, arrays=None, gz=True) -> dict:
    """The four files in folder; returns {file name: bytes written}."""
    arrays = arrays or synthetic()
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, (images, labels) in arrays.items():
        for kind, a in (("images-idx3", images), ("labels-idx1", labels)):
            name, data = f"{split}-{kind}-ubyte", idx_bytes(a)
            if gz:
                name, data = name + ".gz", gzip.compress(data, mtime=0)
            (folder / name).write_bytes(data)
            written[name] = data
    return written


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No $FASTALEX_DATA, no system folder, a cache under tmp_path, no network unless a test serves one."""
    monkeypatch.delenv("FASTALEX_DATA", raising=False)
    monkeypatch.delenv("FASTALEX_FASHION_MNIST_URL", raising=False)
    monkeypatch.setenv("FASTALEX_CACHE", str(tmp_path / "cache-root"))
    monkeypatch.setattr(fm, "SYSTEM_DIRS", (tmp_path / "system",))
    monkeypatch.setattr(fm, "MIRRORS", ("http://127.0.0.1:9/never/",))  # discard port: refused at once
    return tmp_path


class Server:
    """http.server on 127.0.0.1 (ephemeral port) in a thread, serving `files` at /<name>."""

    def __init__(self, files: dict):
        self.files, self.requests, self.release = dict(files), [], threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                if self.path.startswith("/slow/"):  # never answers; bounded: teardown releases it at once
                    server.release.wait(10)
                    return
                name = self.path.rsplit("/", 1)[-1]
                if self.path.startswith("/missing/") or name not in server.files:
                    self.send_error(404)
                    return
                body = server.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def served(tmp_path):
    files = write_dataset(tmp_path / "served")
    server = Server(files)
    yield server, {name: hashlib.md5(data).hexdigest() for name, data in files.items()}
    server.close()


# ---------------------------------------------------------------------------------------------- IDX files

@needs_debian
def test_debian_files_are_the_official_fashion_mnist():
    for base in NAMES:
        raw = gzip.decompress((DEBIAN / f"{base}.gz").read_bytes())
        assert hashlib.md5(raw).hexdigest() == fm.RAW_MD5[base], base
    images, labels = load_fashion_mnist("train", DEBIAN)
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [6000] * 10
    images, labels = load_fashion_mnist("test", DEBIAN)
    assert images.shape == (10000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10
    assert labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]  # the test set's first labels
    assert 0.0 < images.mean() / 255 < 0.5 and images.max() == 255 and images.min() == 0


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, dtype, gz):
    rng = np.random.default_rng(1)
    for shape in [(7,), (3, 5), (2, 3, 4), (2, 1, 2, 3)]:
        a = (rng.standard_normal(shape) * 100).astype(dtype)
        data = idx_bytes(a)
        path = tmp_path / f"a{len(shape)}.idx"
        path.write_bytes(gzip.compress(data) if gz else data)
        got = read_idx(path)
        assert got.shape == shape and got.dtype == np.dtype(dtype).newbyteorder("=")
        np.testing.assert_array_equal(got, a)
        assert got.flags.writeable and got.dtype.isnative


GOOD = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
CORRUPT = {
    "empty": (b"", "shorter than the 4-byte magic"),
    "bad magic": (b"\x01\x00" + GOOD[2:], "magic number 0x0100"),
    "unknown type": (b"\x00\x00\x07\x03" + GOOD[4:], "magic number 0x00000703"),
    "no dimensions": (b"\x00\x00\x08\x00", "magic number 0x00000800"),
    "header cut": (GOOD[:10], "truncated IDX header"),
    "data cut": (GOOD[:-1], "truncated: shape (2, 3, 4)"),
    "trailing bytes": (GOOD + b"\x00", "trailing bytes"),
    "gzip garbage": (b"\x1f\x8b" + b"\x00" * 30, "corrupt gzip"),
    "gzip cut": (gzip.compress(GOOD)[:-12], "corrupt gzip"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_idx_is_a_clear_error(tmp_path, case):
    data, message = CORRUPT[case]
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(data)
    with pytest.raises(IDXError, match=re.escape(message)) as e:
        read_idx(path)
    assert str(path) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_parse_idx_values_are_big_endian():
    data = bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 2) + struct.pack(">ii", 1, -2)
    assert parse_idx(data).tolist() == [1, -2]


@pytest.mark.parametrize("defect,message", [
    ("labels 2-D", "expected uint8 labels"), ("images 2-D", "expected uint8 images"),
    ("counts differ", "has 12 images but"), ("label 10", "label 10 is out of range"),
])
def test_fashion_mnist_file_kinds_are_checked(tmp_path, defect, message):
    arrays = synthetic()
    images, labels = arrays["train"]
    if defect == "labels 2-D":
        labels = labels.reshape(3, 4)
    elif defect == "images 2-D":
        images = images.reshape(12, -1)
    elif defect == "counts differ":
        labels = labels[:-1]
    else:
        labels = labels.copy()
        labels[3] = 10
    arrays["train"] = (images, labels)
    write_dataset(tmp_path, arrays)
    with pytest.raises(IDXError, match=message):
        load_fashion_mnist("train", tmp_path)


def test_load_fashion_mnist_gz_and_raw(tmp_path):
    arrays = synthetic()
    write_dataset(tmp_path / "gz", arrays, gz=True)
    write_dataset(tmp_path / "raw", arrays, gz=False)
    for folder in ("gz", "raw"):
        for split, key in (("train", "train"), ("test", "t10k"), ("t10k", "t10k")):
            images, labels = load_fashion_mnist(split, tmp_path / folder)
            np.testing.assert_array_equal(images, arrays[key][0])
            np.testing.assert_array_equal(labels, arrays[key][1])
    with pytest.raises(ValueError, match="split must be"):
        load_fashion_mnist("val", tmp_path / "gz")
    assert CLASSES[0] == "T-shirt/top" and CLASSES[9] == "Ankle boot" and len(CLASSES) == 10


# ---------------------------------------------------------------------------------------------- search order

def test_search_order(isolated, monkeypatch):
    tmp = isolated
    for name in ("explicit", "env", "system", "cache-root/fashion-mnist"):
        write_dataset(tmp / name)
    monkeypatch.setenv("FASTALEX_DATA", str(tmp / "env"))
    assert find_fashion_mnist(tmp / "explicit") == tmp / "explicit"
    assert find_fashion_mnist(str(tmp / "explicit")) == tmp / "explicit"
    assert find_fashion_mnist() == tmp / "env"
    monkeypatch.delenv("FASTALEX_DATA")
    assert find_fashion_mnist() == tmp / "system"
    monkeypatch.setattr(fm, "SYSTEM_DIRS", (tmp / "nowhere",))
    assert find_fashion_mnist(download=False) == tmp / "cache-root" / "fashion-mnist"
    assert find_fashion_mnist(cache_dir=tmp / "explicit", download=False) == tmp / "explicit"


@pytest.mark.parametrize("sub", ["fashion-mnist", "FashionMNIST/raw"])
def test_data_folder_layouts(isolated, sub):
    write_dataset(isolated / "root" / sub, gz=False)
    assert find_fashion_mnist(isolated / "root") == isolated / "root" / sub


@pytest.mark.parametrize("how", ["explicit", "env"])
def test_named_folder_without_files_does_not_fall_back(isolated, monkeypatch, how):
    write_dataset(isolated / "system")  # would be found, but the user named another folder
    partial = isolated / "partial"
    write_dataset(partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    if how == "env":
        monkeypatch.setenv("FASTALEX_DATA", str(partial))
    with pytest.raises(DatasetNotFoundError) as e:
        find_fashion_mnist(partial if how == "explicit" else None)
    msg = str(e.value)
    assert str(partial) in msg and "t10k-labels-idx1-ubyte" in msg and "train-images-idx3-ubyte" not in msg.split(
        "missing in")[1].split(")")[0]
    assert "apt-get install dataset-fashion-mnist" in msg and "--data DIR" in msg and "$FASTALEX_DATA" in msg
    assert ("FASTALEX_DATA" in msg.split(str(partial))[0]) == (how == "env")
    with pytest.raises(DatasetNotFoundError, match="is not a folder"):
        find_fashion_mnist(isolated / "no-such-folder")


def test_nothing_found_names_every_place(isolated):
    with pytest.raises(DatasetNotFoundError) as e:
        find_fashion_mnist(download=False)
    msg = str(e.value)
    for part in ("--data DIR", "$FASTALEX_DATA not set", str(isolated / "system"),
                 str(isolated / "cache-root" / "fashion-mnist"), "download=False",
                 "apt-get install dataset-fashion-mnist"):
        assert part in msg, part
    assert isinstance(e.value, FileNotFoundError)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTALEX_CACHE", str(tmp_path / "c"))
    assert fm.default_cache_dir() == tmp_path / "c" / "fashion-mnist"
    monkeypatch.delenv("FASTALEX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert fm.default_cache_dir() == tmp_path / "x" / "fastalex" / "fashion-mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert fm.default_cache_dir() == Path.home() / ".cache" / "fastalex" / "fashion-mnist"


# ---------------------------------------------------------------------------------------------- download

def test_download_verifies_and_caches(isolated, served):
    server, md5 = served
    cache = isolated / "dl"
    got = find_fashion_mnist(cache_dir=cache, base_url=server.url, checksums=md5, timeout=5, verbose=False)
    assert got == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted(server.files)  # no temporary files left
    for name, data in server.files.items():
        assert (cache / name).read_bytes() == data
    assert len(server.requests) == 4
    images, _ = load_fashion_mnist("train", cache_dir=cache, download=False)
    np.testing.assert_array_equal(images, synthetic()["train"][0])
    assert find_fashion_mnist(cache_dir=cache, base_url=server.url, checksums=md5) == cache
    assert len(server.requests) == 4  # cached: no new request


def test_download_only_missing_files_and_env_url(isolated, served, monkeypatch):
    server, md5 = served
    cache = isolated / "dl"
    cache.mkdir()
    (cache / "train-images-idx3-ubyte.gz").write_bytes(server.files["train-images-idx3-ubyte.gz"])
    monkeypatch.setenv("FASTALEX_FASHION_MNIST_URL", server.url.rstrip("/"))  # no trailing slash: still fine
    assert find_fashion_mnist(cache_dir=cache, checksums=md5, timeout=5, verbose=False) == cache
    assert sorted(server.requests) == sorted(f"/{n}" for n in server.files if not n.startswith("train-images"))


def test_checksum_mismatch_is_an_error_and_leaves_no_file(isolated, served):
    server, md5 = served
    cache = isolated / "dl"
    wrong = dict(md5, **{"train-labels-idx1-ubyte.gz": "0" * 32})
    with pytest.raises(ChecksumError) as e:
        find_fashion_mnist(cache_dir=cache, base_url=server.url, checksums=wrong, timeout=5, verbose=False)
    msg = str(e.value)
    assert "checksum mismatch" in msg and "train-labels-idx1-ubyte.gz" in msg
    assert md5["train-labels-idx1-ubyte.gz"] in msg
    assert "0" * 32 in msg and "apt-get install dataset-fashion-mnist" in msg
    left = sorted(p.name for p in cache.iterdir())
    assert left == ["train-images-idx3-ubyte.gz"]  # verified before it; nothing partial, nothing wrong


def test_checksum_mismatch_on_one_mirror_tries_the_next(isolated, served):
    server, md5 = served
    bad = Server({n: b"not the file" for n in server.files})
    try:
        got = find_fashion_mnist(cache_dir=isolated / "dl", base_url=[bad.url, server.url], checksums=md5,
                                 timeout=5, verbose=False)
    finally:
        bad.close()
    assert got == isolated / "dl" and len(bad.requests) == 4 and len(server.requests) == 4
    assert sorted(p.name for p in got.iterdir()) == sorted(server.files)


def test_download_failure_names_every_place(isolated, served):
    server, md5 = served
    with pytest.raises(DatasetNotFoundError) as e:
        find_fashion_mnist(cache_dir=isolated / "dl", base_url=server.url + "missing/", checksums=md5, timeout=5,
                           verbose=False)
    msg = str(e.value)
    for part in ("--data DIR", "$FASTALEX_DATA not set", str(isolated / "system"), str(isolated / "dl"),
                 server.url + "missing/train-images-idx3-ubyte.gz", "404", "apt-get install dataset-fashion-mnist"):
        assert part in msg, part
    assert not any((isolated / "dl").iterdir())


def test_download_timeout_is_bounded(isolated, served):
    server, md5 = served
    start = time.monotonic()
    with pytest.raises(DatasetNotFoundError, match="timed out"):
        find_fashion_mnist(cache_dir=isolated / "dl", base_url=server.url + "slow/", checksums=md5, timeout=0.3,
                           verbose=False)
    assert time.monotonic() - start < 5


def test_download_prints_what_it_fetches(isolated, served, capsys):
    server, md5 = served
    find_fashion_mnist(cache_dir=isolated / "dl", base_url=server.url, checksums=md5, timeout=5)
    err = capsys.readouterr().err
    assert f"downloading {server.url}train-images-idx3-ubyte.gz" in err and str(isolated / "dl") in err


# ---------------------------------------------------------------------------------------------- the Dataset

def _reference(img: np.ndarray, size, mean, std) -> torch.Tensor:
    """/255, bilinear resize (antialiased when shrinking), 3 channels, normalise: the plain order, in float64."""
    x = torch.from_numpy(img).double().div(255)[None, None]
    if tuple(size) != img.shape:
        x = TF.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=min(size) < 28)
    x = x[0].expand(3, -1, -1)
    return ((x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)).float()


@pytest.mark.parametrize("size,mean,std", [
    (227, fm.MEAN, fm.STD), ((40, 50), fm.MEAN, fm.STD), (28, fm.MEAN, fm.STD),
    (63, T.IMAGENET_MEAN, T.IMAGENET_STD), (20, 0.5, 0.25),
])
def test_dataset_values(tmp_path, size, mean, std):
    arrays = synthetic()
    write_dataset(tmp_path, arrays)
    ds = FashionMNIST("test", tmp_path, image_size=size, mean=mean, std=std)
    hw = (size, size) if isinstance(size, int) else size
    assert len(ds) == 6 and ds.image_size == hw and ds.classes == list(CLASSES)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, *hw) and x.dtype == torch.float32 and x.is_contiguous()
        assert isinstance(y, int) and y == arrays["t10k"][1][i]
        ref = _reference(arrays["t10k"][0][i], hw, np.broadcast_to(mean, 3).tolist(), np.broadcast_to(std, 3).tolist())
        torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-5)  # float32 resize weights vs float64
    xb, yb = ds.batch([4, 0, 2])
    torch.testing.assert_close(xb, torch.stack([ds[4][0], ds[0][0], ds[2][0]]), atol=0, rtol=0)
    assert yb.tolist() == [arrays["t10k"][1][i] for i in (4, 0, 2)] and yb.dtype == torch.int64


@pytest.mark.parametrize("size", [67, 227, 28, 20])
def test_get_batch_is_the_per_image_path_bit_for_bit(size):
    images = np.random.default_rng(3).integers(0, 256, (37, 28, 28), dtype=np.uint8)
    ds = FashionMNIST.from_arrays(images, np.arange(37) % 10, image_size=size)
    order = [int(i) for i in torch.randperm(37)]
    x, y = ds.get_batch(0, order)
    assert x.shape == (37, 3, size, size) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.dtype == torch.int64 and y.tolist() == [i % 10 for i in order]
    assert torch.equal(x, torch.stack([ds[i][0] for i in order]))  # each image resized alone: the same bits
    assert torch.equal(ds.get_batch(3, order)[0], x)  # no augmentation: every epoch the same
    for kwargs in ({"augment": True}, {"ten_crop": True}):  # the Trainer keeps its per-image path for these
        other = FashionMNIST.from_arrays(images, np.zeros(37, np.int64), image_size=size, **kwargs)
        assert not hasattr(other, "get_batch")
        with pytest.raises(AttributeError, match="only without augment and ten_crop"):
            other.get_batch(0, [0])


def test_trainer_trains_the_same_through_get_batch_and_per_image(tmp_path):
    from fastalex import Trainer

    class PerImage(torch.utils.data.Dataset):  # the dataset without get_batch: the DataLoader path
        def __init__(self, data):
            self.data = data

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            return self.data[i]

    images = np.random.default_rng(5).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    ds = FashionMNIST.from_arrays(images, np.arange(20) % 10, image_size=12)
    sizes, batch = [], ds.batch
    ds.batch = lambda indices, generator=None: (sizes.append(len(indices)), batch(indices, generator))[1]
    weights = []
    for data in (ds, PerImage(ds)):
        sizes.clear()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 12, 10))
        trainer = Trainer(model, epochs=2, batch_size=8, lr=0.1, lr_schedule="cosine", device="cpu", out_dir=None,
                          progress=False)
        trainer.fit(data)  # 2 epochs of 3 batches, the last of each 4 images
        assert trainer.step == 6 and sizes == ([8, 8, 4] * 2 if data is ds else [1] * 40)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_dataset_augmentation_is_a_shift_and_flip(tmp_path):
    images = np.random.default_rng(2).integers(1, 256, (4, 28, 28), dtype=np.uint8)  # no zeros: padding shows
    ds = FashionMNIST.from_arrays(images, np.arange(4), image_size=28, augment=True, pad=2, mean=0.0, std=1.0)
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    # candidates[i, k]: image i shifted by (t, l) = divmod(k // 2, 5), flipped if k is odd
    candidates = np.stack([np.stack([c for t in range(5) for l in range(5)
                                     for c in (p[t:t + 28, l:l + 28], p[t:t + 28, l:l + 28][:, ::-1])])
                           for p in padded])
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        x, y = ds.batch(range(4), generator=g)
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
        got = (x[:, 0] * 255).round().to(torch.uint8).numpy()
        for i in range(4):
            (matches,) = np.nonzero((candidates[i] == got[i]).all(axis=(1, 2)))
            assert len(matches) == 1, matches
            seen.add(int(matches[0]))
    assert len(seen) == 50  # every shift, flipped and not
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(ds.batch(range(4), g1)[0], ds.batch(range(4), g2)[0])
    plain = FashionMNIST.from_arrays(images, np.arange(4), image_size=28, augment=True, pad=0, flip=False)
    assert torch.equal(plain.batch(range(4))[0], FashionMNIST.from_arrays(images, np.arange(4),
                                                                          image_size=28).batch(range(4))[0])


def test_dataset_ten_crop(tmp_path):
    images = np.random.default_rng(4).integers(1, 256, (3, 28, 28), dtype=np.uint8)
    ds = FashionMNIST.from_arrays(images, np.arange(3), image_size=28, ten_crop=True, pad=2, mean=0.0, std=1.0)
    x, y = ds.batch(range(3))
    assert x.shape == (3, 10, 3, 28, 28) and y.tolist() == [0, 1, 2] and ds[1][0].shape == (10, 3, 28, 28)
    got = (x[:, :, 0] * 255).round().to(torch.uint8)
    padded = torch.from_numpy(np.pad(images, ((0, 0), (2, 2), (2, 2))))
    for i in range(3):  # corners of the padded image = the extreme shifts; the centre = the image itself
        five = [padded[i, :28, :28], padded[i, :28, 4:], padded[i, 4:, :28], padded[i, 4:, 4:],
                torch.from_numpy(images[i])]
        for k in range(5):
            assert torch.equal(got[i, k], five[k]) and torch.equal(got[i, 5 + k], five[k].flip(-1))
    big = FashionMNIST.from_arrays(images, np.arange(3), image_size=40, ten_crop=True)
    plain = FashionMNIST.from_arrays(images, np.arange(3), image_size=40)
    torch.testing.assert_close(big[2][0][4], plain[2][0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="exclude each other"):
        FashionMNIST.from_arrays(images, np.arange(3), augment=True, ten_crop=True)


def test_dataset_subset(tmp_path):
    write_dataset(tmp_path)
    labels = synthetic()["train"][1]
    first = FashionMNIST("train", tmp_path, image_size=28, subset=5)
    assert len(first) == 5 and first.targets.tolist() == labels[:5].tolist()
    a = FashionMNIST("train", tmp_path, image_size=28, subset=5, subset_seed=1)
    b = FashionMNIST("train", tmp_path, image_size=28, subset=5, subset_seed=1)
    c = FashionMNIST("train", tmp_path, image_size=28, subset=5, subset_seed=2)
    assert a.indices.tolist() == b.indices.tolist() != c.indices.tolist()
    assert a.indices.tolist() == sorted(a.indices.tolist()) and len(set(a.indices.tolist())) == 5
    assert a.targets.tolist() == labels[a.indices.numpy()].tolist()
    assert torch.equal(a[0][0], FashionMNIST("train", tmp_path, image_size=28)[int(a.indices[0])][0])
    for bad in (0, 13, 2.5, True):
        with pytest.raises(ValueError, match="subset must be"):
            FashionMNIST("train", tmp_path, subset=bad)


def test_dataset_bad_arguments(tmp_path):
    write_dataset(tmp_path)
    for kwargs, message in [({"image_size": 0}, "image_size"), ({"image_size": (3, 4, 5)}, "image_size"),
                            ({"pad": -1}, "pad"), ({"std": 0.0}, "std must be positive"),
                            ({"mean": (0.1, 0.2)}, "mean must be")]:
        with pytest.raises(ValueError, match=message):
            FashionMNIST("train", tmp_path, **kwargs)
    with pytest.raises(IndexError):
        FashionMNIST("test", tmp_path)[6]


def test_dataset_with_dataloader_workers(tmp_path):
    arrays = synthetic(n_train=40)
    write_dataset(tmp_path, arrays)
    ds = FashionMNIST("train", tmp_path, image_size=32, augment=True)
    loader = DataLoader(ds, batch_size=8, shuffle=False, num_workers=2)
    batches = list(loader)
    assert len(batches) == 5
    assert all(x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in batches)
    assert torch.cat([y for _, y in batches]).tolist() == arrays["train"][1].tolist()
    # The workers' global RNGs differ: two workers do not augment identically.
    ds_same = FashionMNIST.from_arrays(np.repeat(arrays["train"][0][:1], 16, 0), np.zeros(16, np.int64),
                                       image_size=28, augment=True)
    xs = torch.cat([x for x, _ in DataLoader(ds_same, batch_size=8, num_workers=2)])
    assert len({tuple(v.flatten()[:1000].tolist()) for v in xs}) > 4
    assert pickle.loads(pickle.dumps(ds)).images.shape == ds.images.shape


@needs_debian
def test_dataset_on_the_real_test_set():
    ds = FashionMNIST("test", DEBIAN, image_size=63, augment=True)
    assert len(ds) == 10000 and repr(ds).startswith("FashionMNIST(split='test', n=10000")
    x, y = ds[0]
    assert x.shape == (3, 63, 63) and y == 9 and CLASSES[y] == "Ankle boot"
    plain = FashionMNIST("test", DEBIAN, image_size=28, subset=1000)
    x, _ = plain.batch(range(1000))
    assert abs(x.mean().item() - 0.0) < 0.1 and abs(x.std().item() - 1.0) < 0.1  # its own mean/std
    quick = FashionMNIST("test", DEBIAN, image_size=67, subset=128)  # the quick preset's input
    assert torch.equal(quick.get_batch(0, range(128))[0], torch.stack([quick[i][0] for i in range(128)]))


# ---------------------------------------------------------------------------------------------- ImageFolder

def _tree(root: Path) -> dict:
    """root/train/{bird,cat,dog}: PNG, JPEG, grey, RGBA, nested; plus files that are not images."""
    rng = np.random.default_rng(3)
    pixels = {}

    def save(rel, arr):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path)
        pixels[str(path)] = arr

    save("train/cat/a.png", rng.integers(0, 256, (9, 11, 3), dtype=np.uint8))
    save("train/cat/b.JPG", rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    save("train/dog/grey.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    save("train/dog/deeper/rgba.png", rng.integers(0, 256, (7, 9, 4), dtype=np.uint8))
    save("train/bird/x.jpeg", rng.integers(0, 256, (10, 10, 3), dtype=np.uint8))
    (root / "train/cat/notes.txt").write_text("not an image")
    (root / "train/cat/.hidden.png").write_bytes(b"")
    (root / "train/.cache").mkdir()
    return pixels


def test_image_folder(tmp_path):
    pixels = _tree(tmp_path)
    ds = ImageFolder(tmp_path, "train")
    assert ds.classes == ["bird", "cat", "dog"] and ds.class_to_idx == {"bird": 0, "cat": 1, "dog": 2}
    names = [Path(p).relative_to(tmp_path / "train").as_posix() for p, _ in ds.samples]
    assert names == ["bird/x.jpeg", "cat/a.png", "cat/b.JPG", "dog/grey.png", "dog/deeper/rgba.png"]
    assert ds.targets == [0, 1, 1, 2, 2] and len(ds) == 5
    for i, (path, label) in enumerate(ds.samples):
        x, y = ds[i]
        arr = pixels[path]
        assert y == label and x.dtype == torch.float32 and x.shape == (3, *arr.shape[:2])
        if path.endswith(".png"):  # lossless: exact values; grey -> 3 equal channels; RGBA -> RGB
            want = arr[..., :3] if arr.ndim == 3 else np.repeat(arr[..., None], 3, -1)
            assert torch.equal(x, torch.from_numpy(want).permute(2, 0, 1).float() / 255)
    assert ImageFolder(tmp_path / "train").samples == ds.samples
    assert [Path(p).name for p, _ in ImageFolder(tmp_path / "train", extensions=(".PNG", ".jpeg")).samples] == [
        "x.jpeg", "a.png", "grey.png", "rgba.png"]


def test_image_folder_with_workers_and_the_paper_transform(tmp_path):
    _tree(tmp_path)
    ds = ImageFolder(tmp_path, "train", transform=T.paper_eval_transform(6, resize=8))
    assert pickle.loads(pickle.dumps(ds)).samples == ds.samples
    xs, ys = zip(*DataLoader(ds, batch_size=2, num_workers=2))
    assert torch.cat(ys).tolist() == ds.targets and torch.cat(xs).shape == (5, 3, 6, 6)
    assert torch.equal(torch.cat(xs)[0], ds[0][0])


def test_image_folder_errors(tmp_path):
    _tree(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"val does not exist .*has the folders \['train'\]"):
        ImageFolder(tmp_path, "val")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        ImageFolder(tmp_path / "train" / "cat" / "a.png")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="has no class folders"):
        ImageFolder(tmp_path, "flat")
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "fish").mkdir()
    (tmp_path / "train" / "fish" / "readme.txt").write_text("")
    with pytest.raises(FileNotFoundError, match="2 of 5 class folders have no images .*: empty, fish"):
        ImageFolder(tmp_path, "train")
    with pytest.raises(ValueError, match="on_error"):
        ImageFolder(tmp_path, "train", on_error="ignore")


def test_image_folder_unreadable_images(tmp_path):
    _tree(tmp_path)
    bad = tmp_path / "train" / "cat" / "c.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)  # a PNG signature and nothing after it
    cut = tmp_path / "train" / "dog" / "cut.jpg"
    buf = (tmp_path / "train" / "cat" / "b.JPG").read_bytes()
    cut.write_bytes(buf[: len(buf) // 2])
    ds = ImageFolder(tmp_path, "train")
    i_bad, i_cut = (next(i for i, (p, _) in enumerate(ds.samples) if p == str(f)) for f in (bad, cut))
    for i, f in ((i_bad, bad), (i_cut, cut)):
        with pytest.raises(UnreadableImageError, match=re.escape(f"cannot read image {f}")):
            ds[i]
    skipping = ImageFolder(tmp_path, "train", on_error="skip")
    with pytest.warns(RuntimeWarning, match=re.escape(f"skipping cannot read image {bad}")):
        assert skipping[i_bad] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = [skipping[i] for i in (0, i_bad, i_cut)]
    x, y, skipped = collate_skip_unreadable(batch)
    assert skipped == 2 and x.shape == (1, 3, 10, 10) and y.tolist() == [0]
    assert collate_skip_unreadable([None, None]) == (None, None, 2)


# ---------------------------------------------------------------------------------------------- load_for_training

def test_errors_are_data_errors(tmp_path):
    assert issubclass(IDXError, DataError) and issubclass(IDXError, ValueError)
    assert issubclass(DatasetNotFoundError, DataError) and issubclass(DatasetNotFoundError, FileNotFoundError)
    assert issubclass(ChecksumError, DataError) and issubclass(UnreadableImageError, OSError)
    with pytest.raises(DataError):
        ImageFolder(tmp_path / "nothing")


def test_load_for_training_fashion_mnist(tmp_path):
    arrays = synthetic()
    write_dataset(tmp_path, arrays)
    train, val, test, classes = load_for_training("fashion-mnist", tmp_path, image_size=32, subset=5)
    assert classes == list(CLASSES) and test is val
    assert len(train) == 5 and train.augment and train.targets.tolist() == arrays["train"][1][:5].tolist()
    assert len(val) == 6 and not val.augment and val[0][0].shape == (3, 32, 32)
    _, val, test, _ = load_for_training("fashion-mnist", tmp_path, image_size=32, ten_crop=True)
    assert test.ten_crop and test[0][0].shape == (10, 3, 32, 32) and val[0][0].shape == (3, 32, 32)
    assert test.targets.tolist() == val.targets.tolist() == arrays["t10k"][1].tolist()
    with pytest.raises(DataError, match="subset 13 is larger than the Fashion-MNIST training set"):
        load_for_training("fashion-mnist", tmp_path, subset=13)
    with pytest.raises(DataError, match="dataset must be one of"):
        load_for_training("cifar", tmp_path)


def test_load_for_training_imagefolder(tmp_path, monkeypatch):
    _tree(tmp_path)
    (tmp_path / "train" / "dog" / "deeper" / "rgba.png").rename(tmp_path / "train" / "dog" / "rgba.png")
    for f in (p for p in (tmp_path / "train").rglob("*") if p.is_file()):
        dest = tmp_path / "val" / f.relative_to(tmp_path / "train")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(f.read_bytes())
    train, val, test, classes = load_for_training("imagefolder", tmp_path, image_size=6, subset=3)
    assert classes == ["bird", "cat", "dog"] and len(train) == 3 and len(val) == 5 and test is val
    assert train[0][0].shape == (3, 6, 6) and val[0][0].shape == (3, 6, 6)
    _, _, test, _ = load_for_training("imagefolder", tmp_path, image_size=6, ten_crop=True)
    assert test[0][0].shape == (10, 3, 6, 6) and test.root == str(tmp_path / "val")
    monkeypatch.delenv("FASTALEX_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError, match="needs --data DIR"):
        load_for_training("imagefolder")
    monkeypatch.setenv("FASTALEX_DATA", str(tmp_path))
    assert len(load_for_training("imagefolder", image_size=6)[0]) == 5
    (tmp_path / "val" / "fish").mkdir()
    (tmp_path / "val" / "fish" / "f.png").write_bytes((tmp_path / "val" / "cat" / "a.png").read_bytes())
    with pytest.raises(DataError, match="different class folders .*fish"):
        load_for_training("imagefolder", tmp_path)
