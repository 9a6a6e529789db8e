"""fastalex conv2d (+bias, +ReLU) vs torch in float64: output, input/weight/bias gradients, errors."""

import re

import pytest
import torch
import torch.nn.functional as TF

import fastalex
import fastalex.functional as F
from fastalex.kernels import _common
from fastalex.kernels import conv2d as K
from fastalex.kernels._geometry import output_size
from reference import assert_close, make_input, ref_inputs

# AlexNet's five convolutions with channels, batch and image scaled down:
# (name, N, C_in, H, W, C_out, kernel, stride, padding, groups, input_needs_grad)
ALEXNET = [
    ("conv1", 2, 3, 27, 27, 8, 11, 4, 0, 1, False),  # 227 -> 55 in the paper net; 27 -> 5 here
    ("conv2", 2, 16, 9, 9, 16, 5, 1, 2, 2, True),
    ("conv3", 2, 16, 7, 7, 24, 3, 1, 1, 1, True),
    ("conv4", 2, 24, 7, 7, 24, 3, 1, 1, 2, True),
    ("conv5", 2, 24, 7, 7, 16, 3, 1, 1, 2, True),
]


def _masked(dy, y, relu: bool):
    """dy under y's ReLU mask, as the op applies it before both gradient kernels (threshold_backward)."""
    return torch.ops.aten.threshold_backward(dy, y, 0) if relu else dy


def _check(device, dtype, x, w, b, relu=True, **conv):
    """Run fastalex (Triton backend) and the float64 torch reference; compare output and grads."""
    xr, wr, br = ref_inputs(x, w, b)
    pre = TF.conv2d(xr, wr, br, **conv)
    ref = torch.relu(pre) if relu else pre
    with fastalex.backend("triton"):
        y = F.conv2d(x, w, b, activation="relu" if relu else None, **conv)
    assert y.dtype == x.dtype and y.device == x.device
    assert_close(y, ref, dtype, device, "output")
    dy = torch.randn(ref.shape, dtype=torch.float64)
    # The gradients follow the kernel's own ReLU mask: on a GPU (tf32) outputs within rounding of
    # zero can flip sign, each moving a whole dy element, which says nothing about the backward.
    (pre * ~(y.detach().cpu().double() <= 0) if relu else pre).backward(dy)  # NaN keeps dy, as torch
    y.backward(dy.to(device=device, dtype=dtype))
    for name, t, r in (("input", x, xr), ("weight", w, wr), ("bias", b, br)):
        if t is None:
            continue
        if not t.requires_grad:
            assert t.grad is None
            continue
        assert t.grad is not None and t.grad.dtype == t.dtype
        assert_close(t.grad, r.grad, dtype, device, f"grad_{name}")
    return y


@pytest.mark.parametrize("cfg", ALEXNET, ids=[c[0] for c in ALEXNET])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_alexnet_layers(device, cfg, dtype):
    _, N, C, H, W, Co, k, s, p, g, xgrad = cfg
    x = make_input((N, C, H, W), dtype, device, requires_grad=xgrad)
    w = make_input((Co, C // g, k, k), dtype, device, scale=0.2)
    b = make_input((Co,), dtype, device)
    _check(device, dtype, x, w, b, stride=s, padding=p, groups=g)


@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous"])
@pytest.mark.parametrize("cfg", [ALEXNET[1], ALEXNET[3]], ids=["conv2", "conv4"])
def test_layouts(device, cfg, layout):
    _, N, C, H, W, Co, k, s, p, g, _ = cfg
    x = make_input((N, C, H, W), torch.float32, device, layout=layout)
    w = make_input((Co, C // g, k, k), torch.float32, device, layout=layout, scale=0.2)
    b = make_input((Co,), torch.float32, device)
    y = _check(device, torch.float32, x, w, b, stride=s, padding=p, groups=g)
    if layout == "channels_last":
        # torch's conv keeps channels_last; so does the input gradient
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert x.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
@pytest.mark.parametrize("cfg", [ALEXNET[0], ALEXNET[3]], ids=["conv1", "conv4"])
def test_gpu_layout_routes_through_channels_last(device, cfg, layout, monkeypatch):
    """On a GPU (CHANNELS_LAST_DEVICES) an NCHW or strided input runs on the channels_last kernels:
    the launches see channels-contiguous x, the output comes back channels_last, and values and
    gradients (the input's in its own layout) match float64."""
    import fastalex.ops.conv2d as op

    monkeypatch.setattr(op, "CHANNELS_LAST_DEVICES", (torch.device(device).type,))
    seen = []
    forward = K.conv2d_forward
    monkeypatch.setattr(K, "conv2d_forward", lambda x, *a, **kw: seen.append(x.stride()) or forward(x, *a, **kw))
    _, N, C, H, W, Co, k, s, p, g, _ = cfg
    x = make_input((N, C, H, W), torch.float32, device, layout=layout, requires_grad=True)
    w = make_input((Co, C // g, k, k), torch.float32, device, scale=0.2)
    b = make_input((Co,), torch.float32, device)
    y = _check(device, torch.float32, x, w, b, stride=s, padding=p, groups=g)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert seen and seen[0][1] == 1  # the forward launch read channels-contiguous x
    assert x.grad.shape == x.shape


ODD = [
    # (N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups, relu, bias)
    (1, 3, 10, 7, 5, (3, 5), 1, 0, 1, 1, True, True),
    (3, 5, 9, 11, 7, 3, (2, 3), (1, 2), 1, 1, False, True),
    (2, 6, 12, 12, 6, 3, 2, 2, 2, 3, True, False),  # padding > half the kernel, dilation, 3 groups
    (2, 4, 8, 9, 4, 4, 1, "same", 1, 1, True, True),  # even kernel: torch pads one more at the end
    (1, 4, 9, 8, 6, 2, 1, "same", (2, 3), 2, False, True),
    (2, 4, 6, 6, 3, 3, 1, "valid", 1, 1, True, True),
    (2, 2, 13, 13, 3, 5, 3, 1, 1, 1, True, True),  # stride 3: only some taps reach each input pixel
    (1, 40, 5, 5, 70, 1, 1, 0, 1, 1, True, True),  # channel counts over one block, 1x1 kernel
    (2, 8, 5, 5, 16, 3, 1, 1, 1, 8, True, True),  # depthwise-like: one input channel per group
    (2, 3, 7, 6, 4, (1, 2), 1, "same", 1, 1, True, True),  # no top/left padding, one column at the right
]


@pytest.mark.parametrize("case", ODD, ids=[f"odd{i}" for i in range(len(ODD))])
def test_odd_shapes(device, case):
    N, C, H, W, Co, k, s, p, d, g, relu, bias = case
    k = k if isinstance(k, tuple) else (k, k)
    x = make_input((N, C, H, W), torch.float32, device)
    w = make_input((Co, C // g, *k), torch.float32, device, scale=0.3)
    b = make_input((Co,), torch.float32, device) if bias else None
    _check(device, torch.float32, x, w, b, relu=relu, stride=s, padding=p, dilation=d, groups=g)


@pytest.mark.parametrize("case", [
    # (N, C_in, H, W, C_out, kernel, stride, padding, groups, layout): the three K paths, ragged columns
    (2, 3, 15, 15, 40, 5, 2, 0, 1, "channels_last", torch.float32),  # row blocks (3 channels, NHWC); 40 = 32 + 8
    (1, 128, 5, 5, 80, 3, 1, 1, 1, "channels_last", torch.float32),  # tap blocks (128 channels); 2 column programs
    (1, 256, 5, 5, 96, 3, 1, 1, 2, "channels_last", torch.bfloat16),  # tap blocks in 2 groups, bf16 (paper conv4)
    (2, 6, 9, 9, 96, 3, 1, 1, 2, "contiguous", torch.float32),  # the flat K path (NCHW), 48 a group
])
def test_forward_second_column_tile(device, case, monkeypatch):
    """BLOCK_N2: a program's columns as BLOCK_N + BLOCK_N / 2 (on GPUs 128 + 64 for 192 and 384
    channels), forced here at 32 + 16 in every K path, partly and wholly masked tiles included."""
    N, C, H, W, Co, k, s, p, g, layout, dtype = case
    monkeypatch.setattr(K, "_fwd_tiles", lambda cfg, m, cog, groups, dtype, device: (dict(cfg, BLOCK_N=32), 16))
    spy = _LaunchSpy(K._conv2d_fwd_kernel)
    monkeypatch.setattr(K, "_conv2d_fwd_kernel", spy)
    x = make_input((N, C, H, W), dtype, device, layout=layout)
    w = make_input((Co, C // g, k, k), dtype, device, scale=0.2)
    b = make_input((Co,), dtype, device)
    _check(device, dtype, x, w, b, stride=s, padding=p, groups=g)
    kw = spy.kwargs[0]
    assert kw["BLOCK_N2"] == 16 and kw["BLOCK_N"] == 32
    assert spy.grids[0][1] == -(-(Co // g) // 48)
    assert kw["ROW_BLOCKS"] == (C == 3) and kw["TAP_BLOCKS"] == (C // g == 128)


def test_split_n():
    """128 + 64 columns on 128 rows where a wide tile leaves a quarter of its columns empty and 192 fits:
    384 and 192 channels on fp32's 128x256, 192 on 16-bit types' 256x128; 64 + 32 where a 128-column
    tile would take 96 (conv2's input gradient), BLOCK_K 32 fp32 / 64 bf16; one tile otherwise."""
    def split(cog, bm, bn, dtype=torch.float32):
        cfg, n2 = K._split_n(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=32, num_warps=8, num_stages=3), cog, dtype)
        return cfg["BLOCK_M"], cfg["BLOCK_N"], n2

    assert split(384, 128, 256) == (128, 128, 64) and split(192, 128, 256) == (128, 128, 64)
    assert split(192, 256, 128, torch.bfloat16) == (128, 128, 64)  # the paper net's conv4 (and conv4-5 dgrad)
    assert split(256, 128, 256) == (128, 256, 0) and split(384, 256, 128) == (256, 128, 0)
    assert split(200, 128, 256) == (128, 256, 0) and split(512, 256, 128) == (256, 128, 0)
    assert split(160, 128, 128) == (128, 128, 0) and split(100, 128, 128) == (128, 128, 0)
    assert split(48, 128, 64) == (128, 64, 0) and split(96, 64, 128) == (64, 128, 0)  # 32 + 16, 64 rows: no
    for dtype, k in ((torch.float32, 32), (torch.bfloat16, 64), (torch.float16, 64)):
        for cog, bm in ((96, 128), (96, 256), (288, 256), (192, 128)):  # conv2's dgrad on fp32's and bf16's tiles
            cfg, n2 = K._split_n(dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3), cog, dtype)
            assert (cfg["BLOCK_M"], cfg["BLOCK_N"], n2, cfg["BLOCK_K"], cfg["num_warps"]) == (128, 64, 32, k, 8)
            K.check_config(cfg, dtype, n2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_grad_96_channels_split(device, dtype, monkeypatch):
    """conv2's input gradient (96 input channels, 5 x 5, padding 2) from the GPU's base tile, which the
    launcher splits to 128 x (64 + 32): the forward kernel's tap-bit path with both column tiles, a
    partial row tile (49 positions of 128), against float64."""
    small = dtype == torch.bfloat16
    base = dict(BLOCK_M=256 if small else 128, BLOCK_N=128, BLOCK_K=32, num_warps=8 if small else 4, num_stages=3)
    with monkeypatch.context() as gpu:
        gpu.setattr(K, "is_interpreting", lambda: False)
        assert K._config("fwd", dtype, 128 * 27 * 27, 96) == base  # what a GPU picks before the split
    monkeypatch.setattr(K, "_config", lambda kind, dt, m, n: dict(base))
    spy = _LaunchSpy(K._conv2d_fwd_kernel)
    monkeypatch.setattr(K, "_conv2d_fwd_kernel", spy)
    w = make_input((64, 96, 5, 5), dtype, device, layout="channels_last", requires_grad=False, scale=0.1)
    dy = make_input((1, 64, 7, 7), dtype, device, layout="channels_last", requires_grad=False)
    dx = K.conv2d_input_grad(dy, w, (1, 96, 7, 7), (1, 1), (2, 2), (1, 1), 1, channels_last=True)
    kw = spy.kwargs[-1]
    assert (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_N2"], kw["BLOCK_K"]) == (128, 64, 32, 64 if small else 32)
    assert kw["TAP_BITS"] and spy.grids[-1] == (1, 1, 1)
    ref = torch.nn.grad.conv2d_input((1, 96, 7, 7), w.double().cpu(), dy.double().cpu(), padding=2)
    assert_close(dx, ref, dtype, device, "grad_input")
def test_fwd_tiles():
    """The forward's tile from the heuristic's: its 3 x 2^k split or 128x128 where they give the busiest
    of 132 SMs less MMA time (128x128 where a wide tile's last wave is mostly idle, conv5 / conv3's input
    gradient: 169 tiles; also for fp32's 384 channels, 507 tiles of 128x128 against 338 of 128 x 192),
    the heuristic's config on ties and where nothing applies."""
    wide32 = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, num_warps=8, num_stages=3)
    wide16 = dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)
    sq32 = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)
    sq16 = dict(sq32, BLOCK_K=64)
    half32 = dict(sq32, num_warps=4)  # tf32 128x128 on one warpgroup (_fwd_warps)
    gpu = torch.device("meta")
    f32, b16 = torch.float32, torch.bfloat16

    def tiles(cfg, m, cog, groups, dtype):
        c, n2 = K._fwd_tiles(dict(cfg), m, cog, groups, dtype, gpu)
        return c, n2

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(K, "is_interpreting", lambda: False)
        # one warpgroup for tf32 at 128 x 128 only; two for every other tile from 128 x 128 up
        assert [K._fwd_warps(128, 128, f32), K._fwd_warps(128, 128, b16), K._fwd_warps(128, 256, f32),
                K._fwd_warps(256, 128, b16), K._fwd_warps(128, 64, f32)] == [4, 8, 8, 8, 4]
        # the heuristic's own tf32 128x128 (the paper net's conv2 and conv5, 128 a group) on one warpgroup too
        assert K._config("fwd", f32, 128 * 27 * 27, 128) == half32
        assert K._config("fwd", b16, 128 * 13 * 13, 128)["num_warps"] == 8
        mp.setattr(K, "_num_sms", lambda device: 132)
        assert tiles(wide32, 21632, 256, 1, f32) == (half32, 0)  # conv5 fwd, conv3 dgrad
        for cog, groups in ((256, 1), (128, 2)):  # the single net's conv5, the paper net's (2 groups of 128)
            assert tiles(wide16, 21632, cog, groups, b16) == (sq16, 0)
        assert tiles(wide32, 21632, 384, 1, f32) == (half32, 0)  # conv3-4 fwd, conv4-5 dgrad in fp32
        # the paper net's 192 a group: 338 tiles of 128 x 192 (3 rounds) against 676 of 128x128 (6)
        assert tiles(wide32, 21632, 192, 2, f32) == (dict(wide32, BLOCK_N=128), 64)
        assert tiles(wide16, 21632, 192, 2, b16) == (dict(wide16, BLOCK_M=128), 64)
        # conv2's input gradient (96 channels): 64 + 32 at 6/7 of the rate beats a quarter of 128 empty
        split = (dict(sq32, BLOCK_N=64), 32)
        assert tiles(sq32, 93312, 96, 1, f32) == split
        assert tiles(wide16, 93312, 96, 1, b16) == (dict(sq16, BLOCK_N=64), 32)
        # ties keep the heuristic's: conv2 fwd (729 wide tiles, 92% of the last wave), conv3-4 in bf16
        assert tiles(wide32, 93312, 256, 1, f32) == (wide32, 0)
        assert tiles(wide16, 21632, 384, 1, b16) == (wide16, 0)
        assert tiles(sq32, 21632, 128, 2, f32) == (sq32, 0)
        # one SM (the interpreter's count): least padded work; full wide tiles stay
        mp.setattr(K, "_num_sms", lambda device: 1)
        assert tiles(wide32, 21632, 256, 1, f32) == (wide32, 0)
        assert tiles(sq32, 4096, 96, 1, f32) == split
    assert K._operand_share((128,)) == 1.0 and K._operand_share((64,)) == 1.0
    assert K._operand_share((64, 32)) == pytest.approx(6 / 7) and K._operand_share((128, 64)) == 1.0
    assert K._wave_efficiency(169, 132) == pytest.approx(169 / 264)
    assert K._wave_efficiency(338, 132) == pytest.approx(338 / 396) and K._wave_efficiency(264, 132) == 1.0


def test_forward_fills_waves(device, monkeypatch):
    """The launcher applies _fwd_tiles to the heuristic's config: with a wide tile forced and 132 SMs,
    a small grid runs at 128x128 (half the wide tile), and the result matches float64."""
    monkeypatch.setattr(K, "_num_sms", lambda device: 132)
    monkeypatch.setattr(K, "_config", lambda kind, dtype, m, n: dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=32,
                                                                      num_warps=8, num_stages=3))
    spy = _LaunchSpy(K._conv2d_fwd_kernel)
    monkeypatch.setattr(K, "_conv2d_fwd_kernel", spy)
    x = make_input((2, 32, 5, 5), torch.float32, device, layout="channels_last")
    w = make_input((200, 32, 3, 3), torch.float32, device, scale=0.2)
    b = make_input((200,), torch.float32, device)
    _check(device, torch.float32, x, w, b, padding=1)
    kw = spy.kwargs[0]
    assert (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_N2"]) == (128, 128, 0) and spy.grids[0][:2] == (1, 2)


@pytest.mark.parametrize("tiles, k_blocks, split", [
    (54, 1352, 7),  # 2 ways fill 82% of one wave, 4 of two: 7 ways 95% of three
    (27, 676, 9), (36, 676, 7), (20, 2916, 13),  # conv3-5, the paper net's conv4, conv2: two waves >= 90% full
    (3, 12100, 44),  # conv1's flat wgrad: one full wave (88 ways, two full waves, sum twice the partials)
    (10, 2916, 13), (18, 676, 7),  # the paper net's conv2 and conv5 in groups: one wave as full as two
    (25, 2916, 5),  # 95% of one wave, as of two
    (600, 1000, 1), (5, 40, 5),  # few K blocks: at least 8 a split
])
def test_split_k_fills_the_last_wave(tiles, k_blocks, split, monkeypatch):
    monkeypatch.setattr(K, "is_interpreting", lambda: False)
    monkeypatch.setattr(K, "_num_sms", lambda device: 132)
    got = K._split_k(tiles, k_blocks, torch.device("meta"))
    assert got == split
    assert 1 <= got <= max(1, k_blocks // 8) and got <= 128


def test_in_bounds():
    """The kernels skip the padding tests only where no tap of any output position leaves the image."""
    assert K._in_bounds(227, 227, 55, 55, 11, 11, (4, 4), (0, 0), (1, 1))  # conv1
    assert not K._in_bounds(27, 27, 27, 27, 5, 5, (1, 1), (2, 2), (1, 1))  # conv2: padding 2
    assert not K._in_bounds(7, 6, 7, 6, 1, 2, (1, 1), (0, 0), (1, 1))  # 'same', even kernel: the right column
    assert K._in_bounds(7, 6, 7, 5, 1, 2, (1, 1), (0, 0), (1, 1))  # 'valid'
    assert not K._in_bounds(9, 9, 3, 3, 3, 3, (2, 2), (0, 0), (3, 3))  # dilated: (3-1)*2 + (3-1)*3 = 10 > 8


def test_unbatched(device):
    x = make_input((4, 7, 6), torch.float32, device)
    w = make_input((6, 2, 3, 3), torch.float32, device)
    b = make_input((6,), torch.float32, device)
    y = _check(device, torch.float32, x, w, b, padding=1, groups=2)
    assert y.shape == (6, 7, 6)


def test_float64_gradcheck(device):
    # fast_mode checks random projections of the Jacobian: each costs two interpreted launches,
    # where the full Jacobian would cost two per input element.
    x = make_input((2, 4, 6, 5), torch.float64, device)
    w = make_input((6, 2, 3, 2), torch.float64, device)
    b = make_input((6,), torch.float64, device)
    with fastalex.backend("triton"):
        assert torch.autograd.gradcheck(
            lambda x, w, b: F.conv2d(x, w, b, stride=(2, 1), padding=(1, 0), groups=2, activation="relu"), (x, w, b),
            fast_mode=True)


def test_nan_and_inf(device):
    x = make_input((2, 4, 8, 8), torch.float32, device, requires_grad=False)
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, 5, 5] = float("inf")
    x[1, 0, 0, 0] = float("-inf")
    x.requires_grad_()
    w = make_input((5, 4, 3, 3), torch.float32, device)
    b = make_input((5,), torch.float32, device)
    _check(device, torch.float32, x, w, b, padding=1)


def test_empty_batch(device):
    x = torch.randn(0, 4, 6, 6, device=device, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, device=device, requires_grad=True)
    b = torch.randn(5, device=device, requires_grad=True)
    with fastalex.backend("triton"):
        y = F.conv2d_relu(x, w, b)
    assert y.shape == (0, 5, 4, 4)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    assert x.grad.shape == x.shape


def test_input_grad_skipped_when_not_required(device, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("input gradient computed for an input that does not require grad")

    monkeypatch.setattr(K, "conv2d_input_grad", boom)
    x = make_input((2, 3, 15, 15), torch.float32, device, requires_grad=False)
    w = make_input((4, 3, 11, 11), torch.float32, device)
    with fastalex.backend("triton"):
        F.conv2d_relu(x, w, None, stride=4).sum().backward()
    assert x.grad is None and w.grad is not None


@pytest.mark.parametrize("split", [1, 3, 7])
def test_weight_grad_split_k(device, split):
    """The split-K weight gradient (used on GPUs) equals the reference for any split."""
    x = make_input((3, 6, 7, 7), torch.float32, device, requires_grad=False)
    w = make_input((8, 3, 3, 3), torch.float32, device, requires_grad=False)
    y = TF.conv2d(x, w, padding=1, groups=2).relu()
    dy = torch.randn_like(y)
    dw, db = K.conv2d_weight_grad(_masked(dy, y, True), x, w.shape, (1, 1), (1, 1), (1, 1), 2, split_k=split)
    xr, wr = ref_inputs(x, w)
    wr.requires_grad_()
    br = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    yr = TF.conv2d(xr, wr, br, padding=1, groups=2).relu()
    yr.backward(dy.double().cpu())
    assert_close(dw, wr.grad, torch.float32, device, "grad_weight")
    assert_close(db, br.grad, torch.float32, device, "grad_bias")


@pytest.mark.parametrize("layout, c_out, kernel, taps", [
    ("channels_last", 200, 3, None),  # _sum_splits_to_weight_kernel: the bias in blocks of 128, twice
    ("contiguous", 40, 1, False),  # _sum_splits_kernel on 40 weights: blocks of 16, the bias three times
])
def test_weight_grad_split_sums_bias_in_the_last_program(device, layout, c_out, kernel, taps, monkeypatch):
    """One launch sums the weight's and the bias's split-K partials (the bias in its last program, in
    blocks, over as many blocks as it takes), each element written once (the outputs start poisoned)."""
    launches = []
    for name in ("_sum_splits_kernel", "_sum_splits_to_weight_kernel"):
        spy = _LaunchSpy(getattr(K, name))
        monkeypatch.setattr(K, name, spy)
        launches.append(spy)
    x = make_input((2, 1 if kernel == 1 else 3, 6, 6), torch.float32, device, layout=layout, requires_grad=False)
    w = make_input((c_out, x.shape[1], kernel, kernel), torch.float32, device, requires_grad=False)
    dy = make_input((2, c_out, 6 - kernel + 1, 6 - kernel + 1), torch.float32, device, requires_grad=False)
    dw, db = K.conv2d_weight_grad(dy, x, w.shape, (1, 1), (0, 0), (1, 1), 1, split_k=3, taps=taps)
    assert [len(spy.grids) for spy in launches] == ([0, 1] if layout == "channels_last" else [1, 0])
    xr, wr = ref_inputs(x, w)
    wr.requires_grad_()
    br = torch.zeros(c_out, dtype=torch.float64, requires_grad=True)
    TF.conv2d(xr, wr, br).backward(dy.double().cpu())
    assert_close(dw, wr.grad, torch.float32, device, "grad_weight")
    assert_close(db, br.grad, torch.float32, device, "grad_bias")


@pytest.mark.parametrize("shape, kernel, stride, split", [
    ((3, 3, 19, 37), 3, 1, 3),  # OW 35: blocks of 16 cross one row; splits start mid-row
    ((4, 3, 9, 21), (3, 5), 2, 5),  # OH 4, OW 9 < 16: the general path (no scalar rows)
    ((5, 3, 6, 20), 3, 1, 4),  # OH 4, OW 18: row crossings that are plane crossings
    ((2, 3, 75, 75), 11, 4, 3),  # conv1's kernel and stride: 17x17 outputs
    ((2, 3, 10, 18), 3, 1, 3),  # K = 256 = 16 blocks (EVEN_K): the last split's range ends at K, not past it
])
def test_weight_grad_flat_row_scalars(device, shape, kernel, stride, split, monkeypatch):
    """The flat kernel with a dense dy and no padding: K blocks of positions that cross at most one row
    (BLOCK_K <= OW) take scalar row positions (ROW_SCALARS), the rest the per-position carries; both
    against float64, the K tail and mid-row splits included, and K a whole number of blocks (EVEN_K:
    no position mask; (4, 3, 9, 21) is one too, on the general path)."""
    spy = _LaunchSpy(K._conv2d_wgrad_kernel)
    monkeypatch.setattr(K, "_conv2d_wgrad_kernel", spy)
    k = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    x = make_input(shape, torch.float32, device, layout="channels_last", requires_grad=False)
    w = make_input((8, shape[1], *k), torch.float32, device, requires_grad=False, scale=0.3)
    y = TF.conv2d(x, w, stride=stride).relu()
    dy = _masked(torch.randn_like(y), y, True).contiguous(memory_format=torch.channels_last)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1)
    st = (stride, stride)
    dw, db = K.conv2d_weight_grad(dy, x, w.shape, st, (0, 0), (1, 1), 1, split_k=split, config=cfg, taps=False)
    assert spy.kwargs[-1]["ROW_SCALARS"] == (y.shape[3] >= 16)
    assert spy.kwargs[-1]["EVEN_K"] == (y.numel() // 8 % 16 == 0)
    xr, wr = ref_inputs(x, w)
    wr.requires_grad_()
    br = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    TF.conv2d(xr, wr, br, stride=stride).backward(dy.double().cpu())
    assert_close(dw, wr.grad, torch.float32, device, "grad_weight")
    assert_close(db, br.grad, torch.float32, device, "grad_bias")


@pytest.mark.parametrize("case", [
    # (N, C_in, H, W, C_out, kernel, stride, padding, layout, dtype, split): N % BLOCK_K 16 == 0
    (32, 3, 19, 19, 10, 11, 4, 0, "channels_last", torch.float32, 3),  # conv1's kernel: 3x3 outputs, 363 columns
    (48, 3, 19, 19, 10, 11, 4, 0, "channels_last", torch.bfloat16, 3),  # BIAS_COL: db from column 363 (48: no X_PAIRS)
    (32, 3, 19, 19, 10, 11, 4, 0, "contiguous", torch.float16, 2),  # NCHW x: (ci, kh, kw) columns, BIAS_COL
    (16, 5, 6, 7, 6, 3, 1, 1, "channels_last", torch.bfloat16, 5),  # padding: per-column masks, no BIAS_COL
    (16, 2, 6, 6, 6, 4, 2, 0, "channels_last", torch.bfloat16, 1),  # CKK 32 = BLOCK_N: no column past CKK
    (48, 3, 9, 9, 5, 5, 2, 0, "channels_last", torch.float64, 4),  # splits starting mid-position (48 = 3 blocks)
])
def test_weight_grad_flat_image_blocks(device, case, monkeypatch):
    """The flat kernel's K blocks of images at one output position (IMAGE_BLOCKS, N % BLOCK_K == 0: the
    positions in (oh, ow, n) order), with db as the product's column CKK where the x tile is 16-bit and
    unpadded (BIAS_COL); against float64, splits included. Every partial is written: dw and db come
    from sums over splits of `empty` partials."""
    N, C, H, W, Co, k, st, p, layout, dtype, split = case
    spy = _LaunchSpy(K._conv2d_wgrad_kernel)
    monkeypatch.setattr(K, "_conv2d_wgrad_kernel", spy)
    x = make_input((N, C, H, W), dtype, device, layout=layout, requires_grad=False)
    w = make_input((Co, C, k, k), dtype, device, requires_grad=False, scale=0.3)
    y = TF.conv2d(x.float(), w.float(), stride=st, padding=p).relu()
    dy = _masked(torch.randn_like(y), y, True).to(dtype).contiguous(memory_format=torch.channels_last)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1)
    dw, db = K.conv2d_weight_grad(dy, x, w.shape, (st, st), (p, p), (1, 1), 1, split_k=split, config=cfg, taps=False)
    kw = spy.kwargs[-1]
    assert kw["IMAGE_BLOCKS"] and not kw["X_PAIRS"]  # (test_weight_grad_pairs)
    assert kw["BIAS_COL"] == (dtype in (torch.float16, torch.bfloat16) and p == 0 and C * k * k % 32 != 0)
    assert not (kw["BIAS_COL"] and kw["BIAS_2D"])
    xr, wr = ref_inputs(x, w)
    wr.requires_grad_()
    br = torch.zeros(Co, dtype=torch.float64, requires_grad=True)
    TF.conv2d(xr, wr, br, stride=st, padding=p).backward(dy.double().cpu())
    assert_close(dw, wr.grad, dtype, device, "grad_weight")
    assert_close(db, br.grad, dtype, device, "grad_bias")


@pytest.mark.parametrize("case", [
    # (N, C_in, H, W, C_out, kernel, stride, dtype, split): channels_last, no padding, N % (2 BLOCK_K 16) == 0
    (32, 3, 21, 21, 10, 11, 4, torch.bfloat16, 3),  # conv1's kernel; sxn, sxh odd: both parities (3 -> 4 splits)
    (32, 3, 14, 14, 6, 5, 2, torch.float16, 2),  # sxn, sxh even: every row at an even element, read past its end
    (64, 3, 15, 15, 7, 5, 2, torch.bfloat16, 1),  # sxn, sxh odd, 2 K blocks an (oh, ow) a parity, 1 -> 2 splits
    (32, 2, 11, 12, 5, 3, 2, torch.float16, 6),  # even rows (6 elements: 8 columns a row), splits past the work
])
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")  # the NaN in columns no weight takes
def test_weight_grad_pairs(device, case, monkeypatch):
    """conv1's weight gradient in 16-bit with x's kernel rows read as 4-byte pairs from the even element
    at or below each row's start (X_PAIRS: the even images in the first half of the splits, the odd in the
    second, each row's elements in the columns its parity gives): against float64, from poisoned
    partials, with NaN and inf in every input element no window holds (a row's extra element reads
    some of them: they must stay out of dw, as in torch)."""
    N, C, H, W, Co, k, st, dtype, split = case
    spy = _LaunchSpy(K._conv2d_wgrad_kernel)
    monkeypatch.setattr(K, "_conv2d_wgrad_kernel", spy)
    x = make_input((N, C, H, W), dtype, device, layout="channels_last", requires_grad=False)
    OH, OW = output_size(H, W, (k, k), (st, st))
    x[:, :, :, (OW - 1) * st + k:] = float("nan")  # columns past the last window
    x[:, :, (OH - 1) * st + k:, :] = float("inf")  # rows past it
    w = make_input((Co, C, k, k), dtype, device, requires_grad=False, scale=0.3)
    dy = make_input((N, Co, OH, OW), dtype, device, layout="channels_last", requires_grad=False)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1)
    dw, db = K.conv2d_weight_grad(dy, x, w.shape, (st, st), (0, 0), (1, 1), 1, split_k=split, config=cfg, taps=False)
    kw = spy.kwargs[-1]
    assert kw["X_PAIRS"] and not kw["BIAS_COL"]
    assert spy.grids[-1][2] == split + split % 2
    xr, wr = ref_inputs(x, w)
    wr.requires_grad_()
    br = torch.zeros(Co, dtype=torch.float64, requires_grad=True)
    TF.conv2d(xr, wr, br, stride=st).backward(dy.double().cpu())
    assert torch.isfinite(wr.grad).all()
    assert_close(dw, wr.grad, dtype, device, "grad_weight")
    assert_close(db, br.grad, dtype, device, "grad_bias")


def test_pairs_conditions():
    """Where X_PAIRS reads x as pairs, and where it keeps the flat kernel's other paths."""
    cfg = dict(BLOCK_K=64)

    def pairs(shape=(128, 3, 227, 227), dtype=torch.bfloat16, k=11, stride=4, pad_ok=True, layout="nhwc", N=None,
              dilation=(1, 1), view=None):
        x = torch.empty(shape, dtype=dtype, device="meta")
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
        if view is not None:
            x = view(x)
        OH, OW = output_size(x.shape[2], x.shape[3], (k, k), (stride, stride))
        return K._pairs(x, cfg, x.shape[0] if N is None else N, OH, OW, (96, x.shape[1], k, k), (stride, stride),
                        dilation, pad_ok)

    assert pairs()  # conv1 at batch 128
    assert not pairs(dtype=torch.float32)  # fp32 rows are 4-byte aligned already (cp.async as it is)
    assert not pairs(layout="nchw")  # a kernel row is not one run
    assert not pairs(pad_ok=False)  # padding
    assert not pairs(shape=(96, 3, 227, 227))  # 96 images: not two halves of whole K blocks of 64
    assert not pairs(dilation=(2, 2))
    assert not pairs(stride=1)  # odd stride x odd row stride: (oh, ow) would change the parity
    # The last window ends at the tensor's last element with an even start: the pair after it would
    # read past the storage. Inside a larger storage (a view) the same read is in bounds.
    assert not pairs(shape=(128, 2, 9, 9), k=3, stride=2)
    assert pairs(shape=(128, 2, 10, 9), k=3, stride=2, view=lambda t: t[:, :, :9])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bias_col_gpu_config(dtype, monkeypatch):
    """On a GPU, conv1's flat weight gradient at batch 128 in a 16-bit type reads x as pairs (X_PAIRS) with
    K blocks of 64; fp32 keeps 32 and its sums. With an NCHW x the 16-bit types take db as a column
    (BIAS_COL), also at 64. Recorded, not run."""
    from perf import static

    monkeypatch.setattr(K, "is_interpreting", lambda: False)
    x = torch.empty(128, 3, 227, 227, dtype=dtype, device="meta")
    dy = torch.empty(128, 96, 55, 55, dtype=dtype, device="meta").contiguous(memory_format=torch.channels_last)
    small = dtype != torch.float32
    for layout in ("channels_last", "nchw"):
        xl = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
        with static.intercept() as launches:
            K.conv2d_weight_grad(dy, xl, (96, 3, 11, 11), (4, 4), (0, 0), (1, 1), 1)
        kw = next(la.kwargs for la in launches if la.kernel.__name__ == "_conv2d_wgrad_kernel")
        assert kw["IMAGE_BLOCKS"] and kw["BLOCK_K"] == (64 if small else 32)
        assert kw["X_PAIRS"] == (small and layout == "channels_last")
        assert kw["BIAS_COL"] == (small and layout == "nchw")
        assert not (kw["BIAS_2D"] and kw["BIAS_COL"])
        K.check_config({k: kw[k] for k in K.CONFIG_KEYS}, dtype)
    assert not K._bias_col(dict(BLOCK_N=128, BLOCK_K=64), dtype, 96, 363, True)  # 96 images: not whole blocks
    assert not K._bias_col(dict(BLOCK_N=128, BLOCK_K=64), dtype, 128, 363, False)  # padding
    assert not K._bias_col(dict(BLOCK_N=128, BLOCK_K=64), dtype, 128, 384, True)  # no column past CKK


WGRAD_NHWC = [
    # (N, C_in, H, W, C_out, kernel, stride, padding, groups, split, relu, dtype)
    (2, 5, 7, 8, 7, (3, 5), 1, (1, 2), 1, 1, True, torch.float32),
    (3, 7, 12, 12, 5, 5, 1, 2, 1, 3, False, torch.float32),  # CKK 175: two N blocks, one split mid-tap
    (3, 6, 21, 21, 4, 3, 2, 1, 2, 3, True, torch.float32),
    (3, 9, 22, 20, 6, (3, 5), 2, (2, 1), 3, 3, False, torch.float32),
    (3, 5, 11, 10, 7, (3, 5), 1, (1, 2), 1, 3, True, torch.float64),
    (2, 6, 8, 8, 4, 3, 1, 1, 2, 1, False, torch.bfloat16),
]


class _LaunchSpy:
    """Stands in for a kernel: records each launch's grid and keyword arguments, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.grids, self.kwargs = kernel, [], []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grids.append(grid)
            self.kwargs.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("case", WGRAD_NHWC, ids=[f"nhwc{i}" for i in range(len(WGRAD_NHWC))])
def test_weight_grad_channels_last(device, case, monkeypatch):
    """Channels-last x and dy: the wgrad kernel runs ci-fastest and the split sum permutes the partials
    back, so dw is the contiguous (C_out, Cig, KH, KW) gradient of float64 autograd."""
    N, C, H, W, Co, k, s, p, g, split, relu, dtype = case
    k = k if isinstance(k, tuple) else (k, k)
    s = s if isinstance(s, tuple) else (s, s)
    p = p if isinstance(p, tuple) else (p, p)
    cl = torch.channels_last
    x = make_input((N, C, H, W), dtype, device, layout="channels_last", requires_grad=False)
    w = make_input((Co, C // g, *k), dtype, device, requires_grad=False, scale=0.3)
    y = TF.conv2d(x.float(), w.float(), stride=s, padding=p, groups=g).relu().to(dtype).contiguous(memory_format=cl)
    dy = torch.randn(y.shape, device=device).to(dtype).contiguous(memory_format=cl)
    spy = _LaunchSpy(K._conv2d_wgrad_kernel)
    monkeypatch.setattr(K, "_conv2d_wgrad_kernel", spy)
    dw, db = K.conv2d_weight_grad(_masked(dy, y, relu), x, w.shape, s, p, (1, 1), g, split_k=split)
    assert [kw["CI_FAST"] for kw in spy.kwargs] == [True]
    assert spy.grids[0][2] == split  # K spans enough blocks for every split to get some
    assert dw.shape == (Co, C // g, *k) and dw.is_contiguous() and dw.dtype == dtype and db.dtype == dtype
    xr, wr = ref_inputs(x, w)
    wr.requires_grad_()
    br = torch.zeros(Co, dtype=torch.float64, requires_grad=True)
    yr = TF.conv2d(xr, wr, br, stride=s, padding=p, groups=g)
    if relu:
        yr = yr * (y.double().cpu() > 0)  # the kernel's mask: the forward output it was given
    yr.backward(dy.double().cpu())
    assert_close(dw, wr.grad, dtype, device, "grad_weight")
    assert_close(db, br.grad, dtype, device, "grad_bias")


def test_weight_grad_layout_flag(device, monkeypatch):
    """ci-fastest only where it helps: channels-contiguous x with more than one channel and tap."""
    spy = _LaunchSpy(K._conv2d_wgrad_kernel)
    monkeypatch.setattr(K, "_conv2d_wgrad_kernel", spy)
    cases = [((4, 4, 3, 3), 1, "contiguous", False), ((4, 4, 3, 3), 1, "channels_last", True),
             ((4, 1, 3, 3), 4, "channels_last", False), ((4, 4, 1, 1), 1, "channels_last", False)]
    for ws, g, layout, want in cases:
        x = make_input((2, 4, 5, 5), torch.float32, device, layout=layout, requires_grad=False)
        w = make_input(ws, torch.float32, device, requires_grad=False)
        dy = TF.conv2d(x, w, groups=g)
        dw, _ = K.conv2d_weight_grad(dy, x, w.shape, (1, 1), (0, 0), (1, 1), g)
        assert spy.kwargs[-1]["CI_FAST"] is want and dw.is_contiguous()
        xr, wr = ref_inputs(x, w)
        wr.requires_grad_()
        TF.conv2d(xr, wr, groups=g).backward(dy.double().cpu())
        assert_close(dw, wr.grad, torch.float32, device, "grad_weight")


WGRAD_TAPS = [
    # (N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups, split, relu, dtype, layout, taps)
    (2, 20, 9, 9, 12, 3, 1, 1, 1, 1, 1, True, torch.float32, "channels_last", None),  # 20 of 32 columns
    (3, 32, 12, 11, 10, (3, 5), 2, (1, 2), 1, 2, 3, False, torch.float32, "channels_last", None),
    (2, 48, 8, 8, 72, 3, 1, 1, 1, 3, 2, True, torch.bfloat16, "channels_last", None),
    (2, 17, 7, 7, 9, 5, 1, 2, 1, 1, 1, False, torch.float64, "channels_last", None),
    (2, 16, 11, 11, 8, 3, 1, 2, 2, 1, 2, True, torch.float32, "channels_last", None),  # dilation 2
    (2, 24, 9, 8, 8, 3, 2, 1, 1, 1, 2, True, torch.float32, "contiguous", True),  # NCHW, forced
    (2, 24, 6, 6, 8, 1, 1, 0, 1, 1, 1, False, torch.float32, "channels_last", True),  # 1x1: one tap
    (2, 80, 7, 7, 20, 3, 1, 1, 1, 2, 2, False, torch.float32, "channels_last", None),  # 2 ci blocks, 2nd partial
    # The positions advance by BLOCK_K (16) with carries: planes smaller than a block (3x3: a block
    # spans images), rows longer than a block (OW 21), several splits starting mid-plane.
    (5, 16, 5, 5, 8, 3, 1, 0, 1, 1, 2, False, torch.float32, "channels_last", None),
    (2, 16, 4, 21, 8, 3, 1, 1, 1, 1, 3, True, torch.float32, "channels_last", None),
    (9, 16, 3, 4, 8, 2, 1, 0, 1, 1, 4, False, torch.float32, "channels_last", None),  # 2x3 planes
]


def test_weight_grad_per_tap_with_dy_in_another_layout(device):
    """channels_last x with an NCHW or strided dy (positions not one stride apart): the per-tap kernel
    reads dy through its strides, and gives the dense path's result."""
    x = make_input((3, 16, 7, 6), torch.float32, device, layout="channels_last", requires_grad=False)
    y_shape = (3, 8, 7, 6)
    dy_cl = torch.randn(y_shape, device=device).contiguous(memory_format=torch.channels_last)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)
    args = ((8, 16, 3, 3), (1, 1), (1, 1), (1, 1), 1)
    want = K.conv2d_weight_grad(dy_cl, x, *args, split_k=2, config=cfg, taps=True)
    wide = torch.randn(3, 8, 7, 12, device=device)[..., ::2]  # every other column: sdh != OW * sdw
    wide.copy_(dy_cl)
    for dy in (dy_cl.contiguous(), wide):
        got = K.conv2d_weight_grad(dy, x, *args, split_k=2, config=cfg, taps=True)
        for g, w in zip(got, want):
            assert torch.allclose(g, w, rtol=1e-5, atol=1e-5)
    xr = x.double().cpu().requires_grad_()
    wr = torch.zeros((8, 16, 3, 3), dtype=torch.float64, requires_grad=True)
    TF.conv2d(xr, wr, padding=1).backward(dy_cl.double().cpu())
    assert_close(want[0], wr.grad, torch.float32, device, "grad_weight")


@pytest.mark.parametrize("rows", [None, False], ids=["rows-default", "rows-off"])
@pytest.mark.parametrize("case", WGRAD_TAPS, ids=[f"taps{i}" for i in range(len(WGRAD_TAPS))])
def test_weight_grad_per_tap(device, case, rows, monkeypatch):
    """The per-tap weight-gradient kernel (channels-contiguous x with Cig >= 16, or asked for): any
    column count, stride, padding, dilation, groups and split against float64 autograd; a tap a kernel
    row (rows, the default where a row is contiguous in x: its KW x Cig columns in blocks that cross
    kw's boundaries) and a tap a (kh, kw)."""
    N, C, H, W, Co, k, s, p, d, g, split, relu, dtype, layout, taps = case
    k = k if isinstance(k, tuple) else (k, k)
    s, p, d = ((v, v) if isinstance(v, int) else v for v in (s, p, d))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = make_input((N, C, H, W), dtype, device, layout=layout, requires_grad=False)
    w = make_input((Co, C // g, *k), dtype, device, requires_grad=False, scale=0.3)
    y = TF.conv2d(x.float(), w.float(), stride=s, padding=p, dilation=d, groups=g).relu().to(dtype)
    y = y.contiguous(memory_format=fmt)
    dy = torch.randn(y.shape, device=device).to(dtype).contiguous(memory_format=fmt)
    spy = _LaunchSpy(K._conv2d_wgrad_taps_kernel)
    monkeypatch.setattr(K, "_conv2d_wgrad_taps_kernel", spy)
    cfg = dict(BLOCK_M=16, BLOCK_N=16 if C // g == 16 else 32, BLOCK_K=16, num_warps=4, num_stages=1)
    dw, db = K.conv2d_weight_grad(_masked(dy, y, relu), x, w.shape, s, p, d, g, split_k=split, config=cfg,
                                  taps=taps, rows=rows)
    assert len(spy.grids) == 1 and spy.grids[0][2] == split
    assert spy.kwargs[0]["ROWS"] == (K.default_rows(x, w.shape, d) if rows is None else False)
    # in groups a row's KW runs of a group's channels lie a pixel apart (ROW_GAPS)
    assert spy.kwargs[0]["ROW_GAPS"] == (spy.kwargs[0]["ROWS"] and g > 1)
    assert dw.shape == w.shape and dw.is_contiguous() and dw.dtype == dtype and db.dtype == dtype
    xr, wr = ref_inputs(x, w)
    wr.requires_grad_()
    br = torch.zeros(Co, dtype=torch.float64, requires_grad=True)
    yr = TF.conv2d(xr, wr, br, stride=s, padding=p, dilation=d, groups=g)
    if relu:
        yr = yr * (y.double().cpu() > 0)
    yr.backward(dy.double().cpu())
    assert_close(dw, wr.grad, dtype, device, "grad_weight")
    assert_close(db, br.grad, dtype, device, "grad_bias")


@pytest.mark.parametrize("taps_per", [1, 2, 3, 4])
@pytest.mark.parametrize("kernel, padding, groups", [((5, 5), 2, 2), ((3, 5), (1, 0), 1), ((2, 3), 0, 1)])
def test_weight_grad_taps_per_program(device, taps_per, kernel, padding, groups, monkeypatch):
    """A per-tap program takes TAPS consecutive taps (one dy tile, TAPS products): 25, 15 and 6 taps in
    blocks of 1-4, the last block partial where TAPS does not divide them, against float64."""
    monkeypatch.setattr(K, "taps_per_program", lambda T, cfg: taps_per)
    spy = _LaunchSpy(K._conv2d_wgrad_taps_kernel)
    monkeypatch.setattr(K, "_conv2d_wgrad_taps_kernel", spy)
    x = make_input((2, 16 * groups, 7, 8), torch.float32, device, layout="channels_last", requires_grad=False)
    w = make_input((8 * groups, 16, *kernel), torch.float32, device, requires_grad=False, scale=0.3)
    pad = padding if isinstance(padding, tuple) else (padding, padding)
    dy = torch.randn(TF.conv2d(x, w, padding=pad, groups=groups).shape, device=device)
    dy = dy.contiguous(memory_format=torch.channels_last)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)
    dw, db = K.conv2d_weight_grad(dy, x, w.shape, (1, 1), pad, (1, 1), groups, split_k=2, config=cfg, taps=True,
                                  rows=False)
    T = kernel[0] * kernel[1]
    assert spy.kwargs[-1]["TAPS"] == taps_per and spy.grids[-1][0] == -(-T // taps_per)  # 1 co and ci block
    xr, wr = ref_inputs(x, w)
    wr.requires_grad_()
    br = torch.zeros(w.shape[0], dtype=torch.float64, requires_grad=True)
    TF.conv2d(xr, wr, br, padding=pad, groups=groups).backward(dy.double().cpu())
    assert_close(dw, wr.grad, torch.float32, device, "grad_weight")
    assert_close(db, br.grad, torch.float32, device, "grad_bias")


@pytest.mark.skipif(not _common.is_interpreting(), reason="watches the interpreter's loads")
@pytest.mark.parametrize("rows, groups", [(False, 1), (True, 1), (True, 2)], ids=["taps", "rows", "rows-g2"])
@pytest.mark.parametrize("taps_per", [3, 4])
def test_weight_grad_taps_loads_stay_in_bounds(taps_per, rows, groups, monkeypatch):
    """The per-tap kernel reads only inside x and dy: a tap block past the last tap (6 taps in blocks of
    4) loads tap T - 1 again rather than a row below the image, which with no padding (IN_BOUNDS) no
    test masks; results cannot show it (those taps are never stored), so the addresses are checked.
    With rows a tap is a kernel row (2 of them here); in 2 groups its columns lie in runs (ROW_GAPS),
    the columns past the row masked."""
    from triton.runtime import interpreter

    monkeypatch.setattr(K, "taps_per_program", lambda T, cfg: taps_per)
    x = make_input((2, 16 * groups, 5, 6), torch.float32, "cpu", layout="channels_last", requires_grad=False)
    w = make_input((8 * groups, 16, 2, 3), torch.float32, "cpu", requires_grad=False, scale=0.3)
    dy = torch.randn(TF.conv2d(x, w, groups=groups).shape).contiguous(memory_format=torch.channels_last)
    spans = [(t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes()) for t in (x, dy)]
    outside, watching, ran = [], [], []
    load = interpreter.InterpreterBuilder.create_masked_load

    def watched(self, ptrs, mask, other, *rest):
        if watching:  # (the split sums read the partials)
            addr = ptrs.data[mask.data.astype(bool)].astype("uint64")
            outside.extend(int(a) for a in addr if not any(lo <= a < hi for lo, hi in spans))
        return load(self, ptrs, mask, other, *rest)

    class Watch(_LaunchSpy):
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                watching.append(True)
                ran.append(kwargs["TAPS"])
                self.kernel[grid](*args, **kwargs)
                watching.clear()

            return launch

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", watched)
    monkeypatch.setattr(K, "_conv2d_wgrad_taps_kernel", Watch(K._conv2d_wgrad_taps_kernel))
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)
    dw, _ = K.conv2d_weight_grad(dy, x, w.shape, (1, 1), (0, 0), (1, 1), groups, split_k=1, config=cfg, taps=True,
                                 rows=rows)
    assert ran == [taps_per] and not outside, f"{len(outside)} loads outside x and dy"
    xr, wr = ref_inputs(x, w)
    wr.requires_grad_()
    TF.conv2d(xr, wr, groups=groups).backward(dy.double())
    assert_close(dw, wr.grad, torch.float32, "cpu", "grad_weight")


def test_default_rows():
    """A kernel row a tap where a tap's channels leave column tiles partly empty (not a multiple of 64)
    and x's channels are contiguous (channels_last; in groups too), no dilation along w, several columns."""
    def rows(c_in, kernel, layout="channels_last", groups=1, dilation=(1, 1)):
        x = make_input((1, c_in, 9, 9), torch.float32, "cpu", layout=layout, requires_grad=False)
        return K.default_rows(x, (8, c_in // groups, *kernel), dilation)

    assert rows(96, (5, 5))  # conv2
    assert not rows(256, (3, 3)) and not rows(384, (3, 3)) and not rows(192, (3, 3))  # conv3-5: whole tiles
    assert rows(96, (5, 5), groups=2)  # the paper net's conv2: 48 a group, the row in runs (ROW_GAPS)
    assert not rows(384, (3, 3), groups=2) and not rows(256, (3, 3), groups=2)  # conv4-5: 192, 128 a group
    assert not rows(96, (5, 5), layout="contiguous") and not rows(96, (5, 5), dilation=(1, 2))
    assert not rows(96, (5, 1)) and rows(96, (1, 5)) and rows(20, (3, 3))


def test_taps_per_program():
    """1 for 256x128 and 128x256 tiles; 3 for 3x3 kernels, 4 for 5x5 and others, at most 3 at 128x128;
    never more than the taps."""
    wide, turned = dict(BLOCK_M=256, BLOCK_N=128), dict(BLOCK_M=128, BLOCK_N=256)
    square, narrow = dict(BLOCK_M=128, BLOCK_N=128), dict(BLOCK_M=128, BLOCK_N=64)
    for cfg in (wide, turned):
        assert K.taps_per_program(9, cfg) == 1 and K.taps_per_program(25, cfg) == 1
    assert K.taps_per_program(9, narrow) == 3 and K.taps_per_program(25, narrow) == 4
    assert K.taps_per_program(9, square) == 3 and K.taps_per_program(25, square) == 3
    assert K.taps_per_program(2, narrow) == 2 and K.taps_per_program(1, narrow) == 1
    fp32 = K._multi_tap_config(dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3), 3, torch.float32)
    bf16 = K._multi_tap_config(dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3), 4, torch.bfloat16)
    assert (fp32["num_warps"], fp32["num_stages"], fp32["BLOCK_K"]) == (8, 2, 32)
    assert (bf16["num_warps"], bf16["num_stages"], bf16["BLOCK_K"]) == (8, 3, 32)
    # 128 x 128 at 3 taps: half the K a trip, 3 stages (the accumulators take most registers)
    for dtype, k in ((torch.float32, 32), (torch.bfloat16, 64)):
        sq = K._multi_tap_config(dict(square, BLOCK_K=k, num_warps=8, num_stages=3), 3, dtype)
        assert (sq["num_warps"], sq["num_stages"], sq["BLOCK_K"]) == (8, 3, k // 2)


# The per-tap weight gradient's GPU tiles for AlexNet's layers (Cog, Cig, taps): (BLOCK_M, BLOCK_N, TAPS)
# in fp32 and bf16, and BLOCK_K. 384 output channels take 128-row tiles (three whole ones), turned to
# 128 x 256 where the input channels allow.
GPU_TAP_TILES = {
    (256, 96, 25): ((256, 128, 1), 16, 64),  # conv2: a quarter of the columns empty whatever the tile
    (384, 256, 9): ((128, 256, 1), 16, 64),  # conv3
    (384, 384, 9): ((128, 128, 3), 16, 32),  # conv4
    (256, 384, 9): ((256, 128, 1), 16, 64),  # conv5
    (128, 48, 25): ((128, 64, 4), 32, 32),  # the paper net's groups: conv2
    (192, 192, 9): ((128, 64, 3), 32, 64),  # conv4
    (128, 192, 9): ((128, 64, 3), 32, 64),  # conv5
    # a kernel row a tap (default_rows): KW x Cig columns, KH taps
    (256, 480, 5): ((256, 128, 1), 16, 64),  # conv2
    (128, 240, 5): ((128, 256, 1), 16, 64),  # the paper net's conv2: one 256-column tile, a row a program
}


@pytest.mark.parametrize("layer", list(GPU_TAP_TILES), ids=[f"{m}x{n}x{t}" for m, n, t in GPU_TAP_TILES])
def test_per_tap_gpu_tiles(layer, monkeypatch):
    monkeypatch.setattr(K, "is_interpreting", lambda: False)
    m, n, T = layer
    (bm, bn, taps), k32, k16 = GPU_TAP_TILES[layer]
    for dtype, k in ((torch.float32, k32), (torch.bfloat16, k16)):
        cfg = K._config("wgrad_taps", dtype, m, n)
        got = K.taps_per_program(T, cfg)
        if got > 1:
            cfg = K._multi_tap_config(cfg, got, dtype)
        assert (cfg["BLOCK_M"], cfg["BLOCK_N"], got, cfg["BLOCK_K"]) == (bm, bn, taps, k), (layer, dtype)


@pytest.mark.parametrize("layer, dtype", [((384, 256), torch.float32), ((384, 384), torch.bfloat16)],
                         ids=["conv3-fp32", "conv4-bf16"])
def test_weight_grad_gpu_tiles_384(device, layer, dtype, monkeypatch):
    """The tiles a GPU picks for conv3 and conv4 (128 x 256 one tap a program; 128 x 128 three taps)
    against float64, on odd channel counts that leave both tile edges partial (and keep the
    interpreter's sums small)."""
    with monkeypatch.context() as gpu:
        gpu.setattr(K, "is_interpreting", lambda: False)
        cfg = K._config("wgrad_taps", dtype, *layer)
        taps = K.taps_per_program(9, cfg)
        if taps > 1:
            cfg = K._multi_tap_config(cfg, taps, dtype)
    spy = _LaunchSpy(K._conv2d_wgrad_taps_kernel)
    monkeypatch.setattr(K, "_conv2d_wgrad_taps_kernel", spy)
    c_out, c_in = 136, cfg["BLOCK_N"] - 56
    x = make_input((2, c_in, 4, 5), dtype, device, layout="channels_last", requires_grad=False)
    w = make_input((c_out, c_in, 3, 3), dtype, device, requires_grad=False, scale=0.1)
    dy = torch.randn(TF.conv2d(x.float(), w.float(), padding=1).shape, device=device).to(dtype)
    dy = dy.contiguous(memory_format=torch.channels_last)
    dw, db = K.conv2d_weight_grad(dy, x, w.shape, (1, 1), (1, 1), (1, 1), 1, config=cfg)
    kw = spy.kwargs[-1]
    assert (kw["BLOCK_M"], kw["BLOCK_N"], kw["TAPS"]) == ((128, 256, 1) if layer[1] == 256 else (128, 128, 3))
    xr, wr = ref_inputs(x, w)
    wr.requires_grad_()
    br = torch.zeros(c_out, dtype=torch.float64, requires_grad=True)
    TF.conv2d(xr, wr, br, padding=1).backward(dy.double().cpu())
    assert_close(dw, wr.grad, dtype, device, "grad_weight")
    assert_close(db, br.grad, dtype, device, "grad_bias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_grad_gpu_tile_rows_in_groups(device, dtype, monkeypatch):
    """The tile a GPU picks for the paper net's conv2 (a kernel row a tap in 2 groups: 128 x 256, one row
    a program, the row's columns in runs a pixel apart; in bf16 the bias sums made only by the program
    that stores them, BIAS_FIRST) against float64, on 40 channels a group (200 of 256 columns) and 12
    output channels (12 of 128 rows)."""
    with monkeypatch.context() as gpu:
        gpu.setattr(K, "is_interpreting", lambda: False)
        cfg = K._config("wgrad_taps", dtype, 128, 5 * 48)
        assert K.taps_per_program(5, cfg) == 1
    spy = _LaunchSpy(K._conv2d_wgrad_taps_kernel)
    monkeypatch.setattr(K, "_conv2d_wgrad_taps_kernel", spy)
    x = make_input((2, 80, 6, 7), dtype, device, layout="channels_last", requires_grad=False)
    w = make_input((24, 40, 5, 5), dtype, device, requires_grad=False, scale=0.1)
    dy = torch.randn(TF.conv2d(x.float(), w.float(), padding=2, groups=2).shape, device=device).to(dtype)
    dy = dy.contiguous(memory_format=torch.channels_last)
    dw, db = K.conv2d_weight_grad(dy, x, w.shape, (1, 1), (2, 2), (1, 1), 2, config=cfg)
    kw = spy.kwargs[-1]
    assert (kw["BLOCK_M"], kw["BLOCK_N"], kw["TAPS"], kw["ROWS"], kw["ROW_GAPS"]) == (128, 256, 1, True, True)
    # bf16 on 128 x 256: the bias sums only in the first of the 5 row programs, which stores them
    assert kw["BIAS_FIRST"] == (dtype == torch.bfloat16) and spy.grids[-1][0] == 5
    xr, wr = ref_inputs(x, w)
    wr.requires_grad_()
    br = torch.zeros(24, dtype=torch.float64, requires_grad=True)
    TF.conv2d(xr, wr, br, padding=2, groups=2).backward(dy.double().cpu())
    assert_close(dw, wr.grad, dtype, device, "grad_weight")
    assert_close(db, br.grad, dtype, device, "grad_bias")


def test_weight_grad_kernel_choice(device, monkeypatch):
    """Per-tap for channels-contiguous x with Cig >= 16 and several taps; the flat kernel otherwise or
    when asked (taps=False), with the same result."""
    spies = {name: _LaunchSpy(getattr(K, name)) for name in ("_conv2d_wgrad_kernel", "_conv2d_wgrad_taps_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(K, name, spy)
    cases = [((8, 16, 3, 3), "channels_last", None, "_conv2d_wgrad_taps_kernel"),
             ((8, 16, 3, 3), "contiguous", None, "_conv2d_wgrad_kernel"),
             ((8, 8, 3, 3), "channels_last", None, "_conv2d_wgrad_kernel"),
             ((8, 16, 1, 1), "channels_last", None, "_conv2d_wgrad_kernel"),
             ((8, 16, 3, 3), "channels_last", False, "_conv2d_wgrad_kernel")]
    for ws, layout, taps, want in cases:
        x = make_input((2, ws[1], 6, 6), torch.float32, device, layout=layout, requires_grad=False)
        w = make_input(ws, torch.float32, device, requires_grad=False)
        dy = TF.conv2d(x, w)
        before = {n: len(sp.grids) for n, sp in spies.items()}
        dw, _ = K.conv2d_weight_grad(dy, x, w.shape, (1, 1), (0, 0), (1, 1), 1, taps=taps)
        assert [n for n, sp in spies.items() if len(sp.grids) > before[n]] == [want], (ws, layout, taps)
        xr, wr = ref_inputs(x, w)
        wr.requires_grad_()
        TF.conv2d(xr, wr).backward(dy.double().cpu())
        assert_close(dw, wr.grad, torch.float32, device, "grad_weight")


def test_per_tap_column_blocks():
    """AlexNet's input-channel counts get whole column blocks where they allow, a covering one else."""
    assert {c: K._taps_block_n(c) for c in (48, 96, 192, 256, 384, 20, 16)} == {
        48: 64, 96: 128, 192: 64, 256: 128, 384: 128, 20: 32, 16: 16}


TAP_BLOCKS = [
    # (N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups, dtype, layout, BLOCK_K)
    (2, 32, 9, 8, 20, 3, 1, 1, 1, 1, torch.float32, "channels_last", 16),  # two K blocks per tap
    (2, 32, 11, 11, 24, 5, 2, 2, 1, 2, torch.float32, "contiguous", 16),  # groups: one block per tap
    (1, 16, 10, 9, 8, (3, 5), 1, (2, 1), (2, 1), 1, torch.bfloat16, "channels_last", 16),  # dilation
    (2, 32, 7, 7, 12, 3, 1, 1, 1, 1, torch.float64, "noncontiguous", 16),
    (2, 64, 6, 6, 16, 3, 1, 1, 1, 1, torch.float32, "channels_last", 32),
]


@pytest.mark.parametrize("case", TAP_BLOCKS, ids=[f"tapblocks{i}" for i in range(len(TAP_BLOCKS))])
def test_forward_tap_blocks(device, case, monkeypatch):
    """Forward GEMMs whose K blocks each lie within one tap (Cig a multiple of BLOCK_K) take the 1-D
    index path; output (bias + ReLU) against float64."""
    N, C, H, W, Co, k, s, p, d, g, dtype, layout, bk = case
    k = k if isinstance(k, tuple) else (k, k)
    s, p, d = ((v, v) if isinstance(v, int) else v for v in (s, p, d))
    x = make_input((N, C, H, W), dtype, device, layout=layout, requires_grad=False)
    w = make_input((Co, C // g, *k), dtype, device, layout=layout, requires_grad=False, scale=0.3)
    b = make_input((Co,), dtype, device, requires_grad=False)
    out = output_size(H, W, k, s, p, d)
    spy = _LaunchSpy(K._conv2d_fwd_kernel)
    monkeypatch.setattr(K, "_conv2d_fwd_kernel", spy)
    cfg = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=bk, num_warps=4, num_stages=1)
    y = K.conv2d_forward(x, w, b, s, p, d, g, out, True, channels_last=layout == "channels_last", config=cfg)
    assert spy.kwargs[0]["TAP_BLOCKS"] is True
    xr, wr, br = ref_inputs(x, w, b)
    assert_close(y, TF.conv2d(xr, wr, br, stride=s, padding=p, dilation=d, groups=g).relu(), dtype, device)


TAP_BITS = [
    # (N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups, extra (bottom, right) outputs, TAP_BITS)
    (2, 16, 6, 7, 8, (4, 8), 1, (2, 3), 1, 1, (0, 0), True),  # 32 taps: bit 31 in use
    (2, 32, 5, 6, 12, (3, 4), 1, (1, 2), (2, 1), 2, (4, 2), True),  # dilation; windows wholly below/right of x
    (1, 16, 9, 8, 8, 5, 2, 2, 1, 1, (1, 0), True),  # stride 2
    (1, 16, 8, 8, 8, (3, 11), 1, (1, 5), 1, 1, (0, 0), False),  # 33 taps: the per-tap tests
]


@pytest.mark.parametrize("case", TAP_BITS, ids=[f"tapbits{i}" for i in range(len(TAP_BITS))])
def test_forward_tap_bits(device, case, monkeypatch):
    """TAP_BITS (tap blocks with padding, up to 32 taps): each position's valid taps as one word of
    bits from _tap_bits, the tap carried across trips. Asymmetric padding (extra output rows and
    columns past the bottom/right edge, so whole windows outside x) against float64."""
    N, C, H, W, Co, k, s, p, d, g, extra, bits = case
    k, s, p, d = ((v, v) if isinstance(v, int) else v for v in (k, s, p, d))
    x = make_input((N, C, H, W), torch.float32, device, layout="channels_last", requires_grad=False)
    w = make_input((Co, C // g, *k), torch.float32, device, requires_grad=False, scale=0.3)
    oh, ow = output_size(H, W, k, s, p, d)
    out = (oh + extra[0], ow + extra[1])
    spy = _LaunchSpy(K._conv2d_fwd_kernel)
    monkeypatch.setattr(K, "_conv2d_fwd_kernel", spy)
    cfg = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)
    y = K.conv2d_forward(x, w, None, s, p, d, g, out, False, channels_last=True, config=cfg)
    kw = spy.kwargs[0]
    assert kw["TAP_BLOCKS"] is True and kw["IN_BOUNDS"] is False and kw["TAP_BITS"] is bits
    xr, wr = ref_inputs(x, w)
    # Bottom/right padding enough for the extra outputs (torch pads symmetrically).
    xr = TF.pad(xr, (p[1], p[1] + extra[1] * s[1], p[0], p[0] + extra[0] * s[0]))
    assert_close(y, TF.conv2d(xr, wr, stride=s, dilation=d, groups=g), torch.float32, device)


def test_input_grad_tap_bits(device, monkeypatch):
    """The paper net's conv2 input gradient, scaled down: stride 1, 5x5, padding 2, groups 2, on the
    forward kernel with TAP_BITS (its channels a multiple of BLOCK_K), against float64 autograd."""
    spy = _LaunchSpy(K._conv2d_fwd_kernel)
    monkeypatch.setattr(K, "_conv2d_fwd_kernel", spy)
    x = make_input((2, 12, 7, 6), torch.float32, device, layout="channels_last", requires_grad=False)
    w = make_input((64, 6, 5, 5), torch.float32, device, requires_grad=False, scale=0.2)
    dy = make_input((2, 64, 7, 6), torch.float32, device, layout="channels_last", requires_grad=False)
    cfg = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)
    dx = K.conv2d_input_grad(dy, w, x.shape, (1, 1), (2, 2), (1, 1), 2, channels_last=True, config=cfg)
    assert spy.kwargs[0]["TAP_BITS"] is True
    xr, wr = ref_inputs(x, w)
    xr.requires_grad_()
    TF.conv2d(xr, wr, padding=2, groups=2).backward(dy.double().cpu())
    assert_close(dx, xr.grad, torch.float32, device, "grad_input")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_layer_channels_last(device, dtype, monkeypatch):
    """A layer as wide as AlexNet's (C_in 128) in channels_last through the op: the forward takes the
    per-tap K blocks with the default config and a channels_last copy of the weight, the weight
    gradient the per-tap kernel; output and every gradient against float64."""
    fwd = _LaunchSpy(K._conv2d_fwd_kernel)
    taps = _LaunchSpy(K._conv2d_wgrad_taps_kernel)
    monkeypatch.setattr(K, "_conv2d_fwd_kernel", fwd)
    monkeypatch.setattr(K, "_conv2d_wgrad_taps_kernel", taps)
    x = make_input((1, 128, 6, 6), dtype, device, layout="channels_last")
    w = make_input((16, 128, 3, 3), dtype, device, scale=0.1)
    b = make_input((16,), dtype, device)
    _check(device, dtype, x, w, b, stride=1, padding=1)
    assert fwd.kwargs[0]["TAP_BLOCKS"] is True and len(taps.grids) == 1
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("stride,padding", [((1, 1), (1, 1)), ((2, 2), (1, 1)), ((1, 1), (3, 3))],
                         ids=["as-forward", "dgrad-kernel-strided", "dgrad-kernel-wide-padding"])
@pytest.mark.parametrize("relu", [False, True])
def test_input_grad_paths(device, stride, padding, relu):
    """Both input-gradient paths (stride 1: the forward kernel on the flipped weight; otherwise the
    dgrad kernel), with dy masked by a ReLU as the op masks it, against float64 autograd."""
    x = make_input((2, 6, 9, 8), torch.float32, device, requires_grad=False)
    w = make_input((8, 3, 3, 3), torch.float32, device, requires_grad=False)
    y = TF.conv2d(x, w, stride=stride, padding=padding, groups=2).relu()
    dy = torch.randn_like(y)
    dx = K.conv2d_input_grad(_masked(dy, y, relu), w, x.shape, stride, padding, (1, 1), 2)
    xr, wr = ref_inputs(x, w)
    xr.requires_grad_()
    yr = TF.conv2d(xr, wr, stride=stride, padding=padding, groups=2)
    if relu:
        yr = yr * (y.double().cpu() > 0)
    yr.backward(dy.double().cpu())
    assert_close(dx, xr.grad, torch.float32, device, "grad_input")


def test_gpu_configs_are_valid(monkeypatch):
    """Configs the launcher picks on a GPU obey the compiler's rules (the interpreter checks none)."""
    monkeypatch.setattr(K, "is_interpreting", lambda: False)
    for kind in ("fwd", "dgrad", "wgrad", "wgrad_taps"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            for m, n in ((128 * 55 * 55, 48), (128 * 13 * 13, 192), (384, 2304), (384, 256), (384, 384), (16, 3),
                         (1, 1)):
                cfg = K._config(kind, dtype, m, n)
                K.check_config(cfg, dtype)
                if kind == "wgrad_taps":  # and with the multi-tap adjustments (_multi_tap_config checks too)
                    for taps in (2, 3, 4):
                        K._multi_tap_config(cfg, taps, dtype)
    with pytest.raises(ValueError, match="powers of two"):
        K.check_config(dict(BLOCK_M=48, BLOCK_N=64, BLOCK_K=32, num_stages=2), torch.float32)
    with pytest.raises(ValueError, match="shared memory"):
        K.check_config(dict(BLOCK_M=256, BLOCK_N=256, BLOCK_K=128, num_stages=4), torch.float32)


def test_autocast_cpu_runs_in_autocast_dtype():
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(5, 4, 3, 3)
    with fastalex.backend("triton"), torch.autocast("cpu", dtype=torch.bfloat16):
        y = F.conv2d(x, w, None, padding=1)
        ref = TF.conv2d(x, w, None, padding=1)
    assert y.dtype == ref.dtype == torch.bfloat16
    assert_close(y, TF.conv2d(x.bfloat16().double(), w.bfloat16().double(), padding=1), torch.bfloat16, "cpu")


def test_opcheck(device):
    x = torch.randn(2, 4, 7, 6, device=device, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    op = torch.ops.fastalex.conv2d.default
    torch.library.opcheck(op, (x, w, b, [2, 1], [1, 1], [1, 2], 2, [4, 4], True))
    torch.library.opcheck(op, (x, w, None, [1, 1], [0, 0], [1, 1], 2, [5, 4], False))


def test_torch_backend_is_torch(device):
    x = torch.randn(2, 4, 7, 7, device=device)
    w = torch.randn(6, 4, 3, 3, device=device)
    with fastalex.backend("torch"):
        y = F.conv2d_relu(x, w, None, padding=1)
    assert torch.equal(y, torch.relu(TF.conv2d(x, w, None, padding=1)))


def test_module_matches_torch(device):
    ours = fastalex.nn.Conv2d(6, 8, 3, stride=1, padding=1, groups=2, activation="relu").to(device)
    theirs = torch.nn.Conv2d(6, 8, 3, stride=1, padding=1, groups=2).to(device)
    theirs.load_state_dict(ours.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert repr(ours) == repr(theirs)[:-1] + ", activation='relu')"
    assert repr(fastalex.nn.Conv2d(3, 4, 5)) == repr(torch.nn.Conv2d(3, 4, 5))
    x = torch.randn(2, 6, 5, 5, device=device)
    with fastalex.backend("triton"):
        y = ours(x)
    assert_close(y, torch.relu(theirs.double().cpu()(x.double().cpu())), torch.float32, device)
    with pytest.raises(NotImplementedError, match="padding_mode"):
        fastalex.nn.Conv2d(3, 4, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="activation"):
        fastalex.nn.Conv2d(3, 4, 3, activation="gelu")


def _bad(**over):
    args = dict(input=torch.randn(2, 4, 8, 8), weight=torch.randn(6, 4, 3, 3), bias=torch.randn(6))
    args.update(over)
    return args


ERRORS = [
    (_bad(input=torch.randn(4, 8)), ValueError, "input must be 3-D or 4-D"),
    (_bad(input=torch.randn(1, 2, 4, 8, 8)), ValueError, "input must be 3-D or 4-D"),
    (_bad(weight=torch.randn(6, 4, 3)), ValueError, "weight must be 4-D"),
    (_bad(input=torch.randint(0, 5, (2, 4, 8, 8))), TypeError, "input must be a floating-point tensor"),
    (_bad(input=[[1.0]]), TypeError, "input must be a torch.Tensor"),
    (_bad(weight=torch.randn(6, 4, 3, 3, dtype=torch.float64)), TypeError, "weight must have the dtype of input"),
    (_bad(bias=torch.randn(6, dtype=torch.float16)), TypeError, "bias must have the dtype of input"),
    (_bad(bias=torch.randn(5)), ValueError, r"bias must have shape \(6,\)"),
    (_bad(bias=torch.randn(6, 1)), ValueError, "bias must be 1-D"),
    (_bad(weight=torch.randn(6, 3, 3, 3)), ValueError, "expects 3 input channels"),
    (_bad(groups=3), ValueError, "groups=3 must divide"),
    (_bad(groups=0), ValueError, "groups must be a positive int"),
    (_bad(stride=0), ValueError, "stride must be >= 1"),
    (_bad(stride=(1, 2, 3)), TypeError, "stride must be an int or a pair"),
    (_bad(dilation=-1), ValueError, "dilation must be >= 1"),
    (_bad(padding=-1), ValueError, "padding must be >= 0"),
    (_bad(padding=1.5), TypeError, "padding must be an int or a pair"),
    (_bad(padding="full"), ValueError, "padding must be 'valid', 'same'"),
    (_bad(padding="same", stride=2), ValueError, "not supported for strided"),
    (_bad(weight=torch.randn(6, 4, 11, 11)), ValueError, "smaller than the dilated kernel"),
    (_bad(dilation=4), ValueError, "smaller than the dilated kernel"),
    (_bad(input=torch.randn(2, 4, 0, 8)), ValueError, "non-empty"),
    (_bad(weight=torch.randn(0, 4, 3, 3), bias=None), ValueError, "non-empty"),
    (_bad(activation="tanh"), ValueError, "activation must be one of"),
]


@pytest.mark.parametrize("args,exc,msg", ERRORS, ids=[f"err{i}" for i in range(len(ERRORS))])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_errors(args, exc, msg, backend, monkeypatch):
    """Clear errors, the same on both backends, raised before any kernel launches."""
    for name in ("conv2d_forward", "conv2d_input_grad", "conv2d_weight_grad"):
        monkeypatch.setattr(K, name, lambda *a, **k: pytest.fail("a kernel was launched for bad input"))
    with fastalex.backend(backend), pytest.raises(exc, match=msg):
        F.conv2d(**args)


def test_int32_limit_reaches_the_caller(device, monkeypatch):
    """The launchers raise only for the kernels' own limit (int32 offsets; the ops check the rest):
    it reaches the op's caller, forward and backward, naming the tensor. The limit is lowered to these
    tensors' sizes rather than building 2**31-element ones."""
    x = make_input((2, 4, 6, 6), torch.float32, device)  # 288 elements; output (2, 6, 6, 6): 432
    w = make_input((6, 4, 3, 3), torch.float32, device)
    with fastalex.backend("triton"):
        y = F.conv2d_relu(x, w, None, padding=1)
        monkeypatch.setattr(_common, "MAX_OFFSET", 300)
        with pytest.raises(NotImplementedError, match="^grad_output spans 432 elements.*int32"):
            y.sum().backward()
        with pytest.raises(NotImplementedError, match="^output spans 432 elements.*int32"):
            F.conv2d_relu(x, w, None, padding=1)
        monkeypatch.setattr(_common, "MAX_OFFSET", 200)
        with pytest.raises(NotImplementedError, match="^input spans 288 elements.*int32"):
            F.conv2d_relu(x, w, None, padding=1)


def test_device_mismatch_message():
    meta_w = torch.randn(6, 4, 3, 3, device="meta")
    with pytest.raises(ValueError, match=re.escape("weight must be on the device of input (cpu)")):
        F.conv2d(torch.randn(2, 4, 8, 8), meta_w)


# ---------------------------------------------------------------------------------------------
# Row blocks: few-channel, channels_last forwards (conv1) take one kernel row per K block

ROW_CASES = [
    # (N, C_in, H, W, C_out, kernel, stride, padding, dtype): conv1 scaled down, odd sizes, padding on
    # both sides (negative window starts), a non-square kernel, every dtype
    (2, 3, 31, 29, 8, 11, 4, 2, torch.float32),
    (1, 3, 23, 19, 5, (5, 3), (2, 3), (2, 1), torch.float64),
    (2, 5, 9, 8, 6, 3, 1, 1, torch.bfloat16),
    (3, 2, 7, 11, 4, (3, 5), 1, (0, 2), torch.float16),
]


@pytest.mark.parametrize("case", ROW_CASES, ids=[f"row{i}" for i in range(len(ROW_CASES))])
def test_forward_row_blocks(device, case, monkeypatch):
    N, C, H, W, Co, k, s, p, dtype = case
    x = make_input((N, C, H, W), dtype, device, layout="channels_last")
    kk = k if isinstance(k, tuple) else (k, k)
    w = make_input((Co, C, *kk), dtype, device, scale=0.3)
    b = make_input((Co,), dtype, device)
    spy = _LaunchSpy(K._conv2d_fwd_kernel)
    monkeypatch.setattr(K, "_conv2d_fwd_kernel", spy)
    _check(device, dtype, x, w, b, stride=s, padding=p)
    assert spy.kwargs[0]["ROW_BLOCKS"] is True and spy.kwargs[0]["TAP_BLOCKS"] is False
    assert spy.kwargs[0]["BLOCK_K"] >= kk[1] * C


def test_row_blocks_only_where_rows_are_contiguous(device, monkeypatch):
    spy = _LaunchSpy(K._conv2d_fwd_kernel)
    monkeypatch.setattr(K, "_conv2d_fwd_kernel", spy)
    w = make_input((4, 3, 3, 3), torch.float32, device, requires_grad=False)
    for layout in ("contiguous", "noncontiguous"):  # (kw, c) not a contiguous run of x
        x = make_input((1, 3, 8, 8), torch.float32, device, layout=layout, requires_grad=False)
        with fastalex.backend("triton"):
            F.conv2d(x, w)
    x = make_input((1, 3, 9, 9), torch.float32, device, layout="channels_last", requires_grad=False)
    with fastalex.backend("triton"):
        F.conv2d(x, w, dilation=(1, 2))  # dilated along W: the row has gaps
        x2 = make_input((1, 6, 8, 8), torch.float32, device, layout="channels_last", requires_grad=False)
        F.conv2d(x2, w, groups=2)  # a group's channels are part of a pixel
    assert [kw["ROW_BLOCKS"] for kw in spy.kwargs] == [False, False, False, False]


def test_row_blocks_gpu_config_widens_block_k_within_shared_memory():
    """On a GPU the heuristic's BLOCK_K (32) is set for a row (conv1: 11 taps x 3 channels = 33: 32 and
    a ROW_TAIL block in fp32 and bf16, raised to 64 in fp64), with a config the GPU compiler accepts
    (checked by check_config: powers of two >= 16, shared memory within 227 KB); a caller's config with
    a shorter BLOCK_K is left alone (no row blocks)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = torch.empty(128, 3, 227, 227, dtype=dtype, device="meta").contiguous(memory_format=torch.channels_last)
        w = torch.empty(96, 3, 11, 11, dtype=dtype, device="meta").contiguous(memory_format=torch.channels_last)
        given = dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)
        rows, cfg = K._row_blocks(x, w, (1, 1), False, given, widen=True)
        tail = dtype != torch.float64  # 32 of a row in the loop, the rest in ROW_TAIL; bf16 on 8 warps
        assert rows and cfg["BLOCK_K"] == (32 if tail else 64) and cfg["BLOCK_M"] == 128 and cfg["BLOCK_N"] == 64
        assert cfg["num_warps"] == (8 if dtype == torch.bfloat16 else 4)  # tf32: one warpgroup (no wgmma waits)
        assert K._row_tail(33, 11, cfg["BLOCK_K"]) == (16 if tail else 0)
        K.check_config(cfg, dtype)
        assert K._row_blocks(x, w, (1, 1), False, given, widen=False) == (False, given)
    # a row longer than 128 elements (11 taps x 16 channels) stays on the flat path
    x = torch.empty(1, 16, 32, 32, device="meta").contiguous(memory_format=torch.channels_last)
    w = torch.empty(8, 16, 11, 11, device="meta").contiguous(memory_format=torch.channels_last)
    assert K._row_blocks(x, w, (1, 1), False, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
                         widen=True)[0] is False


def test_row_blocks_gpu_config_at_few_positions(monkeypatch):
    """On a GPU a 16-bit conv1 at batch 1-2 (under 8192 positions: the heuristic's 64x128x64, whose
    BLOCK_K holds a row) also gets the row-tail config, not padded 64-element rows (perf.static, batch
    2 bf16: 744 B of spills, ceiling 0.42 -> none, 0.76). The interpreter keeps the config it is given."""
    x = torch.empty(2, 3, 227, 227, dtype=torch.bfloat16, device="meta").contiguous(memory_format=torch.channels_last)
    w = torch.empty(96, 3, 11, 11, dtype=torch.bfloat16, device="meta").contiguous(memory_format=torch.channels_last)
    given = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)
    assert K._row_blocks(x, w, (1, 1), False, given, widen=True) == (True, given)  # interpreting
    monkeypatch.setattr(K, "is_interpreting", lambda: False)
    assert K._config("fwd", torch.bfloat16, 2 * 55 * 55, 96) == given  # the GPU heuristic's
    rows, cfg = K._row_blocks(x, w, (1, 1), False, given, widen=True)
    assert rows and (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"]) == (64, 64, 32, 4)
    assert K._row_tail(33, 11, cfg["BLOCK_K"]) == 16
    assert K._row_blocks(x, w, (1, 1), False, given, widen=False) == (True, given)  # a caller's config


def test_row_tail_sizes():
    """Row blocks take the power of two below the row where the rows' rest fits a block of 16 (conv1:
    32 + 11 x 1; not fp64); the second column tile is BLOCK_K wide (the x tile's load layout)."""
    assert K._row_block_k(33, 11, 2) == 32 and K._row_block_k(33, 11, 4) == 32 and K._row_block_k(33, 11, 8) == 64
    assert K._row_block_k(40, 5, 2) == 64  # 5 rows x 8 left: 40 > 16, padded rows instead
    assert K._row_block_k(17, 16, 2) == 16 and K._row_block_k(17, 17, 2) == 32
    assert K._row_block_k(12, 3, 2) == 16  # no power of two >= 16 below the row
    assert K._row_tail(33, 11, 32) == 16 and K._row_tail(33, 11, 64) == 0 and K._row_tail(21, 7, 16) == 64
    assert K._row_tail_n(96, 32) == (64, 32) and K._row_tail_n(40, 16) == (32, 16)
    assert K._row_tail_n(20, 16) == (16, 16) and K._row_tail_n(6, 16) == (16, 0) and K._row_tail_n(384, 32) == (64, 32)


ROW_TAIL_CASES = [
    # (N, C_in, H, W, C_out, kernel, stride, padding, dilation, dtype): conv1 scaled down (no padding,
    # 32 + 1 a row, 64 + 32 columns, a ragged M block), padding on both sides with 5 of each row left
    # over (7 rows -> a tail of 64) and ragged 32 + 16 columns, dilation along H with a non-square
    # kernel, and fewer channels than one column tile
    (2, 3, 31, 31, 96, 11, 4, 0, 1, torch.float32),
    (1, 3, 15, 13, 40, 7, 2, 3, 1, torch.float64),
    (2, 5, 12, 11, 20, (3, 4), 1, (1, 0), (2, 1), torch.float16),
    (1, 2, 9, 9, 6, 9, 1, 0, 1, torch.bfloat16),
    (2, 3, 31, 31, 96, 11, 4, 0, 1, torch.bfloat16),
]


@pytest.mark.parametrize("case", ROW_TAIL_CASES, ids=[f"tail{i}" for i in range(len(ROW_TAIL_CASES))])
def test_forward_row_tail(device, case, monkeypatch):
    """ROW_TAIL (on GPUs: conv1 in fp32 and bf16): the loop takes each row's first BLOCK_K elements with clamped,
    unmasked loads, one block after it the rest of every row. Forced here in every dtype with a GPU-like
    BLOCK_K and the power of two below the row."""
    N, C, H, W, Co, k, s, p, d, dtype = case
    kk = k if isinstance(k, tuple) else (k, k)
    config = K._config
    gpu_like = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=1)  # BLOCK_K < row: widened
    monkeypatch.setattr(K, "_config", lambda kind, dt, m, n: dict(gpu_like) if kind == "fwd" else config(kind, dt, m, n))
    monkeypatch.setattr(K, "_row_block_k", lambda row, KH, elem: 1 << (row.bit_length() - 1))
    spy = _LaunchSpy(K._conv2d_fwd_kernel)
    monkeypatch.setattr(K, "_conv2d_fwd_kernel", spy)
    x = make_input((N, C, H, W), dtype, device, layout="channels_last", requires_grad=False)
    w = make_input((Co, C, *kk), dtype, device, scale=0.3, requires_grad=False)
    b = make_input((Co,), dtype, device, requires_grad=False)
    xr, wr, br = ref_inputs(x, w, b)
    ref = torch.relu(TF.conv2d(xr, wr, br, stride=s, padding=p, dilation=d))
    with fastalex.backend("triton"):
        y = F.conv2d(x, w, b, activation="relu", stride=s, padding=p, dilation=d)
    assert_close(y, ref, dtype, device, "output")
    kw = spy.kwargs[0]
    row = kk[1] * C
    assert kw["ROW_BLOCKS"] and kw["BLOCK_K"] < row and kw["ROW_TAIL"] == K._row_tail(row, kk[0], kw["BLOCK_K"]) > 0
    assert (kw["BLOCK_N"], kw["BLOCK_N2"]) == K._row_tail_n(Co, kw["BLOCK_K"])
    assert kw["IN_BOUNDS"] == (p == 0)
    # x a row ahead where it goes through registers (16-bit, no padding: tail3 and tail4)
    assert kw["X_NEXT"] == (p == 0 and dtype in (torch.float16, torch.bfloat16))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_weight_rows(layout):
    """Row blocks read the weight as (C_out, KH, R) rows, each (kw, c) run at the start of R (rounded up
    to 16): the same values, one copy from any layout, rows 32-byte aligned and strides the JIT marks
    divisible by 16, so the tiles load as 16-byte vectors."""
    w = make_input((6, 3, 11, 5), torch.bfloat16, "cpu", layout=layout, requires_grad=False)
    rows = K._weight_rows(w)
    assert torch.equal(rows, w) and rows.shape == w.shape
    assert rows.stride() == (11 * 16, 1, 16, 3)  # (kw, c) runs of 15, rows of 16
    assert rows.data_ptr() % 32 == 0 and all(s % 16 == 0 for s in rows.stride()[::2])


# ---------------------------------------------------------------------------------------------
# perf.tune times the launches autograd makes


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "relu-in-lrn"])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_tune_times_the_launches_autograd_makes(layout, relu, monkeypatch):
    """perf.tune's heuristic launches (fwd, dgrad, and the weight-gradient kind it marks autograd's)
    are those a training step's conv2d_relu (conv2d where the LRN + pool after it takes the ReLU: conv1,
    conv2) forward and backward make: same kernels, launch options, constexprs, scalars, grids and
    tensor shapes, strides and dtypes. Launches are recorded, not run."""
    from perf import static, tune
    from perf.shapes import ConvShape

    def signature(launches):
        def arg(a):
            return (tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a
        return sorted(repr((la.kernel.__name__, [arg(a) for a in la.args], sorted(la.kwargs.items()), la.grid))
                      for la in launches)

    monkeypatch.setattr(tune, "DEVICE", "cpu")
    s = ConvShape("conv3", 32, 6, 16, 3, 1, 1, 1, relu)  # 32 input channels: NHWC takes the per-tap weight gradient
    x, w, b, y, dy = tune._tensors(s, "float32", layout, 2)
    marked = []
    with static.intercept() as tuned:
        for kind in ("fwd", "dgrad", "wgrad", "wgrad_taps"):
            if kind == "wgrad_taps" and layout == "nchw":
                continue  # (not swept: autograd never runs it on NCHW)
            fast, _ref, autograd = tune._calls(s, kind, x, w, b, y, dy)
            if autograd:
                marked.append(kind)
                fast(None)
    assert marked == ["fwd", "dgrad", "wgrad_taps" if layout == "nhwc" else "wgrad"]
    # On a GPU the op runs NCHW input channels_last: none of the NCHW launches is autograd's there.
    monkeypatch.setattr(tune, "DEVICE", "cuda")
    on_gpu = [k for k in ("fwd", "dgrad", "wgrad", "wgrad_taps") if tune._calls(s, k, x, w, b, y, dy)[2]]
    assert on_gpu == (marked if layout == "nhwc" else [])
    monkeypatch.setattr(tune, "DEVICE", "cpu")
    xa, wa, ba = (t.detach().clone().requires_grad_() for t in (x, w, b))
    with static.intercept() as trained, fastalex.backend("triton"):
        (F.conv2d_relu if relu else F.conv2d)(xa, wa, ba, s.stride, s.padding).backward(dy)
    assert signature(tuned) == signature(trained)


@pytest.mark.parametrize("kind", ["wgrad", "wgrad_taps"])
def test_tune_splits_center_on_the_launchers(kind, monkeypatch):
    """perf.tune times each weight-gradient config at the split the launcher would give it (and half and
    twice that): its tile count follows the launch's, taps a program and a kernel row a tap included
    (conv2 and the paper net's conv2 take rows), for every AlexNet layer and sweep config at batch 128."""
    from perf import static, tune
    from perf.shapes import CONV

    monkeypatch.setattr(K, "is_interpreting", lambda: False)
    monkeypatch.setattr(K, "_num_sms", lambda device: 132)
    checked = set()
    for s in CONV:
        cig = s.c_in // s.groups
        if kind == "wgrad_taps" and cig < 16:
            continue
        x = torch.empty(128, s.c_in, s.size, s.size, device="meta").contiguous(memory_format=torch.channels_last)
        dy = torch.empty(128, s.c_out, s.out_size, s.out_size, device="meta").contiguous(
            memory_format=torch.channels_last)
        w_shape = (s.c_out, cig, s.kernel, s.kernel)
        rows = kind == "wgrad_taps" and K.default_rows(x, w_shape, (1, 1))
        for t in tune.CONFIGS[kind]:
            cfg = tune._cfg(t)
            with static.intercept() as launches:
                K.conv2d_weight_grad(dy, x, w_shape, (s.stride,) * 2, (s.padding,) * 2, (1, 1), s.groups,
                                     config=cfg, taps=kind == "wgrad_taps")
            assert launches[0].grid[2] in tune._splits(s, cfg, 128, kind, rows), (s.name, t)
            if kind == "wgrad_taps":
                assert launches[0].kwargs["ROWS"] == rows
            checked.add((s.name, rows))
    assert ("conv2", kind == "wgrad_taps") in checked and ("conv2-g2", kind == "wgrad_taps") in checked
