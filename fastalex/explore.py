"""Looking inside a trained AlexNet: the paper's Figure 3 (conv1's kernels) and Figure 4 (predictions
and nearest neighbours in the last hidden layer's space).

    x = preprocess_images(["shoe.png"], "fashion-mnist", image_size=67)   # (1, 3, 67, 67), as the test set
    probs = probabilities(model, x)                                       # (1, num_classes), softmax(model(x))
    f = hidden_features(model, x)                                         # (1, 4096): fc7 after its ReLU
    dist, idx = nearest_neighbors(model, train_set, x, k=6)               # (1, 6) each, nearest first
    save_png(filter_grid(model.features.conv1.weight, groups=2), "kernels.png")

`nearest_neighbors` streams the dataset in batches and keeps a running top-k per query, so neither
the images nor their features are ever all in memory.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = ["NATIVE_FASHION_SIZE", "preprocess_images", "probabilities", "hidden_features", "nearest_neighbors",
           "conv1_weight", "filter_grid", "neighbor_grid", "display_image", "save_png"]

NATIVE_FASHION_SIZE = 28  # Fashion-MNIST's images are 28x28 grey


# ---------------------------------------------------------------------------------------------- inputs

def preprocess_images(paths: Sequence[str | os.PathLike], dataset: str, image_size) -> torch.Tensor:
    """Image files -> (N, 3, H, W) float, exactly as the dataset's evaluation turns its images into tensors.

    fashion-mnist: grey (Pillow's "L"), squashed to 28x28 with Pillow's bilinear filter unless already
    that size (a non-square image is not cropped: Fashion-MNIST shows whole items), then
    FashionMNIST's test-time path (normalise with its mean/std, bilinear resize to image_size, grey
    to 3 channels); a PNG written from the dataset's own array comes back bit-identical.
    imagefolder: the paper's eval transform (short side max(256, size), centre crops, ImageNet
    normalisation), as `load_for_training` builds it. Raises UnreadableImageError naming the file.
    """
    from PIL import Image

    from fastalex.data import FashionMNIST, load_image
    from fastalex.data.transforms import paper_eval_transform

    if dataset == "fashion-mnist":
        arrays = []
        for p in paths:
            img = load_image(p).convert("L")  # load_image: RGB from anything, with a clear error for bad files
            s = NATIVE_FASHION_SIZE
            if img.size != (s, s):
                img = img.resize((s, s), Image.BILINEAR)
            arrays.append(np.asarray(img, dtype=np.uint8))
        ds = FashionMNIST.from_arrays(np.stack(arrays), np.zeros(len(arrays), dtype=np.int64), split="query",
                                      image_size=image_size)
        return ds.batch(range(len(ds)))[0]
    if dataset == "imagefolder":
        size = image_size if isinstance(image_size, int) else max(image_size)
        transform = paper_eval_transform(image_size, resize=max(256, size))
        return torch.stack([transform(load_image(p)) for p in paths])
    raise ValueError(f"dataset must be 'fashion-mnist' or 'imagefolder', got {dataset!r}")


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_model(model: nn.Module) -> None:
    if getattr(model, "devices", None) is not None:
        raise ValueError("this AlexNet's towers live on two devices: rebuild it on one device "
                         "(AlexNet(**model.config) and load_state_dict(model.state_dict())) to explore it")
    if not isinstance(getattr(model, "classifier", None), nn.Sequential) or not hasattr(model, "features"):
        raise ValueError(f"model must be a fastalex.AlexNet, got {type(model).__name__}")


@torch.no_grad()
def probabilities(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """softmax(model(images)) in eval mode (no dropout), float32 on the CPU: (N, 3, H, W) -> (N, num_classes).

    The same softmax as Trainer.predict at precision "32"; the model's training mode is restored.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be (N, 3, H, W), got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    device, was_training = _device_of(model), model.training
    model.eval()
    try:
        out = [model(images[i:i + batch_size].to(device)).float().softmax(dim=1).cpu()
               for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else images.new_zeros(0, model.num_classes)


# ---------------------------------------------------------------------------------------------- Figure 4

@torch.no_grad()
def hidden_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last hidden layer's activations: (N, 3, H, W) -> (N, 4096) float32, on the model's device.

    AlexNet.hidden: fc7 after its activation (act7; torchvision: the second Linear after its ReLU),
    in whatever mode the model is in (call model.eval() first for the paper's test-time features:
    no dropout).
    """
    _check_model(model)
    model._check_input(images)  # before .to(): a clear error for anything but images
    return model.hidden(images.to(_device_of(model))).float()


def _indexed_batches(dataset: Dataset, batch_size: int, workers: int):
    """(indices int64 (B,), images (B, 3, H, W)) over the dataset in order; unreadable items (None) left out."""
    from fastalex.data import FashionMNIST

    n = len(dataset)
    if isinstance(dataset, FashionMNIST):  # one vectorised transform per batch
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(start + batch_size, n))
            yield idx, dataset.batch(idx)[0]
        return
    loader = DataLoader(_Indexed(dataset), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_collate_indexed)
    for idx, images in loader:
        if idx is not None:
            yield idx, images


class _Indexed(Dataset):
    """(i, dataset[i]): keeps each item's position when unreadable items are dropped."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return i, self.dataset[i]


def _collate_indexed(batch):
    kept = [(i, item[0]) for i, item in batch if item is not None]
    if not kept:
        return None, None
    return torch.tensor([i for i, _ in kept], dtype=torch.long), torch.stack([x for _, x in kept])


@torch.no_grad()
def nearest_neighbors(model: nn.Module, dataset: Dataset, queries: torch.Tensor, k: int = 6,
                      batch_size: int = 256, *, workers: int = 0,
                      progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The k dataset images nearest to each query in the last hidden layer (hidden_features), by
    Euclidean distance: (distances float32 (Q, k), indices int64 (Q, k)), nearest first, on the CPU.

    dataset: items (image (3, H, W), label), e.g. the training split without augmentation; images
    it cannot read (None items) are skipped. queries: (Q, 3, H, W) preprocessed like its images.
    The model runs in eval mode (no dropout; its mode is restored). The dataset is read in batches
    of batch_size and each batch's distances are merged into a running top-k per query, so memory
    stays O(Q * (k + batch_size)) whatever the dataset's size. Fewer than k columns come back only
    when the dataset has fewer than k readable images.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(queries, torch.Tensor) or queries.dim() != 4 or len(queries) == 0:
        raise ValueError(f"queries must be (Q, 3, H, W) with Q >= 1, got "
                         f"{tuple(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__}")
    _check_model(model)
    was_training = model.training
    model.eval()
    try:
        q = torch.cat([hidden_features(model, queries[i:i + batch_size]) for i in range(0, len(queries), batch_size)])
        best_d = q.new_empty(len(q), 0)
        best_i = torch.empty(len(q), 0, dtype=torch.long, device=q.device)
        batches = _indexed_batches(dataset, batch_size, workers)
        if progress:
            from rich.progress import track

            batches = track(batches, total=math.ceil(len(dataset) / batch_size), description="neighbours",
                            transient=True)
        for idx, images in batches:
            f = hidden_features(model, images)
            # Not the matmul form |a|^2 + |b|^2 - 2ab: it cancels badly for near-duplicates.
            d = torch.cdist(q, f, compute_mode="donot_use_mm_for_euclid_dist")  # (Q, B)
            cand_d = torch.cat([best_d, d], dim=1)
            cand_i = torch.cat([best_i, idx.to(q.device).expand(len(q), -1)], dim=1)
            best_d, pos = torch.topk(cand_d, min(k, cand_d.shape[1]), dim=1, largest=False, sorted=True)
            best_i = cand_i.gather(1, pos)
    finally:
        model.train(was_training)
    return best_d.cpu(), best_i.cpu()


def display_image(dataset: Dataset, i: int):
    """Dataset item i as a Pillow RGB image for showing (its raw pixels where the dataset keeps them)."""
    from PIL import Image

    from fastalex.data import FashionMNIST, ImageFolder, load_image

    if isinstance(dataset, Subset):
        return display_image(dataset.dataset, dataset.indices[i])
    if isinstance(dataset, FashionMNIST):
        return Image.fromarray(dataset.images[i].numpy()).convert("RGB")
    if isinstance(dataset, ImageFolder):
        return load_image(dataset.samples[i][0])
    x = dataset[i][0].float()  # some other dataset: stretch its tensor to [0, 1]
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    return Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()).convert("RGB")


def neighbor_grid(rows: Sequence[Sequence], tile: int = 96, gap: int = 2, separator: int = 4):
    """The paper's Figure 4 (right): one row per query, the query then its neighbours, as a Pillow image.

    rows: per query [query image, neighbour 1, ...] (Pillow images, any size; each is resized to
    tile x tile). Tiles are `gap` pixels apart on a white background; between the query and its
    neighbours a dark `separator`-pixel bar with a gap on each side. Size: width
    (m + 1) * tile + (m + 3) * gap + separator (m: the most neighbours in a row), height
    len(rows) * tile + (len(rows) + 1) * gap.
    """
    from PIL import Image

    if not rows or any(len(r) < 1 for r in rows):
        raise ValueError("neighbor_grid needs at least one row, each starting with its query image")
    m = max(len(r) for r in rows) - 1
    width = (m + 1) * tile + (m + 3) * gap + separator
    height = len(rows) * tile + (len(rows) + 1) * gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    if separator:
        canvas.paste(Image.new("RGB", (separator, height - 2 * gap), (64, 64, 64)), (gap + tile + gap, gap))
    for r, row in enumerate(rows):
        y = gap + r * (tile + gap)
        for c, img in enumerate(row):
            x = gap if c == 0 else 2 * gap + tile + separator + gap + (c - 1) * (tile + gap)
            canvas.paste(img.convert("RGB").resize((tile, tile), Image.BILINEAR), (x, y))
    return canvas


# ---------------------------------------------------------------------------------------------- Figure 3

def conv1_weight(model_state: dict, variant: str) -> torch.Tensor:
    """conv1's weight (out, 3, 11, 11) from an AlexNet state_dict (the checkpoint's "model")."""
    key = "features.0.weight" if variant == "torchvision" else "features.conv1.weight"
    w = model_state.get(key)
    if not isinstance(w, torch.Tensor) or w.dim() != 4:
        raise KeyError(f"no conv1 weight {key!r} in this {variant} state_dict")
    return w


def filter_grid(weight: torch.Tensor, *, groups: int = 1, scale: int = 4, columns: int = 16,
                normalize: str = "kernel", gap: int = 1, group_gap: int = 8) -> np.ndarray:
    """conv1's kernels as one RGB picture (the paper's Figure 3): uint8 (height, width, 3).

    weight: (out, 3, kh, kw). normalize: "kernel" (default: each kernel stretched to [0, 1] by its own
    min and max, so faint kernels show their pattern) or "global" (one min / max for all, so
    kernels compare in strength); a constant kernel shows as mid-grey. Each kernel is upscaled
    `scale` times by nearest neighbour and laid in rows of `columns`, with `gap` white pixels
    between and around them. groups: 2 for the paper net, whose first out/2 kernels belong to the
    first tower and the rest to the second (fastalex keeps the towers as output-channel halves):
    each half is its own block of rows, the blocks `group_gap` white pixels apart. Each block of
    n kernels is cols * kw * scale + (cols + 1) * gap wide (cols = min(columns, n)) and
    rows * kh * scale + (rows + 1) * gap high (rows = ceil(n / cols)).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[1] != 3:
        raise ValueError(f"weight must be (out, 3, kh, kw), got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    for name, v, lo in (("groups", groups, 1), ("scale", scale, 1), ("columns", columns, 1), ("gap", gap, 0),
                        ("group_gap", group_gap, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if weight.shape[0] % groups:
        raise ValueError(f"{weight.shape[0]} kernels do not split into {groups} groups")
    if normalize not in ("kernel", "global"):
        raise ValueError(f"normalize must be 'kernel' or 'global', got {normalize!r}")
    w = weight.detach().float().cpu()
    dims = (1, 2, 3) if normalize == "kernel" else (0, 1, 2, 3)
    lo, hi = w.amin(dim=dims, keepdim=True), w.amax(dim=dims, keepdim=True)
    w = torch.where(hi > lo, (w - lo) / (hi - lo).clamp_min(1e-30), torch.full_like(w, 0.5))
    w = w.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)  # nearest-neighbour upscaling
    tiles = (w * 255).round().byte().permute(0, 2, 3, 1).numpy()  # (out, kh*s, kw*s, 3)
    th, tw = tiles.shape[1:3]
    blocks = []
    for part in np.split(tiles, groups):
        cols = min(columns, len(part))
        rows = math.ceil(len(part) / cols)
        block = np.full((rows * th + (rows + 1) * gap, cols * tw + (cols + 1) * gap, 3), 255, np.uint8)
        for i, t in enumerate(part):
            r, c = divmod(i, cols)
            y, x = gap + r * (th + gap), gap + c * (tw + gap)
            block[y:y + th, x:x + tw] = t
        blocks.append(block)
    out = blocks[0]
    for b in blocks[1:]:
        out = np.concatenate([out, np.full((group_gap, out.shape[1], 3), 255, np.uint8), b])
    return out


def save_png(image, path: str | os.PathLike) -> None:
    """Write a Pillow image or a uint8 (H, W, 3) array as a PNG (the folder is made if needed)."""
    from pathlib import Path

    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
