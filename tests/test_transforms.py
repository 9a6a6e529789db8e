"""fastalex.data.transforms: each step of the paper's pipeline against slicing / hand arithmetic,
the random ones against the draws of a fixed generator and their statistics, and the composed
train / eval / ten-crop pipelines."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from fastalex.data import transforms as T


def _image(c=3, h=9, w=11):
    """Distinct values everywhere, so a crop's content tells where it came from."""
    return torch.arange(c * h * w, dtype=torch.float32).view(c, h, w) / (c * h * w)


def _pil(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- to_tensor

def test_to_tensor():
    img = _pil(5, 7)
    x = T.to_tensor(img)
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.equal(x, torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255)
    grey = T.to_tensor(_pil(5, 7, "L"))
    assert grey.shape == (3, 5, 7) and torch.equal(grey[0], grey[1]) and torch.equal(grey[0], grey[2])
    assert torch.equal(grey[0], torch.from_numpy(np.array(_pil(5, 7, "L"))).float() / 255)
    assert torch.equal(T.to_tensor(np.array(img)), x)  # numpy HWC
    assert torch.equal(T.to_tensor(torch.from_numpy(np.array(img)).permute(2, 0, 1)), x)  # uint8 CHW
    assert T.to_tensor(np.zeros((4, 6), np.uint8)).shape == (3, 4, 6)
    f = torch.rand(1, 4, 6)
    assert torch.equal(T.to_tensor(f), f.expand(3, -1, -1))
    rgba = Image.fromarray(np.full((2, 3, 4), 200, np.uint8))
    assert torch.equal(T.to_tensor(rgba), torch.full((3, 2, 3), 200 / 255))
    with pytest.raises(TypeError, match="Pillow image"):
        T.to_tensor([1, 2, 3])
    with pytest.raises(TypeError, match="uint8 or floating"):
        T.to_tensor(torch.zeros(3, 2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="grey or RGB"):
        T.to_rgb(torch.zeros(2, 4, 4))


# ---------------------------------------------------------------------------------------------- resize, centre crop

@pytest.mark.parametrize("h,w,want", [(300, 400, (256, 341)), (400, 300, (341, 256)), (256, 256, (256, 256)),
                                      (100, 100, (256, 256)), (50, 1000, (256, 5120))])
def test_resize_short_side_sizes(h, w, want):
    out = T.resize_short_side(_pil(h, w), 256)
    assert (out.height, out.width) == want and out.mode == "RGB"
    assert T.resize_short_side(torch.rand(3, h, w), 256).shape == (3, *want)
    assert T.resize_short_side(torch.rand(2, 3, h, w), 256).shape == (2, 3, *want)


def test_resize_short_side_values():
    const = torch.full((3, 40, 60), 0.25)
    torch.testing.assert_close(T.resize_short_side(const, 20), torch.full((3, 20, 30), 0.25))  # weights sum to 1
    x = torch.rand(3, 20, 30)
    assert T.resize_short_side(x, 20) is x
    img = _pil(20, 30)
    assert T.resize_short_side(img, 20) is img
    # Pillow and torch resizes roughly agree (both bilinear, antialiased when shrinking).
    pil = T.to_tensor(T.resize_short_side(_pil(64, 96), 32))
    ten = T.resize_short_side(T.to_tensor(_pil(64, 96)), 32)
    assert (pil - ten).abs().mean() < 0.02
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="size must be a positive int"):
            T.ResizeShortSide(bad)
    with pytest.raises(TypeError, match="Pillow image or a tensor"):
        T.resize_short_side(np.zeros((4, 4)), 2)


@pytest.mark.parametrize("h,w,size", [(9, 11, 5), (10, 11, (4, 7)), (8, 8, 8), (9, 12, (1, 1))])
def test_center_crop_is_slicing(h, w, size):
    x = _image(3, h, w)
    ch, cw = (size, size) if isinstance(size, int) else size
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))  # torchvision's offsets
    assert torch.equal(T.center_crop(x, size), x[:, top:top + ch, left:left + cw])
    assert torch.equal(T.CenterCrop(size)(x[None])[0], x[:, top:top + ch, left:left + cw])
    img = _pil(h, w)
    assert torch.equal(T.to_tensor(T.center_crop(img, size)), T.center_crop(T.to_tensor(img), size))


def test_crop_larger_than_image_is_an_error():
    for fn in (lambda x: T.center_crop(x, (10, 4)), lambda x: T.random_crop(x, 10), lambda x: T.ten_crop(x, 10)):
        with pytest.raises(ValueError, match="crop 10x.* is larger than the image 9x11"):
            fn(_image())
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        T.center_crop(torch.zeros(5, 5), 2)


# ---------------------------------------------------------------------------------------------- random crop, flip

def test_random_crop_positions():
    x = _image(3, 6, 7)
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        out = T.random_crop(x, (4, 5), generator=g)
        hits = [(t, l) for t in range(3) for l in range(3) if torch.equal(out, x[:, t:t + 4, l:l + 5])]
        assert len(hits) == 1
        seen.add(hits[0])
    assert seen == {(t, l) for t in range(3) for l in range(3)}  # every position is reachable
    # The documented draws: top then left, each torch.randint over the valid offsets.
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    t, l = int(torch.randint(0, 3, (1,), generator=g2)), int(torch.randint(0, 3, (1,), generator=g2))
    assert torch.equal(T.RandomCrop((4, 5), generator=g1)(x), x[:, t:t + 4, l:l + 5])
    # Batched: one position per image.
    xb = torch.stack([x] * 64)
    out = T.random_crop(xb, (4, 5), generator=torch.Generator().manual_seed(1))
    assert out.shape == (64, 3, 4, 5) and len({tuple(o.flatten().tolist()) for o in out}) > 1


def test_random_hflip():
    x = _image()
    g = torch.Generator().manual_seed(0)
    assert all(torch.equal(T.random_hflip(x, 0.0, g), x) for _ in range(20))
    assert all(torch.equal(T.random_hflip(x, 1.0, g), x.flip(-1)) for _ in range(20))
    assert torch.equal(T.hflip(x)[..., 0], x[..., -1])
    flips = [torch.equal(T.RandomHorizontalFlip(0.5, g)(x), x.flip(-1)) for _ in range(2000)]
    assert abs(np.mean(flips) - 0.5) < 0.04  # 5 standard deviations of a fair coin over 2000 draws
    out = T.random_hflip(torch.stack([x] * 400), 0.5, g)
    flipped = [torch.equal(o, x.flip(-1)) for o in out]
    assert all(f or torch.equal(o, x) for f, o in zip(flipped, out)) and 0.4 < np.mean(flipped) < 0.6
    with pytest.raises(ValueError, match="p must be"):
        T.RandomHorizontalFlip(1.5)


# ---------------------------------------------------------------------------------------------- PCA noise

def test_pca_noise_offset_is_eigvec_alpha_eigval():
    x = torch.rand(3, 5, 6)
    out = T.pca_color_noise(x, 0.1, generator=torch.Generator().manual_seed(3))
    alpha = 0.1 * torch.randn(1, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)[0]
    vec, val = torch.tensor(T.PCA_EIGVEC, dtype=torch.float64), torch.tensor(T.PCA_EIGVAL, dtype=torch.float64)
    want = vec @ (alpha * val)  # one RGB offset for every pixel of this image
    offset = (out - x).double()
    torch.testing.assert_close(offset, want.view(3, 1, 1).expand(3, 5, 6), atol=1e-6, rtol=0)
    torch.testing.assert_close(offset.mean(dim=(1, 2)), want, atol=1e-6, rtol=0)
    assert torch.equal(T.pca_color_noise(x, 0.0), x)
    # Batched: each image its own alpha, the same ones as one image at a time from the same generator state.
    xb = torch.rand(4, 3, 2, 2)
    ob = T.PCAColorNoise(0.1, generator=torch.Generator().manual_seed(5))(xb)
    alphas = 0.1 * torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close((ob - xb).double().mean(dim=(2, 3)), (alphas * val) @ vec.T, atol=1e-6, rtol=0)


def test_pca_noise_statistics():
    n = 20000
    x = torch.zeros(n, 3, 1, 1)
    offsets = T.pca_color_noise(x, 0.1, generator=torch.Generator().manual_seed(0)).double().view(n, 3)
    vec, val = torch.tensor(T.PCA_EIGVEC, dtype=torch.float64), torch.tensor(T.PCA_EIGVAL, dtype=torch.float64)
    proj = offsets @ vec  # coordinates along the eigenvectors: independent N(0, (0.1 * eigval)^2)
    sd = 0.1 * val
    assert (proj.mean(0).abs() < 5 * sd / n ** 0.5).all()
    torch.testing.assert_close(proj.std(0), sd, rtol=0.03, atol=0)  # the sd of a sd estimate is ~0.5% here
    corr = torch.corrcoef(proj.T)
    assert (corr - torch.eye(3)).abs().max() < 0.04
    # The offsets live mostly along the first eigenvector (brightness): about 99% of the variance.
    assert 0.98 < (proj[:, 0].var() / proj.var(0).sum()).item() < 0.995
    with pytest.raises(ValueError, match="RGB"):
        T.pca_color_noise(torch.rand(1, 4, 4))
    with pytest.raises(ValueError, match="3x3"):
        T.PCAColorNoise(eigvec=[[1.0, 0.0]])


# ---------------------------------------------------------------------------------------------- normalise

def test_normalize_values():
    mean, std = torch.tensor(T.IMAGENET_MEAN), torch.tensor(T.IMAGENET_STD)
    x = torch.stack([mean + k * std for k in (-1.0, 0.0, 2.0)], dim=1).view(3, 1, 3)  # per channel: -1, 0, 2 sds
    out = T.Normalize()(x)
    torch.testing.assert_close(out, torch.tensor([-1.0, 0.0, 2.0]).expand(3, 1, 3), atol=1e-6, rtol=0)
    r = torch.rand(2, 3, 4, 5)
    torch.testing.assert_close(T.normalize(r), (r - mean.view(3, 1, 1)) / std.view(3, 1, 1), atol=0, rtol=0)
    assert T.normalize(r, 0.5, 0.25).sub(r.sub(0.5).div(0.25)).abs().max() == 0
    with pytest.raises(ValueError, match="std must be positive"):
        T.Normalize(std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="std must be positive"):
        T.normalize(r, 0.5, -1.0)


# ---------------------------------------------------------------------------------------------- ten-crop

@pytest.mark.parametrize("h,w,size", [(9, 11, 5), (10, 12, (4, 7)), (6, 6, 6)])
def test_ten_crop_is_slicing(h, w, size):
    x = _image(3, h, w)
    ch, cw = (size, size) if isinstance(size, int) else size
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    five = [x[:, :ch, :cw], x[:, :ch, w - cw:], x[:, h - ch:, :cw], x[:, h - ch:, w - cw:],
            x[:, top:top + ch, left:left + cw]]
    crops = T.TenCrop(size)(x)
    assert crops.shape == (10, 3, ch, cw)
    for i in range(5):
        assert torch.equal(crops[i], five[i])
        assert torch.equal(crops[5 + i], five[i].flip(-1))
    # The same set as torchvision's ten_crop (five crops of the image and of its mirror), except the
    # mirrored centre crop when the horizontal margin is odd: its rounded offset falls on the other side.
    mirror = x.flip(-1)
    corners = [mirror[:, :ch, :cw], mirror[:, :ch, w - cw:], mirror[:, h - ch:, :cw], mirror[:, h - ch:, w - cw:]]
    assert sorted(tuple(c.flatten().tolist()) for c in crops[5:9]) == sorted(tuple(c.flatten().tolist())
                                                                            for c in corners)
    assert torch.equal(crops[9], mirror[:, top:top + ch, left:left + cw]) == ((w - cw) % 2 == 0)
    batched = T.ten_crop(torch.stack([x, 2 * x]), size)
    assert batched.shape == (2, 10, 3, ch, cw) and torch.equal(batched[0], crops) and torch.equal(batched[1], 2 * crops)


def test_ten_crop_predict():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    crops = torch.rand(2, 10, 3, 4, 4)
    probs = T.ten_crop_predict(model, crops)
    want = torch.stack([torch.softmax(model(c), dim=-1).mean(0) for c in crops])
    torch.testing.assert_close(probs, want)
    assert seen[0] == (20, 3, 4, 4) and probs.shape == (2, 5) and not probs.requires_grad
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    torch.testing.assert_close(T.ten_crop_predict(model, crops[1]), want[1])
    # Not the same as averaging logits: a crop with huge logits does not dominate.
    assert not torch.allclose(probs, torch.softmax(model(crops.flatten(0, 1)).view(2, 10, 5).mean(1), -1))
    with pytest.raises(ValueError, match="crops must be"):
        T.ten_crop_predict(model, torch.rand(3, 4, 4))


# ---------------------------------------------------------------------------------------------- the paper's pipelines

def test_paper_eval_and_ten_crop_pipelines():
    img = _pil(300, 400)
    base = T.to_tensor(img.resize((341, 256), Image.BILINEAR).crop((42, 0, 298, 256)))  # short side 256, centre 256
    mean, std = torch.tensor(T.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(T.IMAGENET_STD).view(3, 1, 1)
    val = T.paper_eval_transform(227)(img)
    assert val.shape == (3, 227, 227)
    torch.testing.assert_close(val, (base[:, 14:241, 14:241] - mean) / std, atol=0, rtol=0)
    crops = T.paper_ten_crop_transform(227)(img)
    assert crops.shape == (10, 3, 227, 227)
    assert torch.equal(crops[4], val) and torch.equal(crops[9], val.flip(-1))
    torch.testing.assert_close(crops[0], (base[:, :227, :227] - mean) / std)
    grey = T.paper_eval_transform(224)(_pil(260, 256, "L"))
    assert grey.shape == (3, 224, 224)
    torch.testing.assert_close(grey * std + mean, (grey * std + mean)[:1].expand(3, -1, -1))  # same grey in R, G, B
    with pytest.raises(ValueError, match="larger than the 256x256"):
        T.paper_eval_transform(257)


def test_paper_train_pipeline():
    img = _pil(300, 400)
    t1 = T.paper_train_transform(227, generator=torch.Generator().manual_seed(0))
    t2 = T.paper_train_transform(227, generator=torch.Generator().manual_seed(0))
    a, b = t1(img), t2(img)
    assert a.shape == (3, 227, 227) and torch.equal(a, b)
    # By hand, from the same draws in the documented order: crop top, crop left, flip, PCA alpha.
    g = torch.Generator().manual_seed(0)
    base = T.to_tensor(img.resize((341, 256), Image.BILINEAR).crop((42, 0, 298, 256)))  # short side 256, centre 256
    mean, std = torch.tensor(T.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(T.IMAGENET_STD).view(3, 1, 1)
    vec, val = torch.tensor(T.PCA_EIGVEC, dtype=torch.float64), torch.tensor(T.PCA_EIGVAL, dtype=torch.float64)
    for i in range(6):
        out = a if i == 0 else t2(img)
        top, left = int(torch.randint(0, 30, (1,), generator=g)), int(torch.randint(0, 30, (1,), generator=g))
        flip = bool(torch.rand(1, generator=g)[0] < 0.5)
        alpha = 0.1 * torch.randn(1, 3, generator=g, dtype=torch.float64)[0]
        crop = base[:, top:top + 227, left:left + 227]
        crop = crop.flip(-1) if flip else crop
        want = (crop + (vec @ (alpha * val)).float().view(3, 1, 1) - mean) / std
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert len({o.sum().item() for o in [t1(img) for _ in range(5)]}) == 5  # fresh draws each time
    assert [type(s).__name__ for s in t1.transforms] == ["ResizeShortSide", "CenterCrop", "ToTensor", "RandomCrop",
                                                         "RandomHorizontalFlip", "PCAColorNoise", "Normalize"]
    assert "RandomCrop(size=(227, 227))" in repr(t1)


def test_transforms_pickle():
    x = _pil(40, 50)
    for t in (T.paper_train_transform(24, resize=32, generator=torch.Generator().manual_seed(1)),
              T.paper_eval_transform(24, resize=32), T.paper_ten_crop_transform(24, resize=32)):
        copy = pickle.loads(pickle.dumps(t))
        assert torch.equal(copy(x), t(x))  # a pickled generator keeps its state


# ---------------------------------------------------------------------------------------------- devices, dtypes

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def test_batched_transforms_make_no_cpu_tensors():
    """On "meta" an op mixing in a CPU tensor fails ("Tensor on device cpu is not on the expected device
    meta", or no value to read): the flips, PCA offsets and mean / std were CPU tensors before."""
    x = torch.empty(4, 3, 8, 8, device="meta")
    idx, flips = torch.tensor([0, 1, 2, 3]), torch.tensor([True, False, True, False])
    outs = [T.random_hflip(x), T.random_hflip(x, 1.0), T.pca_color_noise(x), T.normalize(x), T.random_crop(x, 5),
            T.ten_crop(x, 5), T.center_crop(x, 5), T.crop_batch(x, idx, idx.flip(0), 5, flips),
            T.random_hflip(x[0], 1.0), T.pca_color_noise(x[0]), T.normalize(x[0], 0.5, 0.25), T.random_crop(x[0], 5),
            T.Compose(T.paper_train_transform(5, resize=8).transforms[3:])(x[0]),
            T.pca_offset(torch.rand(4, 3, dtype=torch.float64), dtype=torch.float16, device="meta")]
    assert all(o.device.type == "meta" for o in outs)
    assert [tuple(o.shape) for o in outs[:8]] == [(4, 3, 8, 8)] * 4 + [(4, 3, 5, 5), (4, 10, 3, 5, 5), (4, 3, 5, 5),
                                                                      (4, 3, 5, 5)]
    assert outs[-1].dtype == torch.float16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12), (torch.float16, 2e-3),
                                       (torch.bfloat16, 1.6e-2)])  # ~2 roundings of values up to ~2.5
def test_batched_transforms_equal_the_per_image_ones(device, dtype, tol):
    x = torch.rand(6, 3, 9, 11, dtype=torch.float64).to(device, dtype)
    ref = x.double().cpu()
    g = lambda s: torch.Generator().manual_seed(s)
    # flips: one torch.rand per image, from the generator's device (the CPU), applied on x's device
    flips = torch.rand(6, generator=g(1)) < 0.5
    out = T.random_hflip(x, 0.5, g(1))
    assert out.device == x.device and out.dtype == dtype and 0 < int(flips.sum()) < 6
    assert torch.equal(out, torch.stack([x[i].flip(-1) if flips[i] else x[i] for i in range(6)]))
    # crops: all tops, then all lefts
    gen = g(2)
    tops, lefts = torch.randint(0, 4, (6,), generator=gen), torch.randint(0, 5, (6,), generator=gen)
    out = T.random_crop(x, (6, 7), generator=g(2))
    want = torch.stack([x[i, :, t:t + 6, l:l + 7] for i, (t, l) in enumerate(zip(tops.tolist(), lefts.tolist()))])
    assert out.device == x.device and torch.equal(out, want)
    both = T.crop_batch(x, tops, lefts, (6, 7), flips)
    assert torch.equal(both, torch.stack([w.flip(-1) if f else w for w, f in zip(want, flips)]))
    assert torch.equal(T._gather_crops(x, tops, lefts, 6, 7, flips), both)  # the non-CPU path, run here
    # PCA noise: each image its alpha row; the batch equals image by image, and the float64 formula
    alphas = 0.1 * torch.randn(6, 3, generator=g(3), dtype=torch.float64)
    out = T.pca_color_noise(x, 0.1, generator=g(3))
    assert out.device == x.device and out.dtype == dtype
    per = torch.stack([x[i] + T.pca_offset(alphas[i:i + 1], dtype=dtype, device=device).view(3, 1, 1)
                       for i in range(6)])
    assert torch.equal(out, per)
    vec, val = torch.tensor(T.PCA_EIGVEC, dtype=torch.float64), torch.tensor(T.PCA_EIGVAL, dtype=torch.float64)
    torch.testing.assert_close(out.double().cpu(), ref + ((alphas * val) @ vec.T).view(6, 3, 1, 1), atol=tol, rtol=0)
    # normalisation and ten crops
    out = T.normalize(x)
    assert out.dtype == dtype and torch.equal(out, torch.stack([T.normalize(x[i]) for i in range(6)]))
    mean, std = torch.tensor(T.IMAGENET_MEAN, dtype=torch.float64), torch.tensor(T.IMAGENET_STD, dtype=torch.float64)
    torch.testing.assert_close(out.double().cpu(), (ref - mean.view(3, 1, 1)) / std.view(3, 1, 1), atol=10 * tol,
                               rtol=0)  # (/ std: values up to ~2.6 / 0.225)
    assert torch.equal(T.ten_crop(x, 5), torch.stack([T.ten_crop(x[i], 5) for i in range(6)]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_draws_on_a_cuda_generator():
    x = torch.rand(4, 3, 8, 8, device="cuda")
    for fn in (lambda gen: T.random_hflip(x, 0.5, gen), lambda gen: T.pca_color_noise(x, 0.1, generator=gen),
               lambda gen: T.random_crop(x, 5, gen), lambda gen: T.random_crop(x[0], 5, gen)):
        a = fn(torch.Generator("cuda").manual_seed(0))
        assert a.device.type == "cuda" and torch.equal(a, fn(torch.Generator("cuda").manual_seed(0)))
    # the global / a CPU generator: the same draws whatever the image's device
    assert torch.equal(T.RandomCrop(5, torch.Generator().manual_seed(1))(x[0]).cpu(),
                       T.RandomCrop(5, torch.Generator().manual_seed(1))(x[0].cpu()))
