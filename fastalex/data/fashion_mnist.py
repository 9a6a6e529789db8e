"""Fashion-MNIST (Zalando, 2017): finding or downloading its IDX files, and a Dataset for AlexNet.

    root = find_fashion_mnist()                    # where the four files are (downloads if needed)
    images, labels = load_fashion_mnist("train")   # uint8 (60000, 28, 28), int64 (60000,)
    ds = FashionMNIST("train", image_size=227, augment=True)   # (3, 227, 227) float, label int

Where the files are looked for, in order (the first place that has all four wins):

1. `data` (the command's --data DIR) if given: DIR, DIR/fashion-mnist or DIR/FashionMNIST/raw
   (torchvision's layout). A named folder without the files is an error, never a silent fallback.
2. else $FASTALEX_DATA, the same way.
3. else /usr/share/datasets/fashion-mnist (`apt-get install dataset-fashion-mnist`).
4. else the download cache: `cache_dir`, else $FASTALEX_CACHE/fashion-mnist, else
   ${XDG_CACHE_HOME:-~/.cache}/fastalex/fashion-mnist; missing files are downloaded there from the
   official mirrors ($FASTALEX_FASHION_MNIST_URL or `base_url` replaces them), each checked against
   its MD5 before it is renamed into place.

Each file may be gzipped (`*-ubyte.gz`, as published) or not (`*-ubyte`).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fastalex.data.errors import DataError, DatasetNotFoundError
from fastalex.data.idx import IDXError, read_idx
from fastalex.data.transforms import ten_crop as _ten_crop

__all__ = [
    "CLASSES", "MD5", "RAW_MD5", "MIRRORS", "SYSTEM_DIRS", "MEAN", "STD",
    "DatasetNotFoundError", "DownloadError", "ChecksumError",
    "default_cache_dir", "find_fashion_mnist", "download_fashion_mnist", "load_fashion_mnist", "FashionMNIST",
]

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLITS = {"train": "train", "test": "t10k", "t10k": "t10k"}
# The published files' MD5s (the zalandoresearch/fashion-mnist README; torchvision's too). Debian's
# dataset-fashion-mnist ships the same deflate streams with the gzip header's name and time stripped,
# so its .gz files hash differently; their decompressed contents hash to RAW_MD5.
MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
RAW_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
BASENAMES = tuple(n[: -len(".gz")] for n in MD5)
MIRRORS = ("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
           "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")
SYSTEM_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
# Mean and standard deviation of the training images' pixels in [0, 1].
MEAN, STD = 0.2860, 0.3530

ENV_DATA, ENV_CACHE, ENV_URL = "FASTALEX_DATA", "FASTALEX_CACHE", "FASTALEX_FASHION_MNIST_URL"
HOW_TO = ("To get Fashion-MNIST: `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files in "
          "/usr/share/datasets/fashion-mnist), or put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
          "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (from "
          "https://github.com/zalandoresearch/fashion-mnist) in a folder and pass --data DIR or set "
          "$FASTALEX_DATA=DIR, or allow the download from the network.")


class DownloadError(DataError, RuntimeError):
    """Every mirror failed for some file."""


class ChecksumError(DownloadError):
    """A downloaded file's MD5 is not the published one (the file is deleted)."""


def default_cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser() / "fashion-mnist"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fastalex" / "fashion-mnist"


def _locate(folder: Path, base: str) -> Path | None:
    for name in (base + ".gz", base):
        if (folder / name).is_file():
            return folder / name
    return None


def _missing(folder: Path) -> list[str]:
    return [b for b in BASENAMES if _locate(folder, b) is None]


def _from_named(path: Path, label: str) -> Path:
    path = path.expanduser()
    if not path.is_dir():
        raise DatasetNotFoundError(f"Fashion-MNIST: {label} {path} is not a folder. {HOW_TO}")
    candidates = [path, path / "fashion-mnist", path / "FashionMNIST" / "raw"]
    for c in candidates:
        if not _missing(c):
            return c
    raise DatasetNotFoundError(
        f"Fashion-MNIST: {label} {path} does not hold the four IDX files (looked in "
        f"{', '.join(str(c) for c in candidates)} for {', '.join(b + '[.gz]' for b in BASENAMES)}; "
        f"missing in {path}: {', '.join(_missing(path))}). {HOW_TO}")


def _mirrors(base_url) -> list[str]:
    if base_url is None:
        base_url = os.environ.get(ENV_URL) or MIRRORS
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    return [u.rstrip("/") + "/" for u in urls]


def find_fashion_mnist(data: str | os.PathLike | None = None, *, download: bool = True,
                       cache_dir: str | os.PathLike | None = None, base_url: str | Sequence[str] | None = None,
                       checksums: Mapping[str, str] | None = None, timeout: float = 30.0,
                       verbose: bool = True) -> Path:
    """The folder holding the four Fashion-MNIST files (see the module docstring for the search order).

    download=False stops before the network. base_url: a mirror or a list of them, replacing the
    official ones; checksums: {file name: md5}, replacing MD5 (both for tests and private mirrors).
    timeout: seconds for each connection and read. Raises DatasetNotFoundError naming every place
    tried and how to get the data; ChecksumError when a download does not match its MD5.
    """
    if data is not None:
        return _from_named(Path(data), "the data folder")
    if os.environ.get(ENV_DATA):
        return _from_named(Path(os.environ[ENV_DATA]), f"${ENV_DATA}")
    tried = ["no data folder given (--data DIR)", f"${ENV_DATA} not set"]
    for d in SYSTEM_DIRS:
        if not _missing(d):
            return d
        tried.append(f"{d} (the Debian package dataset-fashion-mnist): "
                     + ("not there" if not d.is_dir() else f"missing {', '.join(_missing(d))}"))
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not _missing(cache):
        return cache
    tried.append(f"{cache} (download cache): " + ("not there" if not cache.is_dir() else
                                                  f"missing {', '.join(_missing(cache))}"))
    if not download:
        tried.append("downloading: not allowed (download=False)")
        raise DatasetNotFoundError("Fashion-MNIST not found. Tried:\n  - " + "\n  - ".join(tried) + f"\n{HOW_TO}")
    try:
        download_fashion_mnist(cache, base_url=base_url, checksums=checksums, timeout=timeout, verbose=verbose)
    except ChecksumError:
        raise
    except (DownloadError, OSError) as e:  # OSError: the cache folder cannot be made or written
        tried.append(f"downloading into {cache}: {e}")
        raise DatasetNotFoundError("Fashion-MNIST not found. Tried:\n  - " + "\n  - ".join(tried)
                                   + f"\n{HOW_TO}") from e
    return cache


def _fetch(url: str, dest: Path, md5: str, timeout: float) -> None:
    """Download url to dest via a temporary file in dest's folder; rename only if the MD5 matches."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        h = hashlib.md5(usedforsecurity=False)
        request = urllib.request.Request(url, headers={"User-Agent": "fastalex"})
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(request, timeout=timeout) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                h.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if h.hexdigest() != md5:
            raise ChecksumError(f"checksum mismatch for {url}: MD5 {h.hexdigest()}, expected {md5} "
                                f"(the download was deleted)")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def download_fashion_mnist(dest: str | os.PathLike, *, base_url: str | Sequence[str] | None = None,
                           checksums: Mapping[str, str] | None = None, timeout: float = 30.0,
                           verbose: bool = True) -> Path:
    """Download the files that `dest` lacks; each mirror in turn until one gives the right MD5.

    Files are written to a temporary file in `dest` and renamed when their MD5 matches, so `dest`
    never holds a partial or wrong file. Raises ChecksumError if some file's every failure was a
    checksum mismatch, else DownloadError, listing each mirror's failure.
    """
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    checksums = dict(MD5 if checksums is None else checksums)
    mirrors = _mirrors(base_url)
    for base in BASENAMES:
        if _locate(dest, base) is not None:
            continue
        name = base + ".gz"
        if name not in checksums:
            raise ValueError(f"no MD5 for {name} in checksums (have {sorted(checksums)})")
        failures: list[Exception] = []
        for mirror in mirrors:
            url = mirror + name
            if verbose:
                print(f"fastalex: downloading {url} -> {dest}", file=sys.stderr, flush=True)
            try:
                _fetch(url, dest / name, checksums[name], timeout)
                break
            except ChecksumError as e:
                failures.append(e)
            except (OSError, http.client.HTTPException, ValueError) as e:  # URLError, timeouts, bad URLs
                failures.append(DownloadError(f"{url}: {type(e).__name__}: {e}"))
        else:
            kind = ChecksumError if all(isinstance(e, ChecksumError) for e in failures) else DownloadError
            raise kind(f"could not download {name}: " + "; ".join(str(e) for e in failures)
                       + (f". {HOW_TO}" if kind is ChecksumError else ""))
    return dest


def load_fashion_mnist(split: str = "train", data: str | os.PathLike | None = None,
                       **find_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W), labels int64 (N,)) of split "train" or "test" ("t10k").

    find_kwargs go to find_fashion_mnist. Raises IDXError if a file is not what it should be.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = find_fashion_mnist(data, **find_kwargs)
    prefix = SPLITS[split]
    ipath, lpath = _locate(root, f"{prefix}-images-idx3-ubyte"), _locate(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(ipath), read_idx(lpath)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise IDXError(f"{ipath}: expected uint8 images (N, H, W) (magic 0x00000803), got {images.dtype} "
                       f"{images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise IDXError(f"{lpath}: expected uint8 labels (N,) (magic 0x00000801), got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise IDXError(f"{ipath} has {len(images)} images but {lpath} has {len(labels)} labels")
    if labels.size and labels.max() >= len(CLASSES):
        raise IDXError(f"{lpath}: label {int(labels.max())} is out of range (classes 0..{len(CLASSES) - 1})")
    return images, labels.astype(np.int64)


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in v)):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {v!r}")
    return int(v[0]), int(v[1])


def _channels(v, name: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(3)
    if t.numel() != 3:
        raise ValueError(f"{name} must be a number or 3 numbers (R, G, B), got {v!r}")
    return t.clone().view(1, 3, 1, 1)


class FashionMNIST(Dataset):
    """Fashion-MNIST for AlexNet: items are (image float (3, S, S), label int).

    The uint8 images stay in memory (47 MB for the training set); each item (or batch, through
    `batch`, `__getitems__`, which DataLoader uses, and `get_batch`, which the Trainer uses when
    there is no augmentation) is transformed when asked for:
    [augment: shift + flip at 28x28] -> (x / 255 - mean) / std -> bilinear resize to image_size
    -> grey to 3 channels (normalising before the resize gives the same values: bilinear weights sum to 1).

    split: "train" or "test". data, download, cache_dir: see find_fashion_mnist.
    image_size: int or (H, W), the model's input (AlexNet.image_size; 227 for the paper net).
    augment: random translation by up to `pad` pixels at 28x28 (zero padding: the background is
    black) and, if flip, a horizontal flip with probability 0.5; drawn from `generator` in `batch`,
    else from torch's global RNG (which DataLoader seeds per worker).
    ten_crop: items are (10, 3, S, S) instead, for the paper's test-time averaging: the 28x28 windows
    at the four corners and the centre of the zero-padded (by `pad`) image, i.e. the four extreme
    shifts of the augmentation and no shift, and their mirror images, each resized as above.
    subset: keep N images: the first N, or a random N (in file order) if subset_seed is given.
    mean, std: a number or three; default Fashion-MNIST's own (MEAN, STD), so the inputs are
    roughly zero-mean and unit-variance. Pass transforms.IMAGENET_MEAN/STD for ImageNet's.
    """

    def __init__(self, split: str = "train", data: str | os.PathLike | None = None, *, image_size=227,
                 augment: bool = False, pad: int = 2, flip: bool = True, ten_crop: bool = False,
                 subset: int | None = None, subset_seed: int | None = None, mean=MEAN, std=STD,
                 download: bool = True, cache_dir: str | os.PathLike | None = None):
        images, labels = load_fashion_mnist(split, data, download=download, cache_dir=cache_dir)
        self._setup(images, labels, split, image_size, augment, pad, flip, ten_crop, subset, subset_seed, mean, std)

    @classmethod
    def from_arrays(cls, images, labels, *, split: str = "custom", image_size=227, augment: bool = False,
                    pad: int = 2, flip: bool = True, ten_crop: bool = False, subset: int | None = None,
                    subset_seed: int | None = None, mean=MEAN, std=STD) -> "FashionMNIST":
        """The same Dataset over given arrays: images uint8 (N, H, W), labels (N,) integers."""
        self = cls.__new__(cls)
        self._setup(np.asarray(images), np.asarray(labels), split, image_size, augment, pad, flip, ten_crop, subset,
                    subset_seed, mean, std)
        return self

    def _setup(self, images, labels, split, image_size, augment, pad, flip, ten_crop, subset, subset_seed, mean,
               std):
        if images.dtype != np.uint8 or images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"expected uint8 images (N, H, W) and labels (N,), got {images.dtype} {images.shape} "
                             f"and {labels.shape}")
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise ValueError(f"pad must be an int >= 0, got {pad!r}")
        if augment and ten_crop:
            raise ValueError("augment and ten_crop exclude each other (augment is for training, ten_crop for testing)")
        n = len(images)
        indices = np.arange(n)
        if subset is not None:
            if isinstance(subset, bool) or not isinstance(subset, int) or not 1 <= subset <= n:
                raise ValueError(f"subset must be an int in [1, {n}] (the {split} split has {n} images), "
                                 f"got {subset!r}")
            if subset_seed is None:
                indices = indices[:subset]
            else:
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(subset_seed)))
                indices = np.sort(perm[:subset].numpy())
        self.split, self.classes = split, list(CLASSES)
        self.indices = torch.from_numpy(indices)  # positions in the split's files
        self.images = torch.from_numpy(np.ascontiguousarray(images[indices]))
        self.targets = torch.from_numpy(labels[indices].astype(np.int64))
        self.image_size = _pair(image_size, "image_size")
        self.augment, self.pad, self.flip, self.ten_crop = bool(augment), pad, bool(flip), bool(ten_crop)
        self.mean, self.std = _channels(mean, "mean"), _channels(std, "std")
        if (self.std <= 0).any():
            raise ValueError(f"std must be positive, got {std!r}")

    def __len__(self) -> int:
        return len(self.targets)

    def __repr__(self) -> str:
        return (f"FashionMNIST(split={self.split!r}, n={len(self)}, image_size={self.image_size}, "
                f"augment={self.augment}, ten_crop={self.ten_crop})")

    def batch(self, indices, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(images float (N, 3, H, W), or (N, 10, 3, H, W) with ten_crop; labels int64 (N,)) at `indices`."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        img = self.images[idx]
        n, h0, w0 = img.shape
        if self.augment:
            img = _shift_flip(img, self.pad, self.flip, generator)
        if self.ten_crop:
            p = self.pad
            img = _ten_crop(F.pad(img, (p, p, p, p)).unsqueeze(1), (h0, w0)).reshape(n * 10, h0, w0)
        # Normalise at 28x28, before the resize: bilinear weights sum to 1, so the two commute, and
        # with one mean/std for all channels only one channel is resized, then repeated.
        x = img.unsqueeze(1).float()
        scale, shift = 1.0 / (255.0 * self.std), -self.mean / self.std
        if bool((scale == scale[:, :1]).all() and (shift == shift[:, :1]).all()):
            x = x.mul_(scale[:, :1]).add_(shift[:, :1])
        else:
            x = torch.addcmul(shift, x, scale)  # (N, 3, 28, 28)
        h, w = self.image_size
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False,
                              antialias=h < x.shape[-2] or w < x.shape[-1])
        x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
        return (x.view(n, 10, 3, h, w) if self.ten_crop else x), self.targets[idx]

    @property
    def get_batch(self):
        """get_batch(epoch, indices) -> (images float (B, 3, H, W), labels int64 (B,)): `batch(indices)`.

        The Trainer reads a dataset that has this a batch at a time, without a DataLoader: one
        normalise + resize per batch instead of one per image, the same values bit for bit (the
        resize works on each image's plane alone). Only without augment and ten_crop (else an
        AttributeError, so `hasattr` is False): the Trainer seeds each image's augmentation from its
        own seed through the per-image path, which a batch call could not reproduce.
        """
        if self.augment or self.ten_crop:
            raise AttributeError(f"get_batch: only without augment and ten_crop ({self!r}); the Trainer reads this "
                                 f"dataset an image at a time")
        return self._get_batch

    def _get_batch(self, epoch: int, indices) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch(indices)  # (without augmentation every epoch reads the same values)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        x, y = self.batch([i])
        return x[0], int(y[0])

    def __getitems__(self, indices) -> list[tuple[torch.Tensor, int]]:
        # DataLoader's batched fetch: one transform for the whole batch, then its collate stacks.
        x, y = self.batch(indices)
        return list(zip(x.unbind(0), y.tolist()))


def _shift_flip(img: torch.Tensor, pad: int, flip: bool, generator) -> torch.Tensor:
    """Per image: a random (h, w) window of the zero-padded image (a shift by up to pad px), then maybe a flip."""
    n, h, w = img.shape
    if pad:
        padded = F.pad(img, (pad, pad, pad, pad))
        tops = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        lefts = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        rows = (tops[:, None] + torch.arange(h))[:, :, None]
        cols = (lefts[:, None] + torch.arange(w))[:, None, :]
        img = padded[torch.arange(n)[:, None, None], rows, cols]
    if flip:
        mirror = torch.rand(n, generator=generator) < 0.5
        img = torch.where(mirror[:, None, None], img.flip(-1), img)
    return img
