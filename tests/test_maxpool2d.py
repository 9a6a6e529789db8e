"""fastalex max_pool2d vs torch.nn.functional.max_pool2d run in float64 on CPU.

Values and indices must equal torch's exactly (a max is one of the inputs; indices follow torch's
rule: first maximum wins, the last NaN wins, an all -inf window reports its first element). The
gradient is compared with the dtype's tolerance (the reference gets the same rounded inputs and
output gradient in float64, so only the order of the additions differs).
"""

import pytest
import torch
import torch.nn.functional as TF

import fastalex
from fastalex.functional import max_pool2d
from fastalex.kernels import _common
from fastalex.kernels import maxpool2d as K
from fastalex.kernels._geometry import output_length
from reference import assert_close, make_input, ref_inputs

ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "channels_last", "noncontiguous")
# AlexNet's three poolings (kernel 3, stride 2): 55 -> 27, 27 -> 13, 13 -> 6; batch and channels scaled down.
ALEXNET = {"pool1": (2, 3, 55, 55), "pool2": (2, 4, 27, 27), "pool5": (2, 5, 13, 13)}


def _args(kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    return dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)


def check(x: torch.Tensor, device: str, grad: bool = True, **args) -> None:
    """Forward (values, indices, strides) and backward of fastalex's op vs torch's in float64."""
    dtype = x.dtype
    with fastalex.backend("triton"):
        y, idx = max_pool2d(x, **args, return_indices=True)
        y_only = max_pool2d(x, **args)
    (xr,) = ref_inputs(x)
    yr, idxr = TF.max_pool2d(xr, **args, return_indices=True)
    torch.testing.assert_close(y.detach().cpu().double(), yr.detach(), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(y_only.detach().cpu().double(), yr.detach(), rtol=0, atol=0, equal_nan=True)
    assert idx.dtype == torch.int64 and torch.equal(idx.cpu(), idxr), "indices differ from torch's"
    # Memory format follows the input exactly as torch's own op (same dtype, same layout) does.
    yt = TF.max_pool2d(x.detach(), **args)
    assert y.stride() == yt.stride() == idx.stride() == y_only.stride(), (y.stride(), yt.stride(), idx.stride())
    if grad:
        dy = torch.randn(y.shape, dtype=torch.float64).to(device=device, dtype=dtype)
        (gx,) = torch.autograd.grad(y, x, dy)
        (gr,) = torch.autograd.grad(yr, xr, dy.cpu().double())
        assert_close(gx, gr, dtype, device, "grad_input")


# ---------------------------------------------------------------------------------------------
# Correctness


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pool", list(ALEXNET))
def test_alexnet_pools(pool, layout, dtype, device):
    x = make_input(ALEXNET[pool], dtype, device, layout)
    check(x, device, **_args(3, 2))


CONFIGS = {
    "k2_default_stride": _args(2),
    "k3s1_pad1": _args(3, 1, 1),
    "k3s2_pad1_ceil": _args(3, 2, 1, ceil_mode=True),
    "k3s2_ceil": _args(3, 2, ceil_mode=True),
    "k2s2_ceil_drop_last": _args(2, 2, ceil_mode=True),  # ceil's last window would start past the input
    "dilation2": _args(3, 1, 1, 2),
    "dilation_pair": _args((2, 3), (1, 2), (1, 1), (3, 2)),
    "nonsquare": _args((3, 2), (2, 1), (1, 0)),
    "nonsquare_ceil": _args((2, 4), (3, 2), (1, 2), (1, 2), True),
    "stride_gt_kernel": _args(2, 3),
    "stride_gt_kernel_ceil": _args((2, 3), (4, 5), (1, 0), ceil_mode=True),
    "k1": _args(1, 1),
    "stride_empty": _args(3, ()),
    "tuple_len1": _args((3,), (2,), (1,), (1,)),
    "big_window_int16": _args((12, 11), 1, (6, 5)),  # 132 > 127 elements: int16 argmax
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_configs(name, device):
    x = make_input((2, 3, 13, 14), torch.float64, device)
    check(x, device, **CONFIGS[name])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float16))
def test_configs_layouts(layout, dtype, device):
    x = make_input((2, 5, 11, 10), dtype, device, layout)
    check(x, device, **CONFIGS["nonsquare_ceil"])
    check(x, device, **CONFIGS["dilation2"])


@pytest.mark.parametrize("layout", ("contiguous", "noncontiguous", "hwc"))
def test_unbatched(layout, device):
    if layout == "hwc":  # channels innermost, like channels_last: torch still returns a contiguous output
        x = make_input((13, 12, 3), torch.float32, device).detach().permute(2, 0, 1).requires_grad_(True)
    else:
        x = make_input((3, 13, 12), torch.float32, device, layout)
    check(x, device, **_args(3, 2, 1))
    with fastalex.backend("triton"):
        y = max_pool2d(x, 3, 2, 1)
    assert y.shape == (3, 7, 6) and y.is_contiguous()


def test_empty_batch(device):
    for layout in ("contiguous", "channels_last"):
        x = make_input((0, 3, 9, 9), torch.float32, device, layout)
        with fastalex.backend("triton"):
            y, idx = max_pool2d(x, 3, 2, return_indices=True)
        ref = TF.max_pool2d(x.detach(), 3, 2)
        assert y.shape == idx.shape == ref.shape == (0, 3, 4, 4) and y.stride() == ref.stride()
        (g,) = torch.autograd.grad(y.sum(), x)
        assert g.shape == x.shape


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_ties(layout, dtype, device):
    # Values from {0, 1, 2}: nearly every window has ties; the first maximum must win, like torch.
    x = torch.randint(0, 3, (2, 3, 15, 13)).to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    check(x, device, **_args(3, 2, 1))
    check(x, device, **_args((3, 2), 1, (1, 1), (2, 1), True))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_nan_inf(dtype, device):
    x = make_input((2, 3, 12, 11), dtype, device, requires_grad=False)
    flat = x.view(-1)
    n = flat.numel()
    perm = torch.randperm(n, device=device)
    flat[perm[: n // 12]] = float("nan")  # windows with one NaN and with several
    flat[perm[n // 12: n // 6]] = float("inf")
    flat[perm[n // 6: n // 3]] = float("-inf")
    x[0, 0, :3, :3] = float("nan")  # a window of NaNs only: the last NaN wins
    x[0, 1, :4, :4] = float("-inf")  # windows of -inf only: the first element's index
    x[1, 2, :3, :3] = float("inf")
    x.requires_grad_(True)
    for args in (_args(3, 2), _args(3, 1, 1), _args((2, 3), (2, 1), (1, 1), 2, True)):
        check(x, device, **args)


# Stride 2 both ways, no padding or dilation, windows of at most 4: the backward in 2 x 2 cells.
CELL_CONFIGS = {"k3s2": (3, 3), "k2s2": (2, 2), "k4s2": (4, 4), "k3x2s2": (3, 2),
                "k1x3s2": (1, 3)}  # (k1x3: odd rows in no window)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(CELL_CONFIGS))
def test_backward_cells(name, layout, dtype, device, monkeypatch):
    """Against float64, and bitwise the one-input-a-thread kernel, on odd and even planes (ragged last
    cells), with ties (windows sharing a first maximum)."""
    kernel_size = CELL_CONFIGS[name]
    assert K.pools_in_cells(kernel_size, (2, 2))
    for shape in ((2, 5, 13, 11), (1, 3, 8, 10)):
        x = make_input(shape, dtype, device, layout, requires_grad=False)
        x[..., 2:7, 3:8] = 1.0
        x.requires_grad_(True)
        check(x, device, **_args(kernel_size, 2))
        y, arg, _ = K.maxpool2d_forward(x.detach(), kernel_size, (2, 2), (0, 0), (1, 1))
        dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(device, dtype)
        args = (dy, arg, x.shape, kernel_size, (2, 2), (0, 0), (1, 1), layout == "channels_last")
        dx = K.maxpool2d_backward(*args)
        with monkeypatch.context() as m:
            m.setattr(K, "pools_in_cells", lambda *a: False)
            assert torch.equal(dx, K.maxpool2d_backward(*args))


def test_backward_cells_as_alexnet_runs_it(device, monkeypatch):
    """pool5 in the model: x channels_last, its gradient NCHW-contiguous (flatten's backward), dx
    channels_last; and a batch past the 3-D grid's sample axis takes the one-input kernel (65535
    made 1 here), with the same result."""
    x = make_input((3, 8, 13, 13), torch.float32, device, "channels_last", requires_grad=False)
    y, arg, _ = K.maxpool2d_forward(x, (3, 3), (2, 2), (0, 0), (1, 1))
    dy = torch.randn(y.shape, dtype=torch.float32, generator=torch.Generator().manual_seed(4)).to(device)
    dx = K.maxpool2d_backward(dy, arg, x.shape, (3, 3), (2, 2), (0, 0), (1, 1), True)
    assert dx.is_contiguous(memory_format=torch.channels_last)
    (xr,) = ref_inputs(x.requires_grad_())
    (gr,) = torch.autograd.grad(TF.max_pool2d(xr, 3, 2), xr, dy.cpu().double())
    assert_close(dx, gr, torch.float32, device, "grad_input")
    monkeypatch.setattr(K, "MAX_GRID_YZ", 1)
    assert torch.equal(dx, K.maxpool2d_backward(dy, arg, x.shape, (3, 3), (2, 2), (0, 0), (1, 1), True))


def test_pools_in_cells():
    assert K.pools_in_cells((3, 3), (2, 2)) and K.pools_in_cells((4, 1), (2, 2))
    assert not K.pools_in_cells((5, 3), (2, 2))  # 3 candidate windows along h
    assert not K.pools_in_cells((3, 3), (1, 1)) and not K.pools_in_cells((3, 3), (2, 1))
    assert not K.pools_in_cells((3, 3), (2, 2), (1, 1)) and not K.pools_in_cells((3, 3), (2, 2), (0, 0), (2, 1))


def test_all_neg_inf_with_padding(device):
    x = torch.full((1, 2, 5, 6), float("-inf"), dtype=torch.float64, device=device, requires_grad=True)
    check(x, device, **_args(3, 2, 1, ceil_mode=True))
    check(x, device, **_args((2, 3), 1, (1, 1), (2, 2)))


def test_ceil_mode_empty_window(device):
    # ceil_mode can make a window that holds no input element: torch returns -inf and the index
    # of its first element at ih >= 0, iw >= 0 (past the input); fastalex matches, and sends it no gradient.
    x = make_input((1, 2, 1, 5), torch.float64, device)
    args = _args(3, 3, 1, 2, True)
    check(x, device, grad=False, **args)
    with fastalex.backend("triton"):
        y = max_pool2d(x, **args)
    assert torch.isinf(y).all()
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(g, torch.zeros_like(x))


@pytest.mark.parametrize("args", [_args(3, 2), _args(3, 1, 1, ceil_mode=True), _args((2, 3), (1, 2), (1, 1), (2, 1))],
                         ids=["k3s2", "k3s1p1_ceil", "dilated"])
def test_gradcheck(args, device):
    # Distinct values spaced far beyond gradcheck's eps: no ties, so the argmax never flips.
    # fast_mode (random projections) keeps the number of interpreted launches small.
    x = (torch.randperm(2 * 6 * 7).double().view(1, 2, 6, 7) / 8).to(device).requires_grad_(True)

    def f(t):
        with fastalex.backend("triton"):
            return max_pool2d(t, **args)

    assert torch.autograd.gradcheck(f, (x,), fast_mode=True)
    # Double backward (gradient of the backward w.r.t. grad_output) too.
    assert torch.autograd.gradgradcheck(f, (x,), fast_mode=True)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_backward_deterministic(dtype, device):
    # Stride 1: every input is in up to 9 windows, so a racy accumulation would show.
    x = torch.randint(0, 4, (2, 4, 16, 15)).to(device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with fastalex.backend("triton"):
        y = max_pool2d(x, 3, 1, 1)
    dy = torch.randn(y.shape, device=device).to(dtype)
    (g1,) = torch.autograd.grad(y, x, dy, retain_graph=True)
    (g2,) = torch.autograd.grad(y, x, dy)
    assert torch.equal(g1.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       g2.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    (xr,) = ref_inputs(x)
    (gr,) = torch.autograd.grad(TF.max_pool2d(xr, 3, 1, 1), xr, dy.cpu().double())
    assert_close(g1, gr, dtype, device, "grad_input")


def test_expanded_grad_output(device):
    # y.sum() hands back a stride-0 gradient: the kernels read any strides.
    x = make_input((2, 3, 9, 9), torch.float32, device, "channels_last")
    with fastalex.backend("triton"):
        (g,) = torch.autograd.grad(max_pool2d(x, 3, 2).sum(), x)
    (xr,) = ref_inputs(x)
    (gr,) = torch.autograd.grad(TF.max_pool2d(xr, 3, 2).sum(), xr)
    assert_close(g, gr, torch.float32, device, "grad_input")


# ---------------------------------------------------------------------------------------------
# Custom ops: opcheck, torch.compile


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("return_indices", (False, True))
def test_opcheck_forward(layout, return_indices, device):
    x = make_input((2, 3, 9, 8), torch.float32, device, layout)
    torch.library.opcheck(torch.ops.fastalex.max_pool2d.default, (x, [3, 3], [2, 2], [1, 1], [1, 1], True,
                                                                  return_indices))
    xu = make_input((3, 9, 8), torch.float32, device)
    torch.library.opcheck(torch.ops.fastalex.max_pool2d.default, (xu, [3, 2], [2, 1], [0, 1], [1, 2], False,
                                                                  return_indices))


@pytest.mark.parametrize("channels_last", (False, True))
def test_opcheck_backward(channels_last, device):
    x = make_input((2, 3, 9, 8), torch.float64, device, requires_grad=False)
    _y, arg, _i = torch.ops.fastalex.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], False, False)
    dy = make_input(arg.shape, torch.float64, device)
    torch.library.opcheck(torch.ops.fastalex.max_pool2d_backward.default,
                          (dy, arg, [2, 3, 9, 8], [3, 3], [2, 2], [1, 1], [1, 1], channels_last))


def test_compile_fullgraph(device):
    x = make_input((2, 3, 13, 13), torch.float32, device, "channels_last")

    def f(t):
        y, idx = max_pool2d(t, 3, 2, return_indices=True)
        return y * 2, idx

    with fastalex.backend("triton"):
        y, idx = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
        (g,) = torch.autograd.grad(y.sum(), x)
    (xr,) = ref_inputs(x)
    yr, idxr = TF.max_pool2d(xr, 3, 2, return_indices=True)
    (gr,) = torch.autograd.grad((yr * 2).sum(), xr)
    assert torch.equal(y.detach().cpu().double(), yr.detach() * 2) and torch.equal(idx.cpu(), idxr)
    assert y.stride() == (yr * 2).contiguous(memory_format=torch.channels_last).stride()
    assert_close(g, gr, torch.float32, device, "grad_input")


def test_export(device):
    x = make_input((2, 3, 13, 13), torch.float32, device, requires_grad=False)
    with fastalex.backend("triton"):
        ep = torch.export.export(fastalex.nn.MaxPool2d(3, 2, return_indices=True), (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.fastalex.max_pool2d.default in targets
    y, idx = ep.module()(x)
    yr, idxr = TF.max_pool2d(x, 3, 2, return_indices=True)
    assert torch.equal(y, yr) and torch.equal(idx, idxr)


# ---------------------------------------------------------------------------------------------
# Module, backend choice


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, stride=2),
                                    dict(kernel_size=(3, 2), stride=(2, 1), padding=1, dilation=(1, 2), ceil_mode=True),
                                    dict(kernel_size=3, stride=2, return_indices=True)])
def test_module(kwargs, device):
    mine, theirs = fastalex.nn.MaxPool2d(**kwargs), torch.nn.MaxPool2d(**kwargs)
    assert repr(mine) == repr(theirs)
    assert mine.state_dict() == theirs.state_dict() == {}
    x = make_input((2, 3, 13, 12), torch.float32, device)
    with fastalex.backend("triton"):
        out = mine(x)
    ref = theirs(x.detach())
    if kwargs.get("return_indices"):
        assert isinstance(out, tuple) and torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    else:
        assert torch.equal(out, ref)


def test_backend_choice(device, monkeypatch):
    calls = []
    real = K.maxpool2d_forward

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(K, "maxpool2d_forward", counting)
    x = make_input((2, 3, 9, 9), torch.float32, device)
    with fastalex.backend("torch"):
        y_torch = max_pool2d(x, 3, 2, 1)
    assert not calls, "backend('torch') ran the Triton kernels"
    assert type(y_torch.grad_fn).__name__ == type(TF.max_pool2d(x, 3, 2, 1).grad_fn).__name__
    with fastalex.backend("triton"):
        y_triton = max_pool2d(x, 3, 2, 1)
    assert calls, "backend('triton') did not run the Triton kernels"
    assert torch.equal(y_torch, y_triton)


# ---------------------------------------------------------------------------------------------
# Errors: the same on both backends, raised before any launch


def _x(shape=(1, 2, 7, 7), dtype=torch.float32):
    return torch.randn(shape).to(dtype) if dtype.is_floating_point or dtype.is_complex else torch.ones(shape, dtype=dtype)


ERRORS = [
    # (id, input factory, kwargs, exception, message fragment, does torch raise too)
    ("not_tensor", lambda: [[1.0]], dict(kernel_size=2), TypeError, "input", True),
    ("int32", lambda: _x(dtype=torch.int32), dict(kernel_size=2), TypeError, "input", False),
    ("int64", lambda: _x(dtype=torch.int64), dict(kernel_size=2), TypeError, "input", False),
    ("bool", lambda: _x(dtype=torch.bool), dict(kernel_size=2), TypeError, "input", True),
    ("complex", lambda: _x(dtype=torch.complex64), dict(kernel_size=2), TypeError, "input", True),
    ("2d", lambda: _x((7, 7)), dict(kernel_size=2), ValueError, "input", True),
    ("5d", lambda: _x((1, 1, 2, 7, 7)), dict(kernel_size=2), ValueError, "input", True),
    ("zero_channels", lambda: _x((2, 0, 7, 7)), dict(kernel_size=2), ValueError, "input", True),
    ("zero_height", lambda: _x((2, 3, 0, 7)), dict(kernel_size=2), ValueError, "input", True),
    ("zero_width_unbatched", lambda: _x((3, 7, 0)), dict(kernel_size=2), ValueError, "input", True),
    ("zero_channels_unbatched", lambda: _x((0, 7, 7)), dict(kernel_size=2), ValueError, "input", True),
    ("kernel_zero", _x, dict(kernel_size=0), ValueError, "kernel_size", True),
    ("kernel_negative", _x, dict(kernel_size=(2, -1), stride=1), ValueError, "kernel_size", True),
    ("kernel_three", _x, dict(kernel_size=(2, 2, 2)), ValueError, "kernel_size", True),
    ("kernel_empty", _x, dict(kernel_size=()), ValueError, "kernel_size", True),
    ("kernel_float", _x, dict(kernel_size=2.0), TypeError, "kernel_size", True),
    ("kernel_bool", _x, dict(kernel_size=True), TypeError, "kernel_size", True),
    ("kernel_str", _x, dict(kernel_size="3"), TypeError, "kernel_size", True),
    ("stride_zero", _x, dict(kernel_size=2, stride=0), ValueError, "stride", True),
    ("stride_negative", _x, dict(kernel_size=2, stride=(1, -1)), ValueError, "stride", True),
    ("stride_three", _x, dict(kernel_size=2, stride=(1, 1, 1)), ValueError, "stride", True),
    ("stride_float", _x, dict(kernel_size=2, stride=1.5), TypeError, "stride", True),
    ("padding_negative", _x, dict(kernel_size=3, padding=-1), ValueError, "padding", True),
    ("padding_over_half", _x, dict(kernel_size=3, padding=2), ValueError, "padding", True),
    ("padding_over_half_w", _x, dict(kernel_size=(3, 4), padding=(2, 1)), ValueError, "padding", True),
    # torch checks padding against kernel_size // 2, not the dilated (effective) kernel.
    ("padding_over_half_dilated", _x, dict(kernel_size=2, stride=1, padding=2, dilation=3), ValueError, "padding", True),
    ("padding_three", _x, dict(kernel_size=3, padding=(1, 1, 1)), ValueError, "padding", True),
    ("dilation_zero", _x, dict(kernel_size=2, dilation=0), ValueError, "dilation", True),
    ("dilation_negative", _x, dict(kernel_size=2, dilation=(1, -2)), ValueError, "dilation", True),
    ("output_too_small", lambda: _x((1, 1, 2, 2)), dict(kernel_size=3, stride=2), ValueError, "output size", True),
    ("output_too_small_dilated", _x, dict(kernel_size=3, dilation=4), ValueError, "output size", True),
    ("ceil_mode_int", _x, dict(kernel_size=2, ceil_mode=1), TypeError, "ceil_mode", True),
    ("return_indices_str", _x, dict(kernel_size=2, return_indices="yes"), TypeError, "return_indices", False),
]


@pytest.mark.parametrize("backend", ("triton", "torch"))
@pytest.mark.parametrize("case", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors(case, backend, monkeypatch):
    _id, make, kwargs, exc, match, torch_raises = case

    def no_launch(*a, **k):
        raise AssertionError("launched despite invalid arguments")

    monkeypatch.setattr(K, "maxpool2d_forward", no_launch)
    with fastalex.backend(backend), pytest.raises(exc, match=match):
        max_pool2d(make(), **kwargs)
    if torch_raises:
        with pytest.raises(Exception):
            TF.max_pool2d(make(), **kwargs)


def test_accepts_what_torch_accepts(device):
    import numpy as np

    x = make_input((1, 2, 9, 9), torch.float64, device, requires_grad=False)
    for kwargs in (dict(kernel_size=np.int64(3), stride=[2]), dict(kernel_size=torch.Size([3, 2]), stride=None),
                   dict(kernel_size=[3, 3], stride=[], padding=[1], dilation=(2,))):
        with fastalex.backend("triton"):
            y = max_pool2d(x, **kwargs)
        assert torch.equal(y, TF.max_pool2d(x, **kwargs))


def test_int32_limit_reaches_the_caller(device, monkeypatch):
    """The launchers raise only for the kernels' own limit (int32 offsets; the ops check the rest):
    it reaches the op's caller, forward and backward, naming the tensor. The limit is lowered to this
    input's size rather than building a 2**31-element tensor."""
    x = make_input((1, 2, 7, 7), torch.float32, device)
    with fastalex.backend("triton"):
        y = max_pool2d(x, 3, 2, 1)
        monkeypatch.setattr(_common, "MAX_OFFSET", x.numel() - 2)
        with pytest.raises(NotImplementedError, match="^grad_input spans 98 elements.*int32"):
            y.sum().backward()
        with pytest.raises(NotImplementedError, match="^input spans 98 elements.*int32"):
            max_pool2d(x, 3, 2, 1)


# ---------------------------------------------------------------------------------------------
# Launch configuration and shape arithmetic (pure Python, no kernels)


def test_output_size_matches_torch():
    for size in range(1, 9):
        for k in range(1, 5):
            for s in range(1, 4):
                for d in range(1, 3):
                    for p in range(0, k // 2 + 1):
                        for ceil in (False, True):
                            ours = K.output_size(size, size, (k, k), (s, s), (p, p), (d, d), ceil)
                            conv = output_length(size, k, s, p, d)  # ceil_mode off: a conv's length
                            try:
                                ref = TF.max_pool2d(torch.zeros(1, 1, size, size), k, s, p, d, ceil).shape[-2:]
                            except RuntimeError:
                                assert ours[0] < 1, (size, k, s, p, d, ceil, ours)
                                continue
                            assert ours == tuple(ref), (size, k, s, p, d, ceil, ours, ref)
                            if not ceil and conv >= 1:
                                w = torch.zeros(1, 1, k, k)
                                want = TF.conv2d(torch.zeros(1, 1, size, size), w, None, s, p, d).shape[-1]
                                assert conv == want, (size, k, s, p, d, conv, want)


def test_argmax_dtype():
    assert K.argmax_dtype((3, 3)) == torch.int8
    assert K.argmax_dtype((1, 127)) == torch.int8 and K.argmax_dtype((2, 64)) == torch.int16
    assert K.argmax_dtype((181, 181)) == torch.int16 and K.argmax_dtype((182, 181)) == torch.int32


@pytest.mark.parametrize("interpreting", (False, True))
def test_block_sizes_are_powers_of_two(interpreting, monkeypatch):
    monkeypatch.setattr(K, "is_interpreting", lambda: interpreting)
    for total in (1, 100, 4374, 2**20, 2**24):
        block, warps = K._block(total)
        assert block > 0 and block & (block - 1) == 0 and warps in (1, 2, 4, 8)
    for C in (1, 5, 32, 256):
        for cells in (1, 9, 49, 196):
            block_s, block_c, warps = K._cell_blocks(C, cells)
            assert all(b > 0 and b & (b - 1) == 0 for b in (block_s, block_c)) and warps in (1, 2, 4, 8)
            if not interpreting:  # 2 cells a thread: 256 a tile
                assert block_s * block_c == 64 * warps
