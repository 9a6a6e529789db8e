"""The datasets a training run needs, by name.

    train, val, test, classes = load_for_training("fashion-mnist", image_size=67)
    train, val, test, classes = load_for_training("imagefolder", "/data/imagenet", image_size=227, ten_crop=True)

fashion-mnist: train is the training split with augmentation (shifts of up to 2 px and flips at
28x28; FashionMNIST), `subset` keeps its first N images. The dataset has no validation split, so
val is the test split (single view); test is the test split again, as ten crops if ten_crop.
imagefolder: DATA/train with the paper's training transform (short side 256, centre 256, random
crop + flip, PCA noise), `subset` keeps a random N (seed 0: the folder is sorted by class); val is
DATA/val with the centre crop; test is DATA/val again (ImageNet's test labels are not public), as
ten crops if ten_crop.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset, Subset

from fastalex.data.errors import DataError, DatasetNotFoundError
from fastalex.data.fashion_mnist import CLASSES, FashionMNIST, load_fashion_mnist
from fastalex.data.folder import ImageFolder
from fastalex.data.transforms import paper_eval_transform, paper_ten_crop_transform, paper_train_transform

__all__ = ["DATASETS", "load_for_training"]

DATASETS = ("fashion-mnist", "imagefolder")


def _check_subset(subset, n: int, what: str) -> None:
    if subset is None:
        return
    if isinstance(subset, bool) or not isinstance(subset, int) or subset < 1:
        raise DataError(f"subset must be a positive number of images, got {subset!r}")
    if subset > n:
        raise DataError(f"subset {subset} is larger than {what} ({n} images)")


def load_for_training(dataset: str, data: str | os.PathLike | None = None, *, image_size=227,
                      subset: int | None = None, ten_crop: bool = False, download: bool = True,
                      augment: bool = True) -> tuple[Dataset, Dataset, Dataset, list[str]]:
    """(train, val, test, class names) for "fashion-mnist" or "imagefolder" (see the module docstring).

    data: the folder (--data DIR); for fashion-mnist see find_fashion_mnist, for imagefolder it is
    required (or $FASTALEX_DATA) and holds train/<class>/* and val/<class>/*. image_size: the
    model's input, int or (H, W). augment: random training augmentation (off: the images as they
    are, e.g. for runs too short to overfit). Raises DataError (with FileNotFoundError and friends mixed in
    where they fit) for anything the user can fix.
    """
    if dataset == "fashion-mnist":
        train_images, train_labels = load_fashion_mnist("train", data, download=download)
        test_images, test_labels = load_fashion_mnist("test", data, download=download)
        _check_subset(subset, len(train_images), "the Fashion-MNIST training set")
        train = FashionMNIST.from_arrays(train_images, train_labels, split="train", image_size=image_size,
                                         augment=augment, subset=subset)
        val = FashionMNIST.from_arrays(test_images, test_labels, split="test", image_size=image_size)
        test = (FashionMNIST.from_arrays(test_images, test_labels, split="test", image_size=image_size,
                                         ten_crop=True) if ten_crop else val)
        return train, val, test, list(CLASSES)
    if dataset == "imagefolder":
        root = data if data is not None else os.environ.get("FASTALEX_DATA") or None
        if root is None:
            raise DatasetNotFoundError("the imagefolder dataset needs --data DIR (or $FASTALEX_DATA): a folder with "
                                       "train/<class>/<image> and val/<class>/<image>")
        size = image_size if isinstance(image_size, int) else max(image_size)
        resize = max(256, size)  # the paper's 256, or the input size if that is larger
        train = ImageFolder(root, "train", transform=paper_train_transform(image_size, resize=resize) if augment
                            else paper_eval_transform(image_size, resize=resize), on_error="skip")
        val = ImageFolder(root, "val", transform=paper_eval_transform(image_size, resize=resize), on_error="skip")
        if train.classes != val.classes:
            extra = sorted(set(train.classes) ^ set(val.classes))
            raise DataError(f"{root}: train and val have different class folders (in one only: "
                            f"{', '.join(extra[:10])}{' ...' if len(extra) > 10 else ''})")
        test = (ImageFolder(root, "val", transform=paper_ten_crop_transform(image_size, resize=resize), on_error="skip")
                if ten_crop else val)
        _check_subset(subset, len(train), f"{train.root}")
        if subset is not None:
            keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:subset]
            train = Subset(train, sorted(keep.tolist()))
        return train, val, test, list(val.classes)
    raise DataError(f"dataset must be one of {DATASETS}, got {dataset!r}")
