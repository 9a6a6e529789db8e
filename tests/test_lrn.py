"""fastalex local response norm (Triton kernels) against torch.nn.functional.local_response_norm in float64.

Constants: PAPER is the 2012 paper's LRN in torch's terms (size=5, alpha=5e-4, beta=0.75, k=2).
With it the window term is small next to k, so most gradient tests also use STRONG constants
(alpha=2, k=1) where the cross-channel part of the gradient is as large as the direct part.
"""

import math

import pytest
import torch
import torch.nn.functional as TF

import fastalex
from fastalex import functional as F
from fastalex import nn as fnn
from fastalex.kernels import _common
from fastalex.kernels import lrn as K
from reference import FLOAT_DTYPES, assert_close, make_input, ref_inputs

PAPER = dict(size=5, alpha=5e-4, beta=0.75, k=2.0)
STRONG = dict(size=5, alpha=2.0, beta=0.75, k=1.0)


def check(x, device, dtype=None, grad=True, **cfg):
    """Run fastalex's LRN on x (Triton backend) and compare output, layout and grad with torch in float64."""
    dtype = dtype or x.dtype
    (xr,) = ref_inputs(x)
    ref = TF.local_response_norm(xr, **cfg)
    with fastalex.backend("triton"):
        out = F.local_response_norm(x, **cfg)
    assert out.dtype == x.dtype and out.device == x.device
    assert out.stride() == ref.stride(), "output layout differs from torch's"
    assert_close(out, ref, dtype, device)
    if grad:
        dy = torch.randn(ref.shape, dtype=torch.float64)
        ref.backward(dy)
        out.backward(dy.to(device, dtype))
        assert_close(x.grad, xr.grad, dtype, device, "grad_input")
    return out


# ---------------------------------------------------------------------------------------------
# AlexNet's configurations, scaled down: (N, 96 or 48 per tower, 55, 55) and (N, 128 per tower, 27, 27)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(2, 48, 11, 9), (2, 128, 5, 5), (1, 96, 7, 6)])
def test_paper_config(shape, dtype, device):
    x = make_input(shape, dtype, device)
    check(x, device, **PAPER)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous"])
def test_paper_config_layouts(layout, dtype, device):
    x = make_input((2, 48, 7, 5), dtype, device, layout)
    check(x, device, **PAPER)


# ---------------------------------------------------------------------------------------------
# Odd sizes and constants


@pytest.mark.parametrize(
    "shape, cfg",
    [
        ((2, 1, 4, 5), STRONG),  # one channel
        ((2, 3, 4, 5), STRONG),  # fewer channels than the window
        ((2, 3, 4, 5), dict(STRONG, size=8)),  # window larger than C on both sides
        ((2, 7, 3, 4), dict(STRONG, size=1)),
        ((2, 7, 3, 4), dict(STRONG, size=2)),  # even: window [c-1, c]
        ((2, 9, 3, 4), dict(STRONG, size=4)),  # even: window [c-2, c+1]
        ((2, 9, 3, 4), dict(STRONG, size=3, beta=1.0)),  # integer beta
        ((2, 9, 3, 4), dict(STRONG, size=5, beta=0.5, k=0.5)),
        ((2, 9, 3, 4), dict(size=5)),  # torch's defaults alpha=1e-4, beta=0.75, k=1
        ((3, 10, 17), STRONG),  # 3-D (N, C, L)
        ((2, 6, 3, 4, 5), STRONG),  # 5-D (N, C, D, H, W)
        ((1, 5, 1, 1), STRONG),
        ((2, 12, 2, 3), dict(STRONG, size=11)),  # > K.MAX_UNROLL: the window loops stay loops
        ((2, 13, 5), dict(STRONG, size=10)),  # even and > K.MAX_UNROLL
    ],
)
def test_odd_configs(shape, cfg, device):
    x = make_input(shape, torch.float32, device)
    check(x, device, **cfg)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_strong(dtype, device):
    # Half inputs are computed in fp32: compare with fp64 where the cross-channel term matters.
    x = make_input((2, 20, 6, 5), dtype, device)
    check(x, device, **STRONG)


@pytest.mark.parametrize(
    "layout, shape",
    [
        ("channels_last", (2, 12, 5, 6)),
        ("noncontiguous", (2, 12, 5, 6)),
        ("noncontiguous", (2, 12, 9)),
        ("hw_swapped", (2, 12, 5, 6)),  # dense, but H and W cannot merge: the copy path
        ("channels_last_3d", (2, 6, 3, 4, 5)),
    ],
)
def test_layouts(layout, shape, device):
    if layout == "hw_swapped":
        x = torch.randn(shape[:2] + shape[2:][::-1], device=device).transpose(2, 3).requires_grad_()
    elif layout == "channels_last_3d":
        x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    else:
        x = make_input(shape, torch.float32, device, layout)
    out = check(x, device, **STRONG)
    if layout in ("channels_last", "hw_swapped", "channels_last_3d"):
        assert out.stride() == x.stride()


def test_small_blocks(device, monkeypatch):
    """Many programs: channel blocks with halos from neighbouring blocks, ragged last blocks."""
    monkeypatch.setattr(K, "_block_sizes", lambda C, S, backward=False: (8, 8, 4))
    for layout in ("contiguous", "channels_last"):  # 2 samples x 2 channel blocks x 2 position blocks
        x = make_input((2, 13, 3, 5), torch.float32, device, layout)
        check(x, device, **dict(STRONG, size=4))


def test_loop_path_paper(device, monkeypatch):
    # AlexNet's size 5 through the non-unrolled loops too.
    monkeypatch.setattr(K, "MAX_UNROLL", 0)
    check(make_input((2, 16, 3, 4), torch.float32, device), device, **dict(STRONG, size=5))


def test_expanded_grad(device):
    # grad of .sum() arrives as an expanded tensor with zero strides: read in place.
    x = make_input((2, 8, 3, 4), torch.float64, device)
    with fastalex.backend("triton"):
        F.local_response_norm(x, **STRONG).sum().backward()
    (xr,) = ref_inputs(x)
    TF.local_response_norm(xr, **STRONG).sum().backward()
    assert_close(x.grad, xr.grad, torch.float64, device, "grad_input")


@pytest.mark.parametrize("shape", [(0, 8, 5, 5), (2, 0, 3, 3), (2, 4, 0, 3), (0, 3, 4)])
def test_empty(shape, device):
    x = torch.randn(shape, device=device, requires_grad=True)
    with fastalex.backend("triton"):
        out = F.local_response_norm(x, 5)
    assert out.shape == x.shape and out.dtype == x.dtype
    out.sum().backward()
    assert x.grad.shape == x.shape


# ---------------------------------------------------------------------------------------------
# Special values: NaN, inf, large and tiny inputs, non-positive scales


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's inf * 0 etc. in the interpreter
@pytest.mark.parametrize("dtype, cfg", [(torch.float32, PAPER), (torch.float64, PAPER), (torch.float64, STRONG),
                                        (torch.float64, dict(PAPER, beta=0.0))])
def test_nan_inf(dtype, cfg, device):
    x = make_input((2, 16, 4, 5), dtype, device, requires_grad=False)
    x[0, 3, 1, 2] = float("nan")
    x[0, 9, 0, 0] = float("inf")
    x[1, 0, 2, 3] = float("-inf")
    x[1, 15, 3, 4] = float("inf")
    x.requires_grad_()
    check(x, device, **cfg)


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e15), (torch.float32, 1e18), (torch.float32, 1e-20),
                                          (torch.float16, 3e3), (torch.bfloat16, 1e15), (torch.float64, 1e100)])
def test_extreme_magnitudes(dtype, scale, device):
    # fp16 squares overflow fp16 (and torch's own fp16 LRN): the kernels square in fp32. 1e18: the
    # backward's mirror terms (dy_c * y_c) / s_c, ~x^-2.5, still normal fp32 numbers (kernels.lrn).
    x = make_input((2, 16, 4, 5), dtype, device, scale=scale)
    check(x, device, **PAPER)


@pytest.mark.parametrize(
    "cfg, grad",
    [
        (dict(size=3, alpha=1e-4, beta=0.75, k=-1.0), False),  # negative base, fractional beta: NaN
        (dict(size=3, alpha=1e-4, beta=1.0, k=-1.0), True),  # odd integer beta: finite
        (dict(size=3, alpha=1e-4, beta=2.0, k=-1.0), True),  # even integer beta
        (dict(size=3, alpha=1.0, beta=0.0, k=0.0), False),  # beta=0: identity
        (dict(size=3, alpha=1.0, beta=-0.5, k=1.0), True),  # negative beta
    ],
)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's log2(0) and 0 * inf in the interpreter
def test_nonpositive_scale_and_odd_beta(cfg, grad, device):
    x = make_input((2, 6, 3, 4), torch.float64, device)
    check(x, device, grad=grad, **cfg)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_zero_scale_like_torch(device):
    # k=0 and an all-zero window: torch computes 0 / 0**beta = NaN; so do the kernels.
    x = make_input((1, 4, 2, 3), torch.float32, device, requires_grad=False)
    x[0, :, 0, 0] = 0.0
    check(x, device, grad=False, size=3, alpha=1.0, beta=0.75, k=0.0)


# ---------------------------------------------------------------------------------------------
# Gradients in float64, custom-op registration, torch.compile


@pytest.mark.parametrize(
    "shape, cfg, fast",
    [
        ((1, 5, 3), STRONG, False),  # full Jacobian: every (input, output) pair
        ((2, 6, 2, 2), dict(STRONG, size=4, beta=0.6), True),  # random projections (fewer interpreter runs)
        ((2, 3, 2, 1), dict(size=2, alpha=0.7, beta=1.3, k=0.4), True),
    ],
)
def test_gradcheck(shape, cfg, fast, device):
    x = make_input(shape, torch.float64, device)
    with fastalex.backend("triton"):
        assert torch.autograd.gradcheck(lambda t: F.local_response_norm(t, **cfg), (x,), eps=1e-6, atol=1e-8,
                                        fast_mode=fast)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout, device):
    x = make_input((2, 6, 3, 4), torch.float32, device, layout)
    a = (5, 2.0, 0.75, 1.0)
    torch.library.opcheck(torch.ops.fastalex.local_response_norm.default, (x, *a))
    dy = make_input((2, 6, 3, 4), torch.float32, device, requires_grad=False)
    torch.library.opcheck(torch.ops.fastalex.local_response_norm_backward.default, (dy, x.detach(), *a))


def test_torch_compile_fullgraph(device):
    x = make_input((2, 10, 4, 3), torch.float32, device)
    fn = torch.compile(lambda t: F.local_response_norm(t, **STRONG) * 2, backend="aot_eager", fullgraph=True)
    with fastalex.backend("triton"):
        out = fn(x)
    (xr,) = ref_inputs(x)
    ref = TF.local_response_norm(xr, **STRONG) * 2
    assert_close(out, ref, torch.float32, device)
    dy = torch.randn(ref.shape, dtype=torch.float64)
    out.backward(dy.to(device, torch.float32))
    ref.backward(dy)
    assert_close(x.grad, xr.grad, torch.float32, device, "grad_input")


def test_export(device):
    class M(torch.nn.Module):
        def forward(self, t):
            return F.local_response_norm(t, **PAPER)

    x = make_input((2, 10, 4, 3), torch.float32, device, requires_grad=False)
    with fastalex.backend("triton"):
        ep = torch.export.export(M(), (x,))
    assert "fastalex.local_response_norm" in str(ep.graph)
    assert_close(ep.module()(x), TF.local_response_norm(x.double().cpu(), **PAPER), torch.float32, device)


# ---------------------------------------------------------------------------------------------
# Module, backends, launch heuristics


def test_module_matches_torch(device):
    ours = fnn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
    theirs = torch.nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
    assert repr(ours) == repr(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = make_input((2, 48, 6, 5), torch.float32, device)
    with fastalex.backend("triton"):
        out = ours(x)
    (xr,) = ref_inputs(x)
    assert_close(out, theirs(xr), torch.float32, device)


def test_backend_switch(device, monkeypatch):
    calls = []
    real = K.lrn_forward
    monkeypatch.setattr(K, "lrn_forward", lambda *a: calls.append(a) or real(*a))
    x = make_input((2, 8, 4, 4), torch.float32, device, requires_grad=False)
    with fastalex.backend("torch"):
        out = F.local_response_norm(x, **PAPER)
    assert not calls
    assert torch.equal(out, TF.local_response_norm(x, **PAPER))
    with fastalex.backend("triton"):
        out = F.local_response_norm(x, **PAPER)
    assert len(calls) == 1
    assert_close(out, TF.local_response_norm(x.double(), **PAPER), torch.float32, device)


def test_functional_exported():
    assert F.local_response_norm is fastalex.ops.lrn.local_response_norm


def _is_pow2(n):
    return n >= 1 and n & (n - 1) == 0


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("C", [1, 3, 5, 48, 64, 96, 128, 200, 256, 384])
@pytest.mark.parametrize("S", [1, 7, 169, 729, 3025])
def test_block_sizes_gpu(C, S, backward, monkeypatch):
    monkeypatch.setattr(_common, "is_interpreting", lambda: False)
    block_c, block_s, num_warps = K._block_sizes(C, S, backward)
    assert _is_pow2(block_c) and _is_pow2(block_s) and _is_pow2(num_warps) and num_warps <= 8
    assert block_c <= 64 and block_c * block_s <= (1024 if backward else 2048)
    # Elements a thread: few enough that the backward's many loads do not spill registers.
    assert block_c * block_s // (32 * num_warps) <= (4 if backward else 8)
    assert block_s <= _common.next_pow2(S) and block_c <= _common.next_pow2(C)
    if C in (48, 96, 128):  # AlexNet's per-tower and full channel counts tile without masking
        assert C % block_c == 0


def test_block_sizes_interpreter(monkeypatch):
    monkeypatch.setattr(_common, "is_interpreting", lambda: True)
    block_c, block_s, _ = K._block_sizes(96, 3025)
    assert _is_pow2(block_c) and _is_pow2(block_s) and block_c * block_s <= 2**16


# ---------------------------------------------------------------------------------------------
# Errors: the same for both backends


BAD_ARGS = [
    (dict(input=torch.randn(4, 5)), ValueError, "input"),
    (dict(input=torch.randn(5)), ValueError, "input"),
    (dict(input=[[[1.0]]]), TypeError, "input"),
    (dict(input=torch.ones(2, 3, 4, dtype=torch.int64)), TypeError, "input"),
    (dict(input=torch.ones(2, 3, 4, dtype=torch.bool)), TypeError, "input"),
    (dict(input=torch.ones(2, 3, 4, dtype=torch.complex64)), TypeError, "input"),
    (dict(size=0), ValueError, "size"),
    (dict(size=-3), ValueError, "size"),
    (dict(size=2.0), TypeError, "size"),
    (dict(size=True), TypeError, "size"),
    (dict(size="5"), TypeError, "size"),
    (dict(alpha="1e-4"), TypeError, "alpha"),
    (dict(alpha=None), TypeError, "alpha"),
    (dict(beta=True), TypeError, "beta"),
    (dict(k=torch.tensor(1.0)), TypeError, "k"),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("bad, exc, word", BAD_ARGS)
def test_errors(bad, exc, word, backend):
    args = dict(input=torch.randn(2, 6, 3), size=5, alpha=1e-4, beta=0.75, k=1.0)
    args.update(bad)
    with fastalex.backend(backend), pytest.raises(exc, match=word):
        F.local_response_norm(**args)


def test_int32_limit_reaches_the_caller(device, monkeypatch):
    """The launchers raise only for the kernels' own limit (int32 offsets; the ops check the rest):
    it reaches the op's caller, forward and backward, naming the tensor. The limit is lowered to this
    input's size rather than building a 2**31-element tensor."""
    x = make_input((2, 6, 3), torch.float32, device)
    with fastalex.backend("triton"):
        y = F.local_response_norm(x, 5)
        monkeypatch.setattr(_common, "MAX_OFFSET", x.numel() - 2)
        with pytest.raises(NotImplementedError, match="^x spans 36 elements.*int32"):
            y.sum().backward()
        with pytest.raises(NotImplementedError, match="^x spans 36 elements.*int32"):
            F.local_response_norm(x, 5)


def test_neg_sign():
    assert math.isnan(K._neg_sign(-0.75)) and math.isnan(K._neg_sign(float("nan")))
    assert K._neg_sign(-1.0) == -1.0 and K._neg_sign(-2.0) == 1.0 and K._neg_sign(3.0) == -1.0
    assert K._neg_sign(0.0) == 1.0 and K._neg_sign(float("-inf")) == 1.0


# ---------------------------------------------------------------------------------------------
# groups: the paper's per-tower LRN in one pass (the window never crosses into another tower)


def _grouped_ref(xr, groups, **cfg):
    """torch's LRN on each group of channels alone: (N, C, *) -> (N*g, C/g, *) and back, in float64."""
    n, c = xr.shape[:2]
    return TF.local_response_norm(xr.reshape(n * groups, c // groups, *xr.shape[2:]), **cfg).reshape(xr.shape)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape, groups, layout, cfg", [
    ((2, 96, 9, 7), 2, "channels_last", PAPER),     # lrn1 of the two-tower net, scaled down
    ((3, 256, 5, 5), 2, "channels_last", STRONG),   # lrn2
    ((2, 15, 4, 3), 3, "contiguous", dict(size=4, alpha=1.5, beta=0.6, k=0.5)),  # odd groups, even window
    ((1, 10, 3, 5), 5, "noncontiguous", dict(size=7, alpha=1.0, beta=0.75, k=1.0)),  # window > group
    ((2, 8, 13), 2, "contiguous", STRONG),         # 3-D (N, C, L)
])
def test_groups_match_torch_per_group(shape, groups, layout, cfg, dtype, device):
    x = make_input(shape, dtype, device, layout)
    (xr,) = ref_inputs(x)
    ref = _grouped_ref(xr, groups, **cfg)
    with fastalex.backend("triton"):
        out = F.local_response_norm(x, **cfg, groups=groups)
    if layout == "channels_last":  # kept: the model's later layers run their channels_last kernels
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, ref, dtype, device)
    dy = torch.randn(ref.shape, dtype=torch.float64)
    ref.backward(dy)
    out.backward(dy.to(device, dtype))
    assert_close(x.grad, xr.grad, dtype, device, "grad_input")


def test_groups_poisoned_outputs_fully_written(device):
    x = make_input((2, 12, 5, 7), torch.float32, device, "channels_last", requires_grad=False)
    assert _common.POISON  # outputs start as NaN: any element a kernel skips fails the comparison
    y = K.lrn_forward(x, groups=3, **STRONG)
    dx = K.lrn_backward(torch.ones_like(x), x, groups=3, **STRONG)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()


def test_groups_module_and_errors(device):
    m = fnn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0, groups=2)
    x = make_input((2, 96, 4, 4), torch.float32, device, "channels_last")
    (xr,) = ref_inputs(x)
    with fastalex.backend("triton"):
        out = m(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, _grouped_ref(xr, 2, **PAPER), torch.float32, device)
    with fastalex.backend("torch"):  # torch's ops: the reshape
        assert_close(m(x), _grouped_ref(xr, 2, **PAPER), torch.float32, device)
    with pytest.raises(ValueError, match="not divisible by groups=5"):
        F.local_response_norm(x, 5, groups=5)
    with pytest.raises(ValueError, match="groups must be a positive int"):
        F.local_response_norm(x, 5, groups=0)


def test_groups_opcheck(device):
    x = make_input((2, 6, 3, 4), torch.float32, device, "channels_last")
    a = (3, 2.0, 0.75, 1.0, 2)
    torch.library.opcheck(torch.ops.fastalex.local_response_norm.default, (x, *a))
    dy = make_input((2, 6, 3, 4), torch.float32, device, requires_grad=False)
    torch.library.opcheck(torch.ops.fastalex.local_response_norm_backward.default, (dy, x.detach(), *a))
