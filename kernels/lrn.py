"""Local response normalization across channels: one Triton pass forward, one backward.

Semantics are torch.nn.functional.local_response_norm(x, size, alpha, beta, k) for x of shape
(N, C, *): with the window W(c) = [c - size//2, c + (size-1)//2] (channels outside [0, C) count 0;
with `groups`, channels outside c's group of C/groups channels count 0, as in the paper's towers),

    s_c = k + alpha/size * sum_{j in W(c)} x_j^2,        y_c = x_c * s_c^(-beta).

The gradient, with M(i) = {c : i in W(c)} = [i - (size-1)//2, i + size//2] (the mirror window):

    dx_i = dy_i * s_i^(-beta) - 2*beta*alpha/size * x_i * sum_{c in M(i)} (dy_c * y_c) / s_c.

The backward recomputes every s_c from x ((size + 1) * size shifted loads per tile, nearly all
cache hits), so nothing but x is saved between the passes. x_i multiplies the window's sum, not each
term: a term depends on c alone, so a kernel that computes each c once for several inputs (the fused
LRN + max-pool's backward) adds it to each of their sums with one addition. (dy_c * y_c) / s_c falls
as x^-2.5, and stays a normal fp32 number for inputs up to ~1e18 (x^2 overflows at ~1.8e19, as in
torch's own fp32 computation).

Every tensor is handled as a 3-D view (N, C, S), S = product of the trailing dims, with explicit
strides: contiguous, channels_last(_3d) and most strided tensors need no copy (layouts whose
trailing dims cannot merge, e.g. H and W swapped in memory, go through a contiguous copy).

Deterministic: every output element is computed by one program, its window summed in a fixed order;
no atomics, so the same inputs give bit-identical results forward and backward.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastalex.kernels import _common
from fastalex.kernels._common import cdiv

try:  # (Triton >= 3.0; the interpreter cannot run library calls, so it never takes them)
    from triton.language.extra import libdevice as _libdevice
except ImportError:  # pragma: no cover
    _libdevice = None

# On a GPU the fp32 power takes the hardware log2 (MUFU.LG2, lg2.approx: absolute error < 2^-22 in
# log2 s, so s^e is within a few ulps) instead of libdevice's accurate log2f, a ~30-instruction
# polynomial that made every LRN kernel instruction-bound (perf/NOTES.md), and the backward's x / s
# the hardware reciprocal (_div). exp2 is already MUFU.EX2. The interpreter, which cannot call
# libdevice, keeps tl.log2 and /.
FAST_MATH: tl.constexpr = tl.constexpr(_libdevice is not None and not _common.is_interpreting())

# Windows up to this size are unrolled (the backward then holds SIZE^2 + SIZE loads); larger ones
# (rare: AlexNet, GoogLeNet and Caffe use 5) run as loops so compile time does not grow with SIZE^2.
MAX_UNROLL = 9


@triton.jit
def _relu(v, RELU: tl.constexpr):
    """torch.relu(v) where RELU (0 for v < 0; NaN stays NaN, as there), else v: one max.NaN instruction
    on a GPU (a compare and select cost the fused LRN + pool forward 27% more, this 13%; perf.static)."""
    if RELU:
        return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
    else:
        return v


@triton.jit
def _sq(base, j, s_off, s_mask, lo, hi, stride_c, ACC: tl.constexpr, RELU: tl.constexpr):
    """x[j]^2 (relu(x[j])^2 where RELU) in the accumulator dtype, 0 for channels j outside the group [lo, hi)."""
    v = _relu(tl.load(base + j * stride_c + s_off, mask=(j >= lo) & (j < hi) & s_mask, other=0.0).to(ACC), RELU)
    return v * v


@triton.jit
def _window_sumsq(base, c, s_off, s_mask, lo, hi, stride_c, first, SIZE: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr, UNROLL: tl.constexpr,
                  RELU: tl.constexpr):
    """sum_{d < SIZE} x[c + first + d]^2, zero outside the group [lo, hi), for a [BLOCK_C, BLOCK_S] tile
    (of relu(x) where RELU: kernels/lrn_maxpool2d.py's input ReLU).

    base: pointer to sample n; c: [BLOCK_C, 1] channel ids; s_off: [1, BLOCK_S] position offsets.
    The shifted loads overlap from one d to the next, so all but one row of them hit cache.
    """
    acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    if UNROLL:
        for d in tl.static_range(SIZE):
            acc += _sq(base, c + (first + d), s_off, s_mask, lo, hi, stride_c, ACC, RELU)
    else:  # a loop, not SIZE copies: compile time stays flat for large windows
        for d in range(SIZE):
            acc += _sq(base, c + (first + d), s_off, s_mask, lo, hi, stride_c, ACC, RELU)
    return acc


@triton.jit
def _pow(s, e, neg_sign, SIMPLE: tl.constexpr):
    """s ** e with C pow's special cases (as torch.pow): s ** 0 = 1 (even NaN), 0 ** e>0 = 0,
    0 ** e<0 = inf, inf ** e>0 = inf, inf ** e<0 = 0, NaN propagates, and s < 0 gives
    |s| ** e * neg_sign, where neg_sign is NaN (e not an integer), 1 (e even) or -1 (e odd).

    SIMPLE (simple_pow: k > 0, alpha >= 0, beta != 0, so s = k + alpha/size * sum x^2 is positive,
    +inf or NaN, and e != 0): none of the special cases can arise; the same value without the tests."""
    if SIMPLE:
        a = s
    else:
        a = tl.abs(s)
    if FAST_MATH and s.dtype == tl.float32:
        mag = tl.exp2(e * _libdevice.fast_log2f(a))
    else:
        mag = tl.exp2(e * tl.log2(a))
    if SIMPLE:
        return mag
    else:
        mag = tl.where(e == 0, 1.0, mag)
        return tl.where(s < 0, mag * neg_sign, mag)


@triton.jit
def _div(x, s):
    """x / s for the backward's (dy_c * y_c) / s_c. On a GPU in fp32 the hardware reciprocal (div.approx: within
    2 ulp, IEEE's special cases for 0, inf and NaN, but 0 for |s| in [2^126, 2^128), where x^2 has
    nearly overflowed) instead of div.full's range tests and scaling around it (~7 instructions a
    term). Both LRN backwards take it, so the fused kernel stays bitwise the unfused one."""
    if FAST_MATH and x.dtype == tl.float32:
        return _libdevice.fast_dividef(x, s)
    else:
        return x / s


@triton.jit
def _scalar(v, ACC: tl.constexpr):
    """A float argument as a [1, 1] tensor of the accumulator dtype.

    Float arguments are declared fp64 (else Triton passes them as fp32, too coarse for fp64
    inputs) and rounded here once; the interpreter passes them as Python floats, hence the add.
    """
    return (tl.zeros([1, 1], ACC) + v).to(ACC)


@triton.jit
def _tile(N, C, S, CG, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """This program's sample n, channel ids [BLOCK_C, 1], positions [1, BLOCK_S], their masks, and
    each channel's group [lo, hi) of CG channels (CG = C without groups).

    One flat grid axis (axis 1 and 2 are limited to 65535 programs): positions fastest, then
    channel blocks, then samples.
    """
    pid = tl.program_id(0)
    num_s = tl.cdiv(S, BLOCK_S)
    num_c = tl.cdiv(C, BLOCK_C)
    pid_s = pid % num_s
    pid_c = (pid // num_s) % num_c
    n = pid // (num_s * num_c)
    c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C))[:, None]
    s = (pid_s * BLOCK_S + tl.arange(0, BLOCK_S))[None, :]
    lo = (c // CG) * CG
    # hi clipped to C: the padded lanes past C (c >= C) would otherwise get a group beyond the sample
    # and load past it (past the tensor for the last sample), masked for nothing.
    return n, c, s, c < C, s < S, lo, tl.minimum(lo + CG, C)


@triton.jit
def _lrn_fwd_kernel(
    x_ptr,  # (N, C, S) input, strides sx_*
    y_ptr,  # (N, C, S) output, strides sy_*
    N, C, S, CG,  # CG: channels per group (no window leaves its group); C without groups
    sx_n, sx_c, sx_s,
    sy_n, sy_c, sy_s,
    alpha_over_size: tl.float64, beta: tl.float64, k: tl.float64,
    neg_sign: tl.float64,  # see _pow
    SIZE: tl.constexpr,  # window length (any >= 1)
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ACC: tl.constexpr,  # accumulator dtype: fp32, or fp64 for fp64 inputs
    UNROLL: tl.constexpr,  # unroll the window loops (small SIZE) or keep them loops
    SIMPLE_POW: tl.constexpr,  # see _pow
):
    n, c, s, c_mask, s_mask, lo, hi = _tile(N, C, S, CG, BLOCK_C, BLOCK_S)
    mask = c_mask & s_mask
    a = _scalar(alpha_over_size, ACC)
    neg_beta = -_scalar(beta, ACC)
    k_ = _scalar(k, ACC)
    sign = _scalar(neg_sign, ACC)
    x_base = x_ptr + n * sx_n
    sumsq = _window_sumsq(x_base, c, s * sx_s, s_mask, lo, hi, sx_c, -(SIZE // 2), SIZE, BLOCK_C, BLOCK_S, ACC, UNROLL,
                          False)
    scale = k_ + a * sumsq
    x = tl.load(x_base + c * sx_c + s * sx_s, mask=mask, other=0.0).to(ACC)
    y = x * _pow(scale, neg_beta, sign, SIMPLE_POW)
    tl.store(y_ptr + n * sy_n + c * sy_c + s * sy_s, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mirror_term(x_base, dy_base, c, x_soff, dy_soff, s_mask, lo, hi, sx_c, sd_c, off, a, k_, neg_beta, sign,
                 SIZE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
                 UNROLL: tl.constexpr, SIMPLE_POW: tl.constexpr):
    """(dy_cc * y_cc) / s_cc for the output channels cc = c + off, 0 where cc is outside c's group
    [lo, hi) (an output of another group never sees x_c; one in the group has its window there too)."""
    cc = c + off
    valid = (cc >= lo) & (cc < hi) & s_mask
    x_c = tl.load(x_base + cc * sx_c + x_soff, mask=valid, other=0.0).to(ACC)
    dy_c = tl.load(dy_base + cc * sd_c + dy_soff, mask=valid, other=0.0).to(ACC)
    s_c = k_ + a * _window_sumsq(x_base, c, x_soff, s_mask, lo, hi, sx_c, off - SIZE // 2, SIZE,
                                 BLOCK_C, BLOCK_S, ACC, UNROLL, False)
    term = _div(dy_c * (x_c * _pow(s_c, neg_beta, sign, SIMPLE_POW)), s_c)
    # Channels outside the group are not outputs here: drop them (their s_c may be 0 when k = 0).
    return tl.where(valid, term, 0.0)


@triton.jit
def _cross(x_i, acc, a, neg_beta, SIMPLE_POW: tl.constexpr):
    """dx_i's window term, -2 beta alpha/size * x_i * acc (acc: the sum of x_i's mirror terms). With
    beta = 0 (never SIMPLE_POW) there is no window gradient: torch's pow backward gives exactly 0, then
    0 * x_i, so only a non-finite x_i itself gets NaN; acc's NaN (inf/inf) must not leak in."""
    cross = (2.0 * neg_beta * a) * (x_i * acc)
    if not SIMPLE_POW:
        cross = tl.where(neg_beta == 0, x_i * 0.0, cross)
    return cross


@triton.jit
def _lrn_bwd_kernel(
    dy_ptr,  # (N, C, S) output gradient, strides sd_*
    x_ptr,  # (N, C, S) forward input, strides sx_*
    dx_ptr,  # (N, C, S) input gradient (written), strides sg_*
    N, C, S, CG,
    sd_n, sd_c, sd_s,
    sx_n, sx_c, sx_s,
    sg_n, sg_c, sg_s,
    alpha_over_size: tl.float64, beta: tl.float64, k: tl.float64,
    neg_sign: tl.float64,  # see _pow
    SIZE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ACC: tl.constexpr, UNROLL: tl.constexpr,
    SIMPLE_POW: tl.constexpr,  # see _pow
):
    n, c, s, c_mask, s_mask, lo, hi = _tile(N, C, S, CG, BLOCK_C, BLOCK_S)
    mask = c_mask & s_mask
    a = _scalar(alpha_over_size, ACC)
    neg_beta = -_scalar(beta, ACC)
    k_ = _scalar(k, ACC)
    sign = _scalar(neg_sign, ACC)
    x_base = x_ptr + n * sx_n
    dy_base = dy_ptr + n * sd_n
    x_soff = s * sx_s
    x_i = tl.load(x_base + c * sx_c + x_soff, mask=mask, other=0.0).to(ACC)
    dy_i = tl.load(dy_base + c * sd_c + s * sd_s, mask=mask, other=0.0).to(ACC)

    # Channel i's own scale, for the direct term dy_i * s_i^(-beta).
    s_i = k_ + a * _window_sumsq(x_base, c, x_soff, s_mask, lo, hi, sx_c, -(SIZE // 2), SIZE,
                                 BLOCK_C, BLOCK_S, ACC, UNROLL, False)
    r_i = _pow(s_i, neg_beta, sign, SIMPLE_POW)
    # The outputs c = i + off in M(i), whose window contains i; each needs its own window sum
    # (the c = i term recomputes s_i: SIZE + 1 window sums in all, for one uniform loop).
    acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    if UNROLL:
        for m in tl.static_range(SIZE):
            acc += _mirror_term(x_base, dy_base, c, x_soff, s * sd_s, s_mask, lo, hi, sx_c, sd_c,
                                m - (SIZE - 1) // 2, a, k_, neg_beta, sign, SIZE, BLOCK_C, BLOCK_S, ACC, UNROLL,
                                SIMPLE_POW)
    else:
        for m in range(SIZE):
            acc += _mirror_term(x_base, dy_base, c, x_soff, s * sd_s, s_mask, lo, hi, sx_c, sd_c,
                                m - (SIZE - 1) // 2, a, k_, neg_beta, sign, SIZE, BLOCK_C, BLOCK_S, ACC, UNROLL,
                                SIMPLE_POW)
    dx = dy_i * r_i + _cross(x_i, acc, a, neg_beta, SIMPLE_POW)
    tl.store(dx_ptr + n * sg_n + c * sg_c + s * sg_s, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers


def _channel_block(C: int) -> int:
    """Channels a tile on a GPU: at most 64, halved while the padded last channel block would waste
    more than 1/8 of the work (C = 48 -> 16, C = 96 -> 32, C = 128 -> 64)."""
    block_c = min(_common.next_pow2(C), 64)
    while block_c > 8 and cdiv(C, block_c) * block_c - C > C // 8:
        block_c //= 2
    return block_c


def _block_sizes(C: int, S: int, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_S, num_warps): powers of two (tl.arange needs them)."""
    if _common.is_interpreting():
        # The interpreter's cost is per program: as few, large tiles as possible.
        block_c = min(_common.next_pow2(C), 256)
        block_s = min(_common.next_pow2(S), max(2**16 // block_c, 1))
        return block_c, block_s, 4
    block_c = _channel_block(C)
    # Tile and elements per thread from ptxas's register counts on sm_90 (size 5): forward 8 a
    # thread ~60 registers; backward (SIZE^2 + SIZE loads in flight) 4 a thread ~125 registers,
    # 8 a thread ~210, 16 a thread spills.
    tile, per_thread = (1024, 4) if backward else (2048, 8)
    block_s = min(_common.next_pow2(S), max(tile // block_c, 16))
    num_warps = max(1, min(8, block_c * block_s // (32 * per_thread)))
    return block_c, block_s, num_warps


def _view3d(t: torch.Tensor) -> torch.Tensor | None:
    """t as (N, C, S) without a copy, or None where the trailing dims cannot merge (e.g. H and W
    swapped in memory) or the strided extent exceeds the kernels' int32 offsets."""
    try:
        v = t.view(t.shape[0], t.shape[1], -1)
    except RuntimeError:
        return None
    return v if _common.max_offset(v) <= _common.MAX_OFFSET else None


def _input3d(t: torch.Tensor) -> torch.Tensor:
    # The rare layouts _view3d rejects are copied to a contiguous tensor (reshape copies).
    v = _view3d(t)
    return v if v is not None else t.reshape(t.shape[0], t.shape[1], -1).contiguous()


def simple_pow(size: int, alpha: float, beta: float, k: float) -> bool:
    """Whether s^(-beta) can take _pow's plain form: s = k + alpha/size * sum x^2 > 0 (or +inf/NaN from
    the input), and -beta != 0."""
    a, b, k = float(alpha) / size, float(beta), float(k)
    return all(math.isfinite(v) for v in (a, b, k)) and k > 0 and a >= 0 and b != 0


def _neg_sign(e: float) -> float:
    """(-t) ** e / t ** e for t > 0, as C's pow has it: NaN unless e is an integer (see _pow)."""
    if math.isinf(e):
        return 1.0
    if math.isnan(e) or e != math.floor(e):
        return math.nan
    return -1.0 if e % 2 == 1 else 1.0


def _assert_args(x: torch.Tensor, size: int, groups: int) -> None:
    """The launchers' preconditions (fastalex.ops.lrn checks them for users and raises), and the
    int32 limit (raised)."""
    assert _common.takes(x) and x.dim() >= 3, "x: a float tensor (N, C, *)"
    assert isinstance(size, int) and size >= 1, f"size={size!r}"
    assert isinstance(groups, int) and groups >= 1 and x.shape[1] % groups == 0, f"groups={groups!r}"
    # Layouts the kernels' int32 offsets cannot reach are copied (_input3d): the limit is the element count.
    _common.check_int32("x", x.shape)


def _launch(kernel, out: torch.Tensor, tensors, size, alpha, beta, k, groups: int, backward: bool) -> torch.Tensor:
    """Run `kernel` over (N, C, S) views of `tensors`, writing `out` (allocated like the input)."""
    N, C = out.shape[0], out.shape[1]
    if out.numel() == 0:
        return out
    views = [_input3d(t) for t in tensors]
    out3 = _view3d(out)
    # An output whose layout does not flatten is written through a contiguous buffer.
    target = out3 if out3 is not None else _common.empty(views[0].shape, dtype=out.dtype, device=out.device)
    S = target.shape[2]
    block_c, block_s, num_warps = _block_sizes(C, S, backward)
    assert block_c & (block_c - 1) == 0 and block_s & (block_s - 1) == 0
    grid = (N * cdiv(C, block_c) * cdiv(S, block_s),)
    strides = [st for v in (*views, target) for st in v.stride()]
    kernel[grid](
        *views, target, N, C, S, C // groups, *strides,
        float(alpha) / size, float(beta), float(k), _neg_sign(-float(beta)),
        SIZE=size, BLOCK_C=block_c, BLOCK_S=block_s, ACC=_common.acc_dtype(out.dtype),
        UNROLL=size <= MAX_UNROLL, SIMPLE_POW=simple_pow(size, alpha, beta, k), num_warps=num_warps,
    )
    if out3 is None:
        out.copy_(target.view(out.shape))
    return out


def lrn_forward(x: torch.Tensor, size: int, alpha: float, beta: float, k: float, groups: int = 1) -> torch.Tensor:
    """y = local_response_norm(x, size, alpha, beta, k), each of `groups` equal channel blocks on its
    own (the paper's towers). x: (N, C, *) float, C divisible by groups; y: like x (same strides as
    torch.empty_like(x): channels_last stays channels_last, no copy for the groups)."""
    _assert_args(x, size, groups)
    y = _common.empty_like(x)
    return _launch(_lrn_fwd_kernel, y, (x,), size, alpha, beta, k, groups, backward=False)


def lrn_backward(dy: torch.Tensor, x: torch.Tensor, size: int, alpha: float, beta: float, k: float,
                 groups: int = 1) -> torch.Tensor:
    """dx of lrn_forward. dy, x: (N, C, *) of one shape, dtype and device; dx: like x."""
    _assert_args(x, size, groups)
    assert _common.takes(dy) and _common.same(x, dy) and dy.shape == x.shape, "dy: x's shape, dtype and device"
    dx = _common.empty_like(x)
    return _launch(_lrn_bwd_kernel, dx, (dy, x), size, alpha, beta, k, groups, backward=True)
