"""ImageNet-style image folders: root/<split>/<class>/<image>, decoded with Pillow.

    train = ImageFolder("imagenet", "train", transform=paper_train_transform(227))
    loader = DataLoader(train, batch_size=128, shuffle=True, num_workers=8)

Classes are the sub-folders' names in sorted order (their index is the label); images are found
recursively below each class folder, by extension, in sorted order. Everything the Dataset holds is
plain Python data (paths as strings), so it pickles cheaply into DataLoader workers.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

from torch.utils.data import Dataset, default_collate

from fastalex.data.errors import DataError, DatasetNotFoundError, NotAFolderError
from fastalex.data.transforms import to_tensor

__all__ = ["IMG_EXTENSIONS", "UnreadableImageError", "find_images", "load_image", "ImageFolder",
           "collate_skip_unreadable"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")


class UnreadableImageError(DataError, OSError):
    """An image file Pillow cannot decode (corrupt, truncated, not an image); the message names it."""


def load_image(path: str | os.PathLike):
    """Decode with Pillow and convert to RGB (grey, palette, CMYK, RGBA all become RGB)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert() loads the pixels: errors show up here, not later
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UnreadableImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def find_images(root: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS
                ) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(path, class index), ...]) of root/<class>/**/<image>; clear errors for missing/empty folders."""
    root = Path(root)
    layout = f"expected {root}/<class>/<image> (e.g. {root}/n01440764/n01440764_10026.JPEG)"
    if not root.exists():
        parent = root.parent
        hint = ""
        if parent.is_dir():
            subs = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
            hint = f"; {parent} has the folders {subs}" if subs else f"; {parent} has no folders"
        raise DatasetNotFoundError(f"image folder {root} does not exist ({layout}){hint}")
    if not root.is_dir():
        raise NotAFolderError(f"image folder {root} is not a folder ({layout})")
    exts = tuple(e.lower() for e in extensions)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetNotFoundError(f"image folder {root} has no class folders ({layout})")
    samples, empty = [], []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [os.path.join(dirpath, f) for f in sorted(filenames)
                      if not f.startswith(".") and f.lower().endswith(exts)]
        if not found:
            empty.append(name)
        samples += [(p, label) for p in found]
    if empty:
        raise DatasetNotFoundError(f"image folder {root}: {len(empty)} of {len(classes)} class folders have no images "
                                f"({', '.join(exts)}): {', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}")
    return classes, samples


class ImageFolder(Dataset):
    """root/<split>/<class>/<image> (or root/<class>/<image> when split is None); items (image, label).

    transform: applied to the RGB Pillow image (e.g. transforms.paper_train_transform(227));
    default: to_tensor, float (3, H, W) in [0, 1]. on_error: "raise" (UnreadableImageError naming
    the file) or "skip" (a warning naming the file, and the item is None: use
    collate_skip_unreadable, which drops such items and counts them).
    """

    def __init__(self, root: str | os.PathLike, split: str | None = None, transform: Callable | None = None, *,
                 extensions: Sequence[str] = IMG_EXTENSIONS, on_error: str = "raise"):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.root = str(Path(root) / split if split else Path(root))
        self.classes, self.samples = find_images(self.root, extensions)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = [label for _, label in self.samples]
        self.transform, self.on_error = transform, on_error

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"ImageFolder({self.root!r}, {len(self.classes)} classes, {len(self)} images, "
                f"transform={self.transform!r})")

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            img = load_image(path)
        except UnreadableImageError as e:
            if self.on_error == "raise":
                raise
            warnings.warn(f"skipping {e}", RuntimeWarning, stacklevel=2)
            return None
        return (self.transform(img) if self.transform is not None else to_tensor(img)), label


def collate_skip_unreadable(batch):
    """default_collate for ImageFolder(on_error="skip"): (images, labels, skipped) with the None items dropped.

    images and labels are None when the whole batch was unreadable.
    """
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, None, skipped
    images, labels = default_collate(kept)
    return images, labels, skipped
