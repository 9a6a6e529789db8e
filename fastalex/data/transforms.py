"""The paper's image pipeline as small composable transforms (ALEXNET.md, "Preprocessing").

    train = paper_train_transform(227)     # short side 256, centre 256 crop, random 227 crop + flip,
                                           # PCA colour noise (sigma 0.1), ImageNet mean/std
    val = paper_eval_transform(227)        # the same, with the centre 227 crop and no noise
    test = paper_ten_crop_transform(227)   # (10, 3, 227, 227): 4 corners + centre, and their flips
    probs = ten_crop_predict(model, crops) # softmax averaged over the 10 crops

Images are CHW float tensors with values in [0, 1] (`to_tensor` makes them from Pillow images,
numpy arrays or uint8 tensors; grey images become 3 channels). `ResizeShortSide` and `CenterCrop`
also take Pillow images, so the first, most expensive steps can run on uint8 pixels.

Random transforms draw from `generator` when one is given, else from torch's global (CPU) RNG. In
DataLoader workers leave it None: each worker gets a copy of a passed generator (same state, so the
same draws in every worker), while torch seeds every worker's global RNG differently.

Every tensor transform works on the image's own device and dtype (CPU, CUDA, even "meta"): its
constants (mean, std, PCA eigenvectors) are made there, and its random numbers are drawn on the
generator's device (the CPU for the global RNG, so the draws do not depend on where the image is)
and then moved. `crop_batch` and `pca_offset` are the pieces the batched store path
(fastalex.data.store.augment_batch) shares with these, so both give the same pixels.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

try:
    from PIL import Image
except ImportError:  # Pillow is a dependency; the tensor transforms work without it
    Image = None

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "PCA_EIGVAL", "PCA_EIGVEC",
    "to_tensor", "to_rgb", "resize_short_side", "center_crop", "random_crop", "crop_batch", "hflip", "random_hflip",
    "pca_offset", "pca_color_noise", "normalize", "ten_crop", "ten_crop_predict",
    "Compose", "ToTensor", "ResizeShortSide", "CenterCrop", "RandomCrop", "RandomHorizontalFlip",
    "PCAColorNoise", "Normalize", "TenCrop",
    "paper_train_transform", "paper_eval_transform", "paper_ten_crop_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# "Fancy PCA" constants for RGB pixels in [0, 1]: eigenvalues, and eigenvectors as the COLUMNS of PCA_EIGVEC
# (rows R, G, B).
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
              (-0.5808, -0.0045, -0.8140),
              (-0.5836, -0.6948, 0.4203))


def _size(size, name: str = "size") -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size)):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {size!r}")
    return int(size[0]), int(size[1])


def _is_pil(img) -> bool:
    return Image is not None and isinstance(img, Image.Image)


def _check_image(x, name: str = "image", batched: bool = True) -> None:
    ok = isinstance(x, torch.Tensor) and (x.dim() == 3 or (batched and x.dim() == 4))
    if not ok:
        want = "(C, H, W) or (N, C, H, W)" if batched else "(C, H, W)"
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a {want} tensor, got {got}")


def _hw(img) -> tuple[int, int]:
    return (img.height, img.width) if _is_pil(img) else (int(img.shape[-2]), int(img.shape[-1]))


# ---------------------------------------------------------------------------------------------- functions

def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """(H, W) or (1, H, W) grey -> (3, H, W); (N, 1, H, W) -> (N, 3, H, W); 3 channels pass through."""
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() not in (3, 4) or x.shape[-3] not in (1, 3):
        raise ValueError(f"expected a grey or RGB image (H, W), (1|3, H, W) or (N, 1|3, H, W), got {tuple(x.shape)}")
    if x.shape[-3] == 1:
        x = x.expand(*x.shape[:-3], 3, *x.shape[-2:]).contiguous()
    return x


def to_tensor(img) -> torch.Tensor:
    """A Pillow image, a numpy array (H, W) / (H, W, C) or a tensor (H, W) / (C, H, W) -> float (3, H, W).

    uint8 values are divided by 255; float values are kept. Grey becomes RGB; Pillow images of any
    mode go through convert("RGB").
    """
    if _is_pil(img):
        x = torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
    elif isinstance(img, np.ndarray):
        if img.ndim == 3:  # numpy images are channels-last
            img = np.moveaxis(img, -1, 0)
        x = torch.from_numpy(np.ascontiguousarray(img))
    elif isinstance(img, torch.Tensor):
        x = img
    else:
        raise TypeError(f"to_tensor takes a Pillow image, a numpy array or a tensor, got {type(img).__name__}")
    if x.dtype == torch.uint8:
        x = x.contiguous().float().div_(255)
    elif not x.is_floating_point():
        raise TypeError(f"image values must be uint8 or floating point, got {x.dtype}")
    if x.dim() == 3 and x.shape[0] == 4:  # RGBA tensor/array: drop alpha, like convert("RGB")
        x = x[:3]
    return to_rgb(x).contiguous()


def _short_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    # torchvision's rule: the short side becomes `size`, the long side scales and is truncated.
    return (size, int(size * w / h)) if h <= w else (int(size * h / w), size)


def resize_short_side(img, size: int = 256):
    """Rescale so that the short side is `size` (bilinear, antialiased when shrinking).

    A Pillow image gives a Pillow image; a float tensor (C, H, W) or (N, C, H, W) a tensor.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    h, w = _hw(img) if _is_pil(img) or isinstance(img, torch.Tensor) else (None, None)
    if h is None:
        raise TypeError(f"resize_short_side takes a Pillow image or a tensor, got {type(img).__name__}")
    nh, nw = _short_side_size(h, w, size)
    if (nh, nw) == (h, w):
        return img
    if _is_pil(img):
        return img.resize((nw, nh), Image.BILINEAR)  # Pillow's bilinear filter widens when shrinking
    _check_image(img)
    if not img.is_floating_point():
        raise TypeError(f"tensor images to resize must be floating point, got {img.dtype}")
    x = img.unsqueeze(0) if img.dim() == 3 else img
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=nh < h or nw < w)
    return x[0] if img.dim() == 3 else x


def _crop(img, top: int, left: int, h: int, w: int):
    if _is_pil(img):
        return img.crop((left, top, left + w, top + h))
    return img[..., top:top + h, left:left + w]


def _check_fits(img, h: int, w: int) -> tuple[int, int]:
    ih, iw = _hw(img)
    if h > ih or w > iw:
        raise ValueError(f"crop {h}x{w} is larger than the image {ih}x{iw}")
    return ih, iw


def center_crop(img, size):
    """The centre (h, w) window of a Pillow image or a (..., H, W) tensor (offsets rounded like torchvision's)."""
    h, w = _size(size)
    if not _is_pil(img):
        _check_image(img)
    ih, iw = _check_fits(img, h, w)
    return _crop(img, int(round((ih - h) / 2.0)), int(round((iw - w) / 2.0)), h, w)


def _draw_device(generator: torch.Generator | None) -> torch.device:
    # Draws happen where the generator lives (torch refuses a CPU generator for a CUDA draw); the
    # global RNG is the CPU's, so an image's draws do not depend on the image's device.
    return generator.device if generator is not None else torch.device("cpu")


def crop_batch(x: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, size,
               flips: torch.Tensor | None = None) -> torch.Tensor:
    """Image i's (h, w) window at (tops[i], lefts[i]), mirrored where flips[i]: (N, C, H, W) -> (N, C, h, w).

    tops, lefts: (N,) integer tensors, flips: (N,) bool (None: no flips), on any device. On the
    CPU a slice per image (the offsets read to the host: row copies, the fastest there); elsewhere
    one gather with index tensors on x's device (one kernel, no host sync).
    """
    h, w = _size(size)
    _check_image(x)
    if x.dim() != 4:
        raise ValueError(f"crop_batch needs a batch (N, C, H, W), got {tuple(x.shape)}")
    _check_fits(x, h, w)
    n = x.shape[0]
    if x.device.type == "cpu":
        t, l = tops.tolist(), lefts.tolist()
        f = flips.tolist() if flips is not None else [False] * n
        crops = [_crop(x[i], t[i], l[i], h, w) for i in range(n)]
        return torch.stack([c.flip(-1) if fi else c for c, fi in zip(crops, f)]) if n else x[:, :, :h, :w].clone()
    return _gather_crops(x, tops, lefts, h, w, flips)


def _gather_crops(x: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, h: int, w: int,
                  flips: torch.Tensor | None) -> torch.Tensor:
    """crop_batch as one advanced-indexing gather on x's device (any device; the CPU path's twin)."""
    n = x.shape[0]
    rows = tops.to(x.device).view(n, 1) + torch.arange(h, device=x.device)      # (N, h)
    step = torch.arange(w, device=x.device)
    if flips is not None:
        step = torch.where(flips.to(x.device).view(n, 1), w - 1 - step, step)  # (N, w): mirrored columns
    cols = lefts.to(x.device).view(n, 1) + step
    b = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    c = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    return x[b, c, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


def random_crop(x: torch.Tensor, size, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly placed (h, w) window of a (C, H, W) tensor (one draw per image for (N, C, H, W)).

    Draws: all tops `torch.randint(0, H - h + 1, (n,))`, then all lefts, on the generator's device.
    """
    h, w = _size(size)
    _check_image(x)
    ih, iw = _check_fits(x, h, w)
    n = 1 if x.dim() == 3 else x.shape[0]
    dev = _draw_device(generator)
    tops = torch.randint(0, ih - h + 1, (n,), generator=generator, device=dev)
    lefts = torch.randint(0, iw - w + 1, (n,), generator=generator, device=dev)
    if x.dim() == 3:
        return _crop(x, int(tops[0]), int(lefts[0]), h, w)
    return crop_batch(x, tops, lefts, (h, w))


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror left-right (the last dimension)."""
    return x.flip(-1)


def random_hflip(x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror with probability p (one draw per image for (N, C, H, W))."""
    _check_image(x)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p!r}")
    flip = torch.rand(1 if x.dim() == 3 else x.shape[0], generator=generator, device=_draw_device(generator)) < p
    if x.dim() == 3:
        return x.flip(-1) if bool(flip[0]) else x
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def pca_offset(alpha: torch.Tensor, eigval=PCA_EIGVAL, eigvec=PCA_EIGVEC, *, dtype: torch.dtype | None = None,
               device=None) -> torch.Tensor:
    """The RGB offsets eigvec @ (alpha_i * eigval): alpha (n, 3) -> (n, 3), in dtype on device.

    alpha is moved to (device, dtype) first (cast, then moved: a device may lack float64), and the
    3-term sums are written out instead of a matmul, so the result is the same bits for any n and
    on any device (a matmul may take TF32 or another summation order).
    """
    dtype = dtype or alpha.dtype
    device = torch.device(device) if device is not None else alpha.device
    a = alpha.to(dtype).to(device)
    val = torch.as_tensor(eigval, dtype=dtype, device=device)
    vec = torch.as_tensor(eigvec, dtype=dtype, device=device)
    t = (a * val).unsqueeze(1) * vec  # (n, 3, 3): t[i, r, k] = alpha_ik * eigval_k * eigvec_rk
    return t[..., 0] + t[..., 1] + t[..., 2]


def pca_color_noise(x: torch.Tensor, sigma: float = 0.1, eigval=PCA_EIGVAL, eigvec=PCA_EIGVEC,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The paper's "fancy PCA": add eigvec @ (alpha * eigval) to every RGB pixel, alpha ~ N(0, sigma^2).

    x: (3, H, W) or (N, 3, H, W) float, pixels in [0, 1] (before normalisation). alpha is drawn as
    `sigma * torch.randn(n, 3, generator=generator, dtype=torch.float64)` on the generator's device,
    a row per image (n = 1 for one image); the offset is computed in x's dtype on x's device (pca_offset).
    """
    _check_image(x)
    if x.shape[-3] != 3 or not x.is_floating_point():
        raise ValueError(f"PCA colour noise needs float RGB images (3, H, W) or (N, 3, H, W), got "
                         f"{tuple(x.shape)} {x.dtype}")
    n = 1 if x.dim() == 3 else x.shape[0]
    alpha = sigma * torch.randn(n, 3, generator=generator, dtype=torch.float64, device=_draw_device(generator))
    offset = pca_offset(alpha, eigval, eigvec, dtype=x.dtype, device=x.device).view(n, 3, 1, 1)
    return x + (offset[0] if x.dim() == 3 else offset)


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(x - mean) / std per channel, for (C, H, W) or (N, C, H, W)."""
    _check_image(x)
    # Checked on the values given (host numbers, or the tensor where it lives), not on a copy made
    # on x's device: that would cost a device sync per call and cannot be read on "meta".
    given = std.detach().cpu().numpy() if isinstance(std, torch.Tensor) and std.device.type != "meta" else std
    if not isinstance(given, torch.Tensor) and (np.asarray(given, dtype=np.float64) <= 0).any():
        raise ValueError(f"std must be positive, got {np.asarray(given, dtype=np.float64).flatten().tolist()}")
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


def ten_crop(x: torch.Tensor, size) -> torch.Tensor:
    """The 10 test crops: (C, H, W) -> (10, C, h, w); (N, C, H, W) -> (N, 10, C, h, w).

    Order: top-left, top-right, bottom-left, bottom-right, centre, then the horizontal flip of each
    of those five (crop 5 + i is crop i mirrored). The set equals torchvision's ten_crop, but for the
    mirrored centre crop when a margin is odd: torchvision takes the centre crop of the mirrored image,
    whose rounded offset falls one pixel to the other side.
    """
    h, w = _size(size)
    _check_image(x)
    ih, iw = _check_fits(x, h, w)
    top, left = int(round((ih - h) / 2.0)), int(round((iw - w) / 2.0))
    five = [_crop(x, 0, 0, h, w), _crop(x, 0, iw - w, h, w), _crop(x, ih - h, 0, h, w),
            _crop(x, ih - h, iw - w, h, w), _crop(x, top, left, h, w)]
    crops = torch.stack(five, dim=-4)
    return torch.cat([crops, crops.flip(-1)], dim=-4)


@torch.no_grad()
def ten_crop_predict(model: Callable[[torch.Tensor], torch.Tensor], crops: torch.Tensor) -> torch.Tensor:
    """Class probabilities averaged over crops: (N, K, 3, h, w) -> (N, classes); (K, 3, h, w) -> (classes,).

    The model sees the N*K crops as one batch (put it in eval mode first); its logits go through a
    softmax per crop and the K probability vectors of each image are averaged (the paper's test).
    """
    if not isinstance(crops, torch.Tensor) or crops.dim() not in (4, 5):
        raise ValueError(f"crops must be (K, C, h, w) or (N, K, C, h, w), got "
                         f"{tuple(crops.shape) if isinstance(crops, torch.Tensor) else type(crops).__name__}")
    single = crops.dim() == 4
    if single:
        crops = crops.unsqueeze(0)
    n, k = crops.shape[:2]
    logits = model(crops.reshape(n * k, *crops.shape[2:]))
    probs = torch.softmax(logits.float(), dim=-1).view(n, k, -1).mean(dim=1)
    return probs[0] if single else probs


# ---------------------------------------------------------------------------------------------- classes
# Picklable callables (no lambdas), so DataLoader workers can receive them.

class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"Compose([{inner}\n])"


class _Transform:
    _fields: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{f}={getattr(self, f)!r}' for f in self._fields)})"


class ToTensor(_Transform):
    """Pillow image / numpy array / tensor -> float (3, H, W) in [0, 1]; see to_tensor."""

    def __call__(self, img) -> torch.Tensor:
        return to_tensor(img)


class ResizeShortSide(_Transform):
    _fields = ("size",)

    def __init__(self, size: int = 256):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.size = size

    def __call__(self, img):
        return resize_short_side(img, self.size)


class CenterCrop(_Transform):
    _fields = ("size",)

    def __init__(self, size):
        self.size = _size(size)

    def __call__(self, img):
        return center_crop(img, self.size)


class RandomCrop(_Transform):
    _fields = ("size",)

    def __init__(self, size, generator: torch.Generator | None = None):
        self.size, self.generator = _size(size), generator

    def __call__(self, x):
        return random_crop(x, self.size, self.generator)


class RandomHorizontalFlip(_Transform):
    _fields = ("p",)

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        self.p, self.generator = p, generator

    def __call__(self, x):
        return random_hflip(x, self.p, self.generator)


class PCAColorNoise(_Transform):
    _fields = ("sigma",)

    def __init__(self, sigma: float = 0.1, eigval=PCA_EIGVAL, eigvec=PCA_EIGVEC,
                 generator: torch.Generator | None = None):
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma!r}")
        if np.shape(eigval) != (3,) or np.shape(eigvec) != (3, 3):
            raise ValueError(f"eigval must have 3 values and eigvec be 3x3, got shapes {np.shape(eigval)}, "
                             f"{np.shape(eigvec)}")
        self.sigma, self.eigval, self.eigvec, self.generator = sigma, eigval, eigvec, generator

    def __call__(self, x):
        return pca_color_noise(x, self.sigma, self.eigval, self.eigvec, self.generator)


class Normalize(_Transform):
    _fields = ("mean", "std")

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        if any(s <= 0 for s in np.atleast_1d(std)):
            raise ValueError(f"std must be positive, got {std!r}")
        self.mean, self.std = tuple(np.atleast_1d(mean).tolist()), tuple(np.atleast_1d(std).tolist())

    def __call__(self, x):
        return normalize(x, self.mean, self.std)


class TenCrop(_Transform):
    _fields = ("size",)

    def __init__(self, size):
        self.size = _size(size)

    def __call__(self, x):
        return ten_crop(x, self.size)


# ---------------------------------------------------------------------------------------------- the paper's

def _base(image_size, resize: int) -> tuple[int, int]:
    size = _size(image_size, "image_size")
    if max(size) > resize:
        raise ValueError(f"image_size {size} is larger than the {resize}x{resize} centre crop it is cut from")
    return size


def paper_train_transform(image_size=227, *, resize: int = 256, pca_sigma: float = 0.1, mean=IMAGENET_MEAN,
                          std=IMAGENET_STD, generator: torch.Generator | None = None) -> Compose:
    """Training: short side to 256, centre 256 crop, random image_size crop, flip (p=0.5), PCA noise, normalise."""
    size = _base(image_size, resize)
    return Compose([ResizeShortSide(resize), CenterCrop(resize), ToTensor(), RandomCrop(size, generator),
                    RandomHorizontalFlip(0.5, generator), PCAColorNoise(pca_sigma, generator=generator),
                    Normalize(mean, std)])


def paper_eval_transform(image_size=227, *, resize: int = 256, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Compose:
    """Validation, one crop: short side to 256, centre 256 crop, centre image_size crop, normalise."""
    size = _base(image_size, resize)
    return Compose([ResizeShortSide(resize), CenterCrop(resize), ToTensor(), CenterCrop(size), Normalize(mean, std)])


def paper_ten_crop_transform(image_size=227, *, resize: int = 256, mean=IMAGENET_MEAN,
                             std=IMAGENET_STD) -> Compose:
    """Test, ten crops: short side to 256, centre 256 crop, normalise, TenCrop -> (10, 3, S, S)."""
    size = _base(image_size, resize)
    return Compose([ResizeShortSide(resize), CenterCrop(resize), ToTensor(), Normalize(mean, std), TenCrop(size)])
