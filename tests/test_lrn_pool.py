"""fastalex lrn_max_pool2d (LRN + max-pool fused) against torch's local_response_norm then max_pool2d in float64.

The reference is F.local_response_norm (grouped as in test_lrn: each group of channels a sample of its
own) then F.max_pool2d, in float64 on CPU, with one step added: the LRN values are rounded to the
input's dtype before the pool (a straight-through rounding, identity for the gradient). The kernel
rounds them the same way (it is exactly the unfused LRN -> pool), so the maxima ties the reference
sees are the kernel's (with its rounding mode: see _round_to), and its indices (first maximum wins,
last NaN wins) must equal the kernel's argmax exactly, in every dtype; without the rounding, bf16's
ties (~1% of windows) would route a whole gradient element elsewhere. Values and gradients are
compared with reference.py's per-dtype tolerances (the kernels compute in fp32: fp32 2e-5, fp16
3e-3, bf16 2e-2 relative error norm on the CPU).
"""

import pytest
import torch
import torch.nn.functional as TF

import fastalex
from fastalex import functional as F
from fastalex import nn as fnn
from fastalex.kernels import _common
from fastalex.kernels import lrn as L
from fastalex.kernels import lrn_maxpool2d as K
from fastalex.kernels import maxpool2d as M
from reference import assert_close, make_input, ref_inputs

ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PAPER = dict(size=5, alpha=5e-4, beta=0.75, k=2.0)  # the 2012 paper's LRN in torch's terms
STRONG = dict(size=5, alpha=2.0, beta=0.75, k=1.0)  # the cross-channel gradient as large as the direct one


def _lrn64(xr, groups, cfg):
    n, c = xr.shape[:2]
    return TF.local_response_norm(xr.reshape(n * groups, c // groups, *xr.shape[2:]), **cfg).reshape(xr.shape)


def _round_to(z, dtype, device):
    """z rounded to dtype and back as the kernel rounds it, with the identity as gradient (finite values
    only: inf - inf is NaN). Triton's interpreter casts fp32 to bf16 by truncation, GPUs to nearest even."""
    zd = z.detach()
    if dtype == torch.bfloat16 and device == "cpu":
        rounded = (zd.float().view(torch.int32) & -65536).view(torch.float32).double()
    else:
        rounded = zd.to(dtype).double()
    return torch.where(torch.isfinite(z), z + (rounded - zd), z)


def reference(x, groups, cfg, kernel_size, stride, relu=False):
    """(xr, y, indices): float64 leaf copy of x, max_pool2d(rounded grouped LRN (of relu(x) with relu)) and
    torch's int64 indices."""
    (xr,) = ref_inputs(x)
    z = _round_to(_lrn64(torch.relu(xr) if relu else xr, groups, cfg), x.dtype, x.device.type)
    y, idx = TF.max_pool2d(z, kernel_size, stride, return_indices=True)
    return xr, y, idx


def indices(argmax, W, kernel_size, stride):
    """The kernel's window offsets kh * KW + kw as torch's flat indices ih * W + iw."""
    a = argmax.long().cpu()
    oh = torch.arange(a.shape[2]).view(-1, 1)
    ow = torch.arange(a.shape[3])
    return (oh * stride[0] + a // kernel_size[1]) * W + ow * stride[1] + a % kernel_size[1]


def run(x, groups=1, cfg=PAPER, kernel_size=(3, 3), stride=(2, 2), relu=False):
    """(y, argmax) from the custom op, y also checked against the public function (Triton backend)."""
    with fastalex.backend("triton"):
        y, argmax = torch.ops.fastalex.lrn_max_pool2d(x, cfg["size"], cfg["alpha"], cfg["beta"], cfg["k"], groups,
                                                      list(kernel_size), list(stride), relu)
        out = F.lrn_max_pool2d(x, **cfg, kernel_size=kernel_size, stride=stride, groups=groups, relu=relu)
    torch.testing.assert_close(out.detach(), y.detach(), rtol=0, atol=0, equal_nan=True)
    return y, argmax


def check(x, groups=1, cfg=PAPER, kernel_size=(3, 3), stride=(2, 2), grad=True, relu=False):
    """Output, layout, argmax and input gradient of the fused op vs the float64 reference."""
    dtype, device = x.dtype, x.device
    y, argmax = run(x, groups, cfg, kernel_size, stride, relu)
    xr, yr, idxr = reference(x, groups, cfg, kernel_size, stride, relu)
    assert y.dtype == dtype and argmax.dtype == torch.int8
    # torch's ungrouped ops give this layout (its grouped LRN reshapes, which makes channels_last contiguous)
    layout = TF.max_pool2d(torch.empty_like(x.detach()), kernel_size, stride).stride()
    assert y.stride() == layout == argmax.stride(), "layout differs from torch's lrn -> max_pool2d"
    assert_close(y, yr, dtype, device)
    assert torch.equal(indices(argmax, x.shape[3], kernel_size, stride), idxr), "argmax differs from torch's indices"
    if grad:
        dy = torch.randn(yr.shape, dtype=torch.float64).to(dtype)
        (gx,) = torch.autograd.grad(y, x, dy.to(device))
        (gr,) = torch.autograd.grad(yr, xr, dy.double())
        assert gx.dtype == dtype and gx.shape == x.shape
        assert_close(gx, gr, dtype, device, "grad_input")
    return y, argmax


# ---------------------------------------------------------------------------------------------
# AlexNet's lrn1 -> pool1 (96 channels, 55x55; 48 a tower) and lrn2 -> pool2 (256, 27x27), scaled down,
# and odd shapes


SHAPES = {
    "pool1_towers": ((2, 12, 13, 13), 2, PAPER),
    "pool2_towers": ((1, 16, 27, 27), 2, STRONG),
    "pool1_single": ((2, 12, 15, 15), 1, STRONG),
    "odd_c5": ((2, 5, 13, 13), 1, STRONG),
    "odd_c7_even_window": ((1, 7, 11, 12), 1, dict(STRONG, size=4)),
    "groups3_window_gt_group": ((2, 12, 9, 10), 3, dict(size=7, alpha=1.0, beta=0.6, k=0.5)),
    "one_window": ((3, 7, 3, 3), 1, STRONG),
}


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("name", list(SHAPES))
def test_shapes(name, dtype, device):
    shape, groups, cfg = SHAPES[name]
    check(make_input(shape, dtype, device), groups, cfg)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous"])
def test_layouts(layout, dtype, device):
    x = make_input((2, 12, 13, 11), dtype, device, layout)
    y, _ = check(x, 2, STRONG)
    if layout == "channels_last":  # kept, as torch's ops keep it (the next conv reads NHWC)
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_hw_swapped_input(device):
    # Dense, but neither NCHW nor NHWC: read in place through its strides.
    x = torch.randn(2, 6, 9, 11, device=device).transpose(2, 3).requires_grad_()
    check(x, 2, STRONG)


# ---------------------------------------------------------------------------------------------
# relu=True: the ReLU before the LRN in the same pass (AlexNet's conv1 -> act1 -> lrn1 -> pool1)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("name", ["pool1_towers", "pool2_towers", "odd_c5", "groups3_window_gt_group"])
def test_relu(name, dtype, device):
    """max_pool2d(lrn(relu(x))) and the gradient of relu's input (zero where x <= 0) against float64,
    on inputs about half negative."""
    shape, groups, cfg = SHAPES[name]
    x = make_input(shape, dtype, device)
    assert (x < 0).any() and (x > 0).any()
    y, _ = check(x, groups, cfg, relu=True)
    with fastalex.backend("triton"):
        (g,) = torch.autograd.grad(F.lrn_max_pool2d(x, **cfg, groups=groups, relu=True).sum(), x)
    assert torch.all(g[x.detach() <= 0] == 0) and (g[x.detach() > 0] != 0).any()


@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous"])
def test_relu_layouts(layout, device):
    check(make_input((2, 12, 13, 11), torch.float32, device, layout), 2, STRONG, relu=True)


def test_relu_loop_path(device, monkeypatch):
    # The non-unrolled window loops (forced for size 5, then a window of 11) with the ReLU.
    monkeypatch.setattr(K, "MAX_UNROLL", 0)
    check(make_input((2, 10, 7, 7), torch.float64, device), 2, STRONG, relu=True)
    monkeypatch.undo()
    check(make_input((1, 13, 7, 7), torch.float64, device), 1, dict(STRONG, size=11), relu=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relu_equals_unfused_kernels(dtype, device):
    """Bitwise the fused op without ReLU on torch.relu(x), forward (values and argmax) and backward
    (then torch's relu backward: threshold_backward on relu(x))."""
    x = make_input((2, 12, 11, 13), dtype, device, "channels_last", requires_grad=False)
    cfg = dict(STRONG, groups=2)
    r = torch.relu(x)
    y, argmax = K.lrn_maxpool2d_forward(x, **cfg, relu=True)
    y2, argmax2 = K.lrn_maxpool2d_forward(r, **cfg)
    assert torch.equal(y, y2) and torch.equal(argmax, argmax2)
    dy = torch.randn_like(y)
    dx = K.lrn_maxpool2d_backward(dy, x, argmax, **cfg, relu=True)
    dx2 = torch.ops.aten.threshold_backward(K.lrn_maxpool2d_backward(dy, r, argmax2, **cfg), r, 0)
    assert torch.equal(dx, dx2) and dx.stride() == x.stride()


def test_relu_nan(device):
    """relu keeps NaN (as torch.relu), and its backward lets the gradient through at NaN (threshold_backward:
    NaN <= 0 is false): the fused op and torch's relu -> lrn -> pool agree on where NaN goes."""
    x = make_input((1, 6, 9, 9), torch.float64, device, requires_grad=False)
    x[0, 2, 3, 4] = float("nan")
    x[0, 4, 0, 0] = -float("inf")
    outs = {}
    for backend in ("torch", "triton"):
        xb = x.clone().requires_grad_()
        with fastalex.backend(backend):
            y = F.lrn_max_pool2d(xb, **STRONG, groups=2, relu=True)
        (g,) = torch.autograd.grad(y, xb, torch.ones_like(y))
        outs[backend] = (y, g)
    for a, b in zip(outs["triton"], outs["torch"]):
        torch.testing.assert_close(a, b, equal_nan=True)
    assert outs["triton"][0].isnan().any() and outs["triton"][1][0, 4, 0, 0] == 0


@pytest.mark.parametrize("kernel_size, stride", [((2, 2), (2, 2)), ((2, 3), (2, 1)), ((3, 3), (1, 1)),
                                                 ((2, 2), (3, 4))])  # the last: inputs no window covers
def test_pool_geometries(kernel_size, stride, device):
    check(make_input((2, 6, 11, 13), torch.float64, device), 2, STRONG, kernel_size, stride)


def test_default_stride_is_kernel_size(device):
    x = make_input((1, 4, 8, 8), torch.float64, device, requires_grad=False)
    with fastalex.backend("triton"):
        y = F.lrn_max_pool2d(x, 3, 1.0, 0.75, 1.0, kernel_size=2, stride=None)
    assert_close(y, TF.max_pool2d(TF.local_response_norm(x, 3, 1.0, 0.75, 1.0), 2), torch.float64, device)


def test_small_blocks(device, monkeypatch):
    """Many programs: ragged channel and position blocks, window halos across channel blocks, a group
    boundary inside a block (12 channels, groups 2, 8 a block); in quads, the halo quads in the
    neighbouring channel blocks and a group boundary between a block's two quads."""
    monkeypatch.setattr(K, "_block_sizes", lambda C, P, backward=False, quads=0, cells=False: (8, 8, 4))
    check(make_input((1, 13, 7, 9), torch.float32, device), 1, dict(STRONG, size=4))
    check(make_input((2, 12, 5, 7), torch.float32, device, "channels_last"), 2, STRONG)
    check(make_input((2, 24, 5, 7), torch.float32, device, "channels_last"), 1, STRONG)
    check(make_input((1, 16, 7, 5), torch.float32, device, "channels_last"), 4, dict(STRONG, size=9))


@pytest.mark.parametrize("channels, groups", [(12, 2), (10, 2), (8, 8)])
def test_group_boundary_one_step(channels, groups, device):
    """The backward finds each channel's group from the thread's first by one comparison where every
    offset its window spans is below the group size (6 > 5 // 2 + 3), by division otherwise (5; and 1,
    where one comparison would give wrong groups)."""
    check(make_input((1, channels, 7, 7), torch.float32, device, "channels_last"), groups, STRONG)


@pytest.mark.parametrize("cfg", [dict(size=3, alpha=1e-1, beta=1.0, k=-1.0), dict(size=5, alpha=1.0, beta=0.0, k=0.0)],
                         ids=["negative_base", "beta0"])
def test_pow_special_cases(cfg, device):
    """Constants outside kernels.lrn.simple_pow (a negative base with an integer power; beta = 0 with
    k = 0) take _pow's full form in the fused kernels too."""
    from fastalex.kernels.lrn import simple_pow

    assert not simple_pow(cfg["size"], cfg["alpha"], cfg["beta"], cfg["k"])
    check(make_input((2, 8, 9, 9), torch.float64, device), 2, cfg)


def test_simple_pow():
    assert simple_pow_of(PAPER) and simple_pow_of(STRONG) and simple_pow_of(dict(PAPER, beta=-0.5))
    for bad in (dict(k=0.0), dict(k=-1.0), dict(beta=0.0), dict(alpha=-1.0), dict(k=float("inf")),
                dict(alpha=float("nan"))):
        assert not simple_pow_of(dict(PAPER, **bad)), bad


def simple_pow_of(cfg):
    from fastalex.kernels.lrn import simple_pow

    return simple_pow(cfg["size"], cfg["alpha"], cfg["beta"], cfg["k"])


def test_loop_path(device, monkeypatch):
    # The non-unrolled window loops (windows > MAX_UNROLL, or forced here for size 5).
    monkeypatch.setattr(K, "MAX_UNROLL", 0)
    check(make_input((2, 10, 7, 7), torch.float64, device), 2, STRONG)
    monkeypatch.undo()
    check(make_input((1, 13, 7, 7), torch.float64, device), 1, dict(STRONG, size=11))


def test_expanded_grad(device):
    # .sum()'s gradient arrives expanded (zero strides): read in place.
    x = make_input((2, 8, 9, 9), torch.float64, device)
    with fastalex.backend("triton"):
        (g,) = torch.autograd.grad(F.lrn_max_pool2d(x, **STRONG, groups=2).sum(), x)
    (xr,) = ref_inputs(x)
    (gr,) = torch.autograd.grad(TF.max_pool2d(_lrn64(xr, 2, STRONG), 3, 2).sum(), xr)
    assert_close(g, gr, torch.float64, device, "grad_input")


def test_empty_batch(device):
    for layout in ("contiguous", "channels_last"):
        x = make_input((0, 6, 9, 9), torch.float32, device, layout)
        with fastalex.backend("triton"):
            y = F.lrn_max_pool2d(x, **PAPER, groups=2)
        assert y.shape == (0, 6, 4, 4) and y.stride() == TF.max_pool2d(x.detach(), 3, 2).stride()
        (g,) = torch.autograd.grad(y.sum(), x)
        assert g.shape == x.shape


# ---------------------------------------------------------------------------------------------
# The forward in channel quads (_fwd_quads: unit channel stride, whole quads a group)

QUAD_CASES = {
    "pool1_towers": ((2, 16, 13, 13), 2, PAPER),
    "pool2_single": ((1, 24, 11, 11), 1, STRONG),
    "quad_groups_size9": ((1, 16, 9, 7), 4, dict(STRONG, size=9)),  # windows span whole neighbouring quads
    "odd_window": ((2, 8, 7, 8), 1, dict(STRONG, size=4)),
    "groups_of_12": ((2, 24, 9, 11), 2, PAPER),  # whole quads, not pairs: the backward's one quad a thread
}


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("name", list(QUAD_CASES))
def test_quads(name, dtype, device):
    """Against float64 (values, argmax, gradient) and bitwise the unfused LRN and pool kernels."""
    shape, groups, cfg = QUAD_CASES[name]
    x = make_input(shape, dtype, device, "channels_last")
    y, argmax = check(x, groups, cfg)
    x = x.detach()
    assert K._quads(cfg["size"], groups, x, y, argmax)
    z = L.lrn_forward(x, **cfg, groups=groups)
    y2, argmax2, _ = M.maxpool2d_forward(z, (3, 3), (2, 2), (0, 0), (1, 1))
    assert torch.equal(y, y2) and torch.equal(argmax, argmax2)
    if cfg["size"] <= 5:
        dy = torch.randn_like(y)
        assert K._quads(cfg["size"], groups, x, x, dy, argmax, backward=True)
        dx = K.lrn_maxpool2d_backward(dy, x, argmax, **cfg, groups=groups)
        dz = M.maxpool2d_backward(dy, argmax, x.shape, (3, 3), (2, 2), (0, 0), (1, 1), True)
        dx2 = L.lrn_backward(dz, x, **cfg, groups=groups)
        if dtype in (torch.float32, torch.float64):  # (16-bit: the unfused dz is rounded to the dtype)
            assert torch.equal(dx, dx2)


def test_quads_unaligned_view(device):
    """Channels of a wider channels_last tensor from an offset of 1: unit channel stride, rows not
    16-byte aligned (a GPU loads them element by element; the results are the same)."""
    big = make_input((2, 17, 9, 9), torch.float32, device, "channels_last", requires_grad=False)
    x = big[:, 1:].requires_grad_()
    assert x.stride(1) == 1 and x.data_ptr() % 16 != 0
    y, argmax = check(x, 2, STRONG)
    assert K._quads(5, 2, x, y, argmax) and K._quads(5, 2, x, x, y, argmax, backward=True)


def test_quads_taken_where(monkeypatch):
    x = torch.empty(1, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    pooled = torch.empty(1, 16, 2, 2).contiguous(memory_format=torch.channels_last)
    arg = pooled.to(torch.int8)
    assert K._quads(5, 1, x, pooled, arg) == 4 and K._quads(9, 4, x, pooled, arg) == 4
    assert K._quads(5, 2, x, x, pooled, arg, backward=True) == 8  # pairs of quads: groups of 8
    assert K._quads(5, 4, x, x, pooled, arg, backward=True) == 4
    assert not K._quads(7, 1, x, x, pooled, arg, backward=True)  # the backward's strip holds size 5
    assert not K._quads(11, 1, x, pooled, arg)  # window past the neighbouring quads
    assert not K._quads(5, 8, x, pooled, arg)  # groups of 2 channels
    assert not K._quads(5, 1, x.contiguous(), pooled.contiguous(), arg.contiguous())  # NCHW
    assert not K._quads(5, 1, x, x, pooled.contiguous(), arg, backward=True)  # an NCHW dy
    x6 = torch.empty(1, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    p6 = torch.empty(1, 6, 2, 2).contiguous(memory_format=torch.channels_last)
    assert not K._quads(5, 1, x6, p6, p6.to(torch.int8))
    monkeypatch.setattr(K, "MAX_GRID_YZ", 0)  # more samples than a grid axis holds: the flat grid
    assert not K._quads(5, 1, x, pooled, arg)


def test_quads_past_the_grid_axis(device, monkeypatch):
    """Batches past the 3-D grid's sample axis take the flat-grid kernels (65535 here made 1)."""
    monkeypatch.setattr(K, "MAX_GRID_YZ", 1)
    x = make_input((2, 16, 9, 9), torch.float32, device, "channels_last")
    y, argmax = check(x, 2, STRONG)
    assert not K._quads(5, 2, x, y, argmax) and K._quads(5, 2, x[:1], y[:1], argmax[:1])


# Pool geometries in channels_last quads: stride 2 both ways with windows of at most 4 takes the
# backward in 2 x 2 cells (_bwd_cells), the rest one position a thread (_bwd_quads).
QUAD_GEOMETRIES = [((3, 3), (2, 2), True), ((2, 2), (2, 2), True), ((4, 4), (2, 2), True),
                   ((3, 2), (2, 2), True), ((1, 3), (2, 2), True),  # (rows 2 ci + 1 in no window)
                   ((3, 3), (1, 1), False), ((2, 3), (2, 1), False), ((5, 5), (2, 2), False)]


@pytest.mark.parametrize("kernel_size, stride, cells", QUAD_GEOMETRIES)
@pytest.mark.parametrize("shape", [(2, 16, 11, 9), (1, 24, 10, 12)])  # odd planes: ragged last cells
def test_quads_geometries(kernel_size, stride, cells, shape, device):
    """Against float64, and bitwise the unfused pool then LRN backward (fp32: their dz is exact)."""
    assert K._cells(kernel_size, stride) == cells
    x = make_input(shape, torch.float32, device, "channels_last")
    y, argmax = check(x, 2, STRONG, kernel_size, stride)
    x = x.detach()
    assert K._quads(5, 2, x, x, y, argmax, backward=True) == (8 if shape[1] % 16 == 0 else 4)
    dy = torch.randn_like(y)
    dx = K.lrn_maxpool2d_backward(dy, x, argmax, **STRONG, groups=2, kernel_size=kernel_size, stride=stride)
    dz = M.maxpool2d_backward(dy, argmax, x.shape, kernel_size, stride, (0, 0), (1, 1), True)
    assert torch.equal(dx, L.lrn_backward(dz, x, **STRONG, groups=2))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(3, 16, 13, 11), (1, 8, 9, 16)])  # OH, OW odd / even; 8 channels: pairs
def test_cells_equal_positions(shape, dtype, device, monkeypatch):
    """The kernels in cells bitwise the one-position-a-thread quads kernels, in every dtype (the
    backward in 16-bit too: both keep dz in fp32 and add its windows in the same order), with ties
    (windows sharing a first maximum) and, forward, the relu path's all-zero windows."""
    x = make_input(shape, dtype, device, "channels_last", requires_grad=False)
    x[:, :, 4:9, 2:7] = 1.0  # a constant patch: overlapping windows tie and take the same first maximum
    x[:, :2, :, :5] = -1.0  # with relu: windows of zeros (the first offset wins)
    results = []
    for cells in (True, False):
        monkeypatch.setattr(K, "_cells", lambda kernel_size, stride, cells=cells: cells)
        y, argmax = K.lrn_maxpool2d_forward(x, **STRONG, groups=2, relu=True)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(device, dtype)
        dy = dy.contiguous(memory_format=torch.channels_last)
        assert K._quads(5, 2, x, x, dy, argmax, backward=True)
        results.append((y, argmax, K.lrn_maxpool2d_backward(dy, x, argmax, **STRONG, groups=2, relu=True)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Ties, NaN, poisoned outputs


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_ties(layout, dtype, device):
    # Channels constant over the plane (every window ties: the first element wins) on the left half,
    # random on the right; a constant region across all channels at the bottom.
    x = torch.randn(2, 8, 1, 1).expand(2, 8, 11, 11).clone()
    x[..., 6:] = torch.randn(2, 8, 11, 5)
    x[:, :, 8:, :] = 0.5
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = x.to(device, dtype).contiguous(memory_format=fmt)
    _, argmax = check(x.requires_grad_(), 2, STRONG)
    assert (argmax[:, :, :3, :2] == 0).all()  # windows inside the constant columns, above the bottom rows


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's inf * 0 etc. in the interpreter
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_nan_inf(dtype, layout, device):
    # NaN spreads over the LRN window's channels at its position, then over every pool window holding it.
    x = make_input((2, 12, 9, 9), dtype, device, layout, requires_grad=False)
    x[0, 3, 4, 4] = float("nan")
    x[0, 6, 0, 0] = float("nan")  # a window corner, one window only
    x[1, 11, 2, 3] = float("inf")
    x[1, 0, 8, 8] = float("-inf")
    y, _ = check(x.requires_grad_(), 2, PAPER)
    assert torch.isnan(y[0, 3, 1:3, 1:3]).all() and torch.isnan(y[0, 6, 0, 0])


@pytest.mark.parametrize("scale", [1e18, 1e-20])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_extreme_magnitudes(scale, layout, device):
    # As kernels.lrn's (tests/test_lrn.py): up to ~1e18 the backward's mirror terms (dz_c * z_c) / s_c stay
    # normal fp32 numbers; channels_last takes the quads and cells, contiguous the per-channel path.
    x = make_input((2, 16, 9, 9), torch.float32, device, layout, scale=scale)
    check(x, 2, PAPER)
    check(x, 2, PAPER, relu=True)


def test_outputs_fully_written(device):
    """Outputs start poisoned (NaN, int8 -128; conftest sets _common.POISON): every element is written."""
    x = torch.randn(3, 13, 10, 9, device=device)
    y, argmax = K.lrn_maxpool2d_forward(x, **STRONG)
    assert not torch.isnan(y).any() and ((argmax >= 0) & (argmax < 9)).all()
    dx = K.lrn_maxpool2d_backward(torch.randn_like(y), x, argmax, **STRONG)
    assert not torch.isnan(dx).any()


# ---------------------------------------------------------------------------------------------
# Against the unfused kernels and the torch backend


# kernels/lrn.py's padded channel lanes square whatever lies past their group (results unaffected).
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_equals_unfused_kernels(layout, dtype, device):
    """Forward: bitwise the LRN kernel then the pool kernel (values and argmax). Backward: bitwise the pool
    then the LRN backward where their intermediate dz is exact (fp32, fp64); for fp16/bf16 the unfused
    path rounds dz to the dtype, the fused one keeps it in fp32."""
    x = make_input((2, 12, 11, 13), dtype, device, layout, requires_grad=False)
    cfg = dict(STRONG, groups=2)
    y, argmax = K.lrn_maxpool2d_forward(x, **cfg)
    z = L.lrn_forward(x, **cfg)
    y2, argmax2, _ = M.maxpool2d_forward(z, (3, 3), (2, 2), (0, 0), (1, 1))
    assert torch.equal(y, y2) and torch.equal(argmax, argmax2) and y.stride() == y2.stride()
    dy = torch.randn_like(y)
    dx = K.lrn_maxpool2d_backward(dy, x, argmax, **cfg)
    dz = M.maxpool2d_backward(dy, argmax2, x.shape, (3, 3), (2, 2), (0, 0), (1, 1), layout == "channels_last")
    dx2 = L.lrn_backward(dz, x, **cfg)
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(dx, dx2)
    else:
        assert_close(dx, dx2.double(), dtype, device, "grad_input")


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("groups", [1, 2])
def test_torch_backend_matches(groups, dtype, relu, device):
    x = make_input((2, 8, 11, 11), dtype, device, "channels_last")
    dy = torch.randn(2, 8, 5, 5, device=device, dtype=dtype)
    outs = {}
    for backend in ("torch", "triton"):
        with fastalex.backend(backend):
            y = F.lrn_max_pool2d(x, **STRONG, groups=groups, relu=relu)
        outs[backend] = (y, *torch.autograd.grad(y, x, dy))
    for a, b in zip(outs["triton"], outs["torch"]):
        assert_close(a, b.double(), dtype, device)
    if groups == 1:  # torch's grouped LRN is a reshape: channels_last comes out contiguous there
        assert outs["triton"][0].stride() == outs["torch"][0].stride()


# ---------------------------------------------------------------------------------------------
# Registration: gradcheck, opcheck, torch.compile; the module


def test_gradcheck(device):
    x = make_input((1, 6, 7, 7), torch.float64, device)
    with fastalex.backend("triton"):
        assert torch.autograd.gradcheck(lambda t: F.lrn_max_pool2d(t, **STRONG, groups=2), (x,), eps=1e-6,
                                        atol=1e-8, fast_mode=True)


@pytest.mark.parametrize("relu", [False, True])
def test_opcheck(relu, device):
    x = make_input((2, 6, 7, 7), torch.float32, device, "channels_last")
    a = (5, 2.0, 0.75, 1.0, 2, [3, 3], [2, 2], relu)
    torch.library.opcheck(torch.ops.fastalex.lrn_max_pool2d.default, (x, *a))
    y, argmax = torch.ops.fastalex.lrn_max_pool2d(x.detach(), *a)
    torch.library.opcheck(torch.ops.fastalex.lrn_max_pool2d_backward.default,
                          (torch.randn_like(y), x.detach(), argmax, *a))


def test_torch_compile_fullgraph(device):
    x = make_input((2, 6, 9, 9), torch.float32, device)
    fn = torch.compile(lambda t: F.lrn_max_pool2d(t, **PAPER, groups=2) * 2, backend="aot_eager", fullgraph=True)
    with fastalex.backend("triton"):
        out = fn(x)
    xr, yr, _ = reference(x, 2, PAPER, (3, 3), (2, 2))
    assert_close(out, yr * 2, torch.float32, device)
    dy = torch.randn(yr.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad(out, x, dy.to(device, torch.float32))
    (gr,) = torch.autograd.grad(yr * 2, xr, dy)
    assert_close(g, gr, torch.float32, device, "grad_input")


def test_module(device):
    m = fnn.LRNMaxPool2d(5, alpha=5e-4, beta=0.75, k=2.0, groups=2)
    # Its two layers are its children (what layer-by-layer tools such as fastalex.flops see).
    assert repr(m.lrn) == "LocalResponseNorm(5, alpha=0.0005, beta=0.75, k=2.0, groups=2)"
    assert (m.pool.kernel_size, m.pool.stride, m.pool.padding) == (3, 2, 0)
    assert not list(m.parameters()) and not m.state_dict()
    x = make_input((2, 8, 9, 9), torch.float32, device, requires_grad=False)
    with fastalex.backend("triton"):
        torch.testing.assert_close(m(x), F.lrn_max_pool2d(x, **PAPER, groups=2), rtol=0, atol=0)
    with fastalex.backend("torch"):  # torch's ops: the children, one after the other
        torch.testing.assert_close(m(x), TF.max_pool2d(m.lrn(x), 3, 2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="groups"):
        fnn.LRNMaxPool2d(5, groups=0)
    with pytest.raises(TypeError, match="relu"):
        fnn.LRNMaxPool2d(5, relu=1)
    r = fnn.LRNMaxPool2d(5, alpha=5e-4, beta=0.75, k=2.0, groups=2, relu=True)
    assert repr(r).startswith("LRNMaxPool2d(\n  relu=True") and not r.state_dict()
    with fastalex.backend("triton"):
        torch.testing.assert_close(r(x), F.lrn_max_pool2d(x, **PAPER, groups=2, relu=True), rtol=0, atol=0)
    with fastalex.backend("torch"):  # relu, then the children
        torch.testing.assert_close(r(x), TF.max_pool2d(r.lrn(torch.relu(x)), 3, 2), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"4-D \(N, C, H, W\)"):
        m(x[0])


def test_functional_exported():
    assert F.lrn_max_pool2d is fastalex.ops.lrn_maxpool2d.lrn_max_pool2d
    assert "lrn_max_pool2d" in F.__all__ and "LRNMaxPool2d" in fnn.__all__


# ---------------------------------------------------------------------------------------------
# Errors: the same for both backends, raised before any launch


BAD_ARGS = [
    (dict(input=torch.randn(6, 9, 9)), ValueError, "input"),  # 3-D
    (dict(input=torch.randn(1, 6, 2, 9, 9)), ValueError, "input"),  # 5-D
    (dict(input=[[[[1.0]]]]), TypeError, "input"),
    (dict(input=torch.ones(2, 6, 9, 9, dtype=torch.int64)), TypeError, "input"),
    (dict(size=0), ValueError, "size"),
    (dict(size=2.0), TypeError, "size"),
    (dict(alpha="1e-4"), TypeError, "alpha"),
    (dict(k=None), TypeError, "k"),
    (dict(groups=0), ValueError, "groups"),
    (dict(groups=4), ValueError, "groups"),  # 6 channels
    (dict(groups=True), ValueError, "groups"),
    (dict(input=torch.randn(2, 0, 9, 9), groups=1), ValueError, "channels"),
    (dict(kernel_size=10), ValueError, "kernel_size"),  # larger than the 9x9 plane
    (dict(kernel_size=(3, 10)), ValueError, "kernel_size"),
    (dict(kernel_size=0), ValueError, "kernel_size"),
    (dict(kernel_size="3"), TypeError, "kernel_size"),
    (dict(stride=0), ValueError, "stride"),
    (dict(stride=1.5), TypeError, "stride"),
    (dict(relu=1), TypeError, "relu"),
    (dict(relu="yes"), TypeError, "relu"),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("bad, exc, word", BAD_ARGS)
def test_errors(bad, exc, word, backend):
    args = dict(input=torch.randn(2, 6, 9, 9), size=5, alpha=1e-4, beta=0.75, k=1.0, kernel_size=3, stride=2, groups=2)
    args.update(bad)
    with fastalex.backend(backend), pytest.raises(exc, match=word):
        F.lrn_max_pool2d(**args)


def test_int32_limit_reaches_the_caller(device, monkeypatch):
    """The launchers raise only for the kernels' own limit (int32 offsets; the ops check the rest):
    it reaches the op's caller, forward and backward, naming the tensor. The limit is lowered to this
    input's size rather than building a 2**31-element tensor."""
    x = make_input((2, 6, 9, 9), torch.float32, device)
    with fastalex.backend("triton"):
        y = F.lrn_max_pool2d(x, **STRONG)
        monkeypatch.setattr(_common, "MAX_OFFSET", x.numel() - 2)
        with pytest.raises(NotImplementedError, match="^x spans 972 elements.*int32"):
            y.sum().backward()
        with pytest.raises(NotImplementedError, match="^x spans 972 elements.*int32"):
            F.lrn_max_pool2d(x, **STRONG)


# ---------------------------------------------------------------------------------------------
# GPU launch heuristics


def _is_pow2(n):
    return n >= 1 and n & (n - 1) == 0


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("C", [1, 5, 48, 96, 128, 256, 384])
@pytest.mark.parametrize("P", [1, 36, 169, 729, 3025])
def test_block_sizes_gpu(C, P, backward, monkeypatch):
    monkeypatch.setattr(_common, "is_interpreting", lambda: False)
    block_c, block_p, num_warps = K._block_sizes(C, P, backward)
    assert _is_pow2(block_c) and _is_pow2(block_p) and _is_pow2(num_warps) and num_warps <= 8
    # Elements a thread as measured with ptxas (no spills, 60-110 registers): 2 forward; backward 4
    # (_bwd_shared: 4 consecutive channels of one position a thread).
    assert block_c * block_p <= 32 * num_warps * (4 if backward else 2)
    if C in (96, 256):  # AlexNet's lrn1 / lrn2 channels tile without masking
        assert C % block_c == 0


@pytest.mark.parametrize("quads", [4, 8])
@pytest.mark.parametrize("C", [8, 24, 48, 96, 128, 256, 384])
@pytest.mark.parametrize("P", [36, 169, 729, 3025])
def test_block_sizes_gpu_quads(C, P, quads, monkeypatch):
    """The quads kernels: 4 or 8 channels a thread, every thread with its own (P >= 36)."""
    monkeypatch.setattr(_common, "is_interpreting", lambda: False)
    for cells in (False, True):
        block_c, block_p, num_warps = K._block_sizes(C, P, backward=quads == 8, quads=quads, cells=cells)
        assert _is_pow2(block_c) and _is_pow2(block_p) and _is_pow2(num_warps)
        assert num_warps <= (4 if cells else 8)  # cells: ~135 registers a thread, 3 tiles of 4 warps an SM
        assert block_c % quads == 0 and block_c * block_p == 32 * num_warps * quads
    if C in (96, 256):
        assert C % block_c == 0
