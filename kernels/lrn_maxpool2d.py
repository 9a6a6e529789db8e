"""Local response norm then max-pool, fused: one Triton pass forward, one backward.

AlexNet runs conv -> ReLU -> LRN -> 3x3/2 max-pool twice, on its largest activations. Run apart, the
LRN writes its full-size output and the pool reads it back (and the backward writes and reads the
full-size pool gradient). Fused, the forward reads x once and writes only the pooled y plus a
1-byte argmax; the backward reads x, dy and the argmax and writes dx.

Semantics: y = max_pool2d(lrn(x)) with lrn as kernels/lrn.py (torch's local_response_norm with size,
alpha, beta, k; with `groups`, the channel window clipped to each of `groups` equal channel blocks)
and a max-pool of kernel (KH, KW), stride (SH, SW), no padding, no dilation, floor mode. The LRN value
of every window tap is rounded to y's dtype before the compare, so values AND argmax are those of
lrn_forward followed by maxpool2d_forward (bit for bit in the interpreter): ties keep the first
maximum, the last NaN wins (`take = (v > best) | (v != v)`, as torch). argmax holds the window
offset kh * KW + kw (int8).

Forward: one tile of [BLOCK_C channels, BLOCK_P pooled positions] per program; each of the KH * KW
taps recomputes its LRN value (SIZE shifted loads, nearly all cache hits, and one pow). Overlapping
windows (3x3/2) recompute each input's LRN 2.25 times on average: cheap next to writing and
re-reading the LRN output (4 B an element for fp32), and the kernel stays one pass of plain loads.

Backward, with z = lrn(x) and dz the pool gradient routed to z (dz = 0 except at argmax positions):

    dx_i = dz_i * s_i^(-beta) - 2*beta*alpha/size * sum_{c in M(i)} (x_i / s_c) * (dz_c * z_c)

(kernels/lrn.py's formula and structure; M(i) the mirror window). One tile of [BLOCK_C channels,
BLOCK_S input positions] per program; each dz_c is gathered where it is needed: only the
ceil(KH/SH) x ceil(KW/SW) windows (4 for 3x3/2) can hold an input, and a window's gradient counts
when its argmax is this input's offset in it (maxpool2d's deterministic gather, in the same order).
The LRN denominators s_c are recomputed from x, not saved: saving them would add a full-size write
to the forward (which otherwise writes ~1/4 element of y and 1/4 byte of argmax per input) and a
full-size read to the backward, where the recompute is L1/L2 hits.

Deterministic (no atomics, fixed order). Any strides: NCHW, channels_last and strided tensors are
read in place through their 4-D strides (no copies).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch._prims_common import suggest_memory_format

from fastalex.kernels import _common
from fastalex.kernels.lrn import MAX_UNROLL, _channel_block, _neg_sign, _pow, _scalar, _tile, _window_sumsq
from fastalex.ops._checks import argmax_dtype

__all__ = ["lrn_maxpool2d_forward", "lrn_maxpool2d_backward", "output_size"]


@triton.jit
def _lrn_maxpool2d_fwd_kernel(
    x_ptr,  # (N, C, H, W) input, strides sx_*
    y_ptr,  # (N, C, OH, OW) pooled output, strides sy_*
    arg_ptr,  # (N, C, OH, OW) int8 window offset kh * KW + kw of the maximum, strides sa_*
    N, C, OH, OW, CG,  # CG: channels per group (C without groups)
    sx_n, sx_c, sx_h, sx_w,
    sy_n, sy_c, sy_h, sy_w,
    sa_n, sa_c, sa_h, sa_w,
    alpha_over_size: tl.float64, beta: tl.float64, k: tl.float64,
    neg_sign: tl.float64,  # see kernels.lrn._pow
    SIZE: tl.constexpr,  # LRN window length
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,  # pool window and stride
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ACC: tl.constexpr,  # fp32, or fp64 for fp64 inputs
    UNROLL: tl.constexpr,  # unroll the LRN window loop (SIZE <= MAX_UNROLL)
):
    n, c, p, c_mask, p_mask, lo, hi = _tile(N, C, OH * OW, CG, BLOCK_C, BLOCK_P)
    mask = c_mask & p_mask
    a = _scalar(alpha_over_size, ACC)
    neg_beta = -_scalar(beta, ACC)
    k_ = _scalar(k, ACC)
    sign = _scalar(neg_sign, ACC)
    oh = p // OW
    ow = p % OW
    x_base = x_ptr + n * sx_n
    best = tl.full([BLOCK_C, BLOCK_P], float("-inf"), ACC)
    arg = tl.zeros([BLOCK_C, BLOCK_P], tl.int32)  # an all -inf window reports offset 0, as torch
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            # No padding, floor mode: every tap of a valid output lies inside the input.
            s_off = (oh * SH + kh) * sx_h + (ow * SW + kw) * sx_w
            sumsq = _window_sumsq(x_base, c, s_off, p_mask, lo, hi, sx_c, -(SIZE // 2), SIZE,
                                  BLOCK_C, BLOCK_P, ACC, UNROLL)
            x = tl.load(x_base + c * sx_c + s_off, mask=mask, other=0.0).to(ACC)
            z = x * _pow(k_ + a * sumsq, neg_beta, sign)
            # Rounded as the unfused LRN stores it, so ties (and the argmax) are the unfused ops'.
            v = z.to(y_ptr.dtype.element_ty).to(ACC)
            take = (v > best) | (v != v)
            best = tl.where(take, v, best)
            arg = tl.where(take, kh * KW + kw, arg)
    tl.store(y_ptr + n * sy_n + c * sy_c + oh * sy_h + ow * sy_w, best.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(arg_ptr + n * sa_n + c * sa_c + oh * sa_h + ow * sa_w, arg.to(arg_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _routed_grad(dy_base, arg_base, cc, h, w, valid, OH, OW, sd_c, sd_h, sd_w, sa_c, sa_h, sa_w,
                 KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    """dz at channels cc [BLOCK_C, 1], input positions (h, w) [1, BLOCK_S]: the sum of dy over the
    pool windows whose argmax is this position, in ascending (kh, kw) as maxpool2d's backward adds.

    Along h only the windows oh = h // SH - t, t < ceil(KH / SH), can hold h (at offset kh = h - oh * SH,
    a hit when kh < KH); the same along w. The window arithmetic depends on (h, w) only, so the
    compiler shares it between the SIZE channels a program gathers.
    """
    dz = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    for th in tl.static_range((KH + SH - 1) // SH):
        oh = h // SH - th
        kh = h - oh * SH
        h_ok = (oh >= 0) & (oh < OH) & (kh < KH)
        for tw in tl.static_range((KW + SW - 1) // SW):
            ow = w // SW - tw
            kw = w - ow * SW
            ok = valid & h_ok & (ow >= 0) & (ow < OW) & (kw < KW)
            # Masked lanes read -1, which matches no offset.
            a = tl.load(arg_base + cc * sa_c + oh * sa_h + ow * sa_w, mask=ok, other=-1)
            hit = ok & (a.to(tl.int32) == kh * KW + kw)
            dz += tl.load(dy_base + cc * sd_c + oh * sd_h + ow * sd_w, mask=hit, other=0.0).to(ACC)
    return dz


@triton.jit
def _mirror_terms(x_base, dy_base, arg_base, c, x_i, h, w, x_soff, s_mask, lo, hi, OH, OW,
                  sx_c, sd_c, sd_h, sd_w, sa_c, sa_h, sa_w, off, a, k_, neg_beta, sign,
                  SIZE: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr, UNROLL: tl.constexpr):
    """For the LRN outputs cc = c + off: ((x_i / s_cc) * dz_cc * z_cc, dz_cc * s_cc^(-beta)), both 0
    where cc is outside c's group (kernels.lrn._mirror_term, with dz gathered from the pool)."""
    cc = c + off
    valid = (cc >= lo) & (cc < hi) & s_mask
    x_c = tl.load(x_base + cc * sx_c + x_soff, mask=valid, other=0.0).to(ACC)
    dz_c = _routed_grad(dy_base, arg_base, cc, h, w, valid, OH, OW, sd_c, sd_h, sd_w, sa_c, sa_h, sa_w,
                        KH, KW, SH, SW, BLOCK_C, BLOCK_S, ACC)
    s_c = k_ + a * _window_sumsq(x_base, c, x_soff, s_mask, lo, hi, sx_c, off - SIZE // 2, SIZE,
                                 BLOCK_C, BLOCK_S, ACC, UNROLL)
    r_c = _pow(s_c, neg_beta, sign)
    term = (x_i / s_c) * (dz_c * (x_c * r_c))
    return tl.where(valid, term, 0.0), tl.where(valid, dz_c * r_c, 0.0)


@triton.jit
def _lrn_maxpool2d_bwd_kernel(
    dy_ptr,  # (N, C, OH, OW) pooled-output gradient, strides sd_*
    arg_ptr,  # (N, C, OH, OW) int8 argmax of the forward, strides sa_*
    x_ptr,  # (N, C, H, W) forward input, strides sx_*
    dx_ptr,  # (N, C, H, W) input gradient (written), strides sg_*
    N, C, H, W, OH, OW, CG,
    sd_n, sd_c, sd_h, sd_w,
    sa_n, sa_c, sa_h, sa_w,
    sx_n, sx_c, sx_h, sx_w,
    sg_n, sg_c, sg_h, sg_w,
    alpha_over_size: tl.float64, beta: tl.float64, k: tl.float64,
    neg_sign: tl.float64,
    SIZE: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ACC: tl.constexpr, UNROLL: tl.constexpr,
):
    n, c, s, c_mask, s_mask, lo, hi = _tile(N, C, H * W, CG, BLOCK_C, BLOCK_S)
    mask = c_mask & s_mask
    a = _scalar(alpha_over_size, ACC)
    neg_beta = -_scalar(beta, ACC)
    k_ = _scalar(k, ACC)
    sign = _scalar(neg_sign, ACC)
    h = s // W
    w = s % W
    x_base = x_ptr + n * sx_n
    dy_base = dy_ptr + n * sd_n
    arg_base = arg_ptr + n * sa_n
    x_soff = h * sx_h + w * sx_w
    x_i = tl.load(x_base + c * sx_c + x_soff, mask=mask, other=0.0).to(ACC)
    # The outputs cc = i + off in M(i); the one with off = 0 also gives the direct term dz_i * s_i^(-beta)
    # (SIZE window sums and SIZE gathers in all, for one uniform loop).
    acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    direct = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    if UNROLL:
        for m in tl.static_range(SIZE):
            term, d = _mirror_terms(x_base, dy_base, arg_base, c, x_i, h, w, x_soff, s_mask, lo, hi, OH, OW,
                                    sx_c, sd_c, sd_h, sd_w, sa_c, sa_h, sa_w, m - (SIZE - 1) // 2,
                                    a, k_, neg_beta, sign, SIZE, KH, KW, SH, SW, BLOCK_C, BLOCK_S, ACC, UNROLL)
            acc += term
            if m == (SIZE - 1) // 2:  # compile-time: off = 0
                direct = d
    else:  # a loop, not SIZE copies: compile time stays flat for large windows
        for m in range(SIZE):
            off = m - (SIZE - 1) // 2
            term, d = _mirror_terms(x_base, dy_base, arg_base, c, x_i, h, w, x_soff, s_mask, lo, hi, OH, OW,
                                    sx_c, sd_c, sd_h, sd_w, sa_c, sa_h, sa_w, off,
                                    a, k_, neg_beta, sign, SIZE, KH, KW, SH, SW, BLOCK_C, BLOCK_S, ACC, UNROLL)
            acc += term
            direct += tl.where(off == 0, d, 0.0)
    # beta = 0: no window gradient (as kernels.lrn; acc's inf/inf NaN must not leak in).
    cross = tl.where(neg_beta == 0, x_i * 0.0, (2.0 * neg_beta * a) * acc)
    dx = direct + cross
    tl.store(dx_ptr + n * sg_n + c * sg_c + h * sg_h + w * sg_w, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers


def _block_sizes(C: int, P: int, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_P, num_warps), powers of two; P is the pooled (forward) or input (backward) plane."""
    if _common.is_interpreting():
        # The interpreter's cost is per program: as few, large tiles as possible.
        block_c = min(_common.next_pow2(C), 256)
        block_p = min(_common.next_pow2(P), max(2**15 // block_c, 1))
        return block_c, block_p, 4
    block_c = _channel_block(C)  # as kernels/lrn.py
    # Elements a thread from ptxas on sm_90 (size 5, 3x3/2): registers grow with them (ptxas keeps
    # every tap's loads in flight): forward 1 / 2 / 4 a thread ~40 / 80-90 / 130-165 registers,
    # backward 1 / 2 a thread ~65 / 100-190. 2 and 1 keep 16-24 warps a SM resident for the loads.
    tile, per_thread = (256, 1) if backward else (512, 2)
    block_c = min(block_c, tile // 16)  # at least 16 positions a tile (coalesced NCHW rows)
    block_p = min(_common.next_pow2(P), max(tile // block_c, 16))
    num_warps = max(1, min(8, block_c * block_p // (32 * per_thread)))
    return block_c, block_p, num_warps


def output_size(H: int, W: int, kernel_size, stride) -> tuple[int, int]:
    """(OH, OW) of the pool: floor((H - KH) / SH) + 1, as torch without padding, dilation or ceil mode."""
    return (H - kernel_size[0]) // stride[0] + 1, (W - kernel_size[1]) // stride[1] + 1


def _max_offset(t: torch.Tensor) -> int:
    return sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)


def _check_args(x: torch.Tensor, size, groups, kernel_size, stride, name: str = "x") -> None:
    _common.check_tensor(x, name, ndim=4)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    C, H, W = x.shape[1:]
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or C % groups:
        raise ValueError(f"groups must be a positive int dividing {name}'s {C} channels, got {groups!r}")
    for arg, v in (("kernel_size", kernel_size), ("stride", stride)):
        if len(v) != 2 or any(not isinstance(e, int) or isinstance(e, bool) or e < 1 for e in v):
            raise ValueError(f"{arg} must be two ints >= 1, got {tuple(v)!r}")
    if C == 0 or H < kernel_size[0] or W < kernel_size[1]:
        raise ValueError(f"{name} of shape {tuple(x.shape)} needs channels and a plane of at least "
                         f"kernel_size {tuple(kernel_size)}")
    if _max_offset(x) > _common.MAX_NUMEL:
        raise NotImplementedError(f"{name}'s strides reach past 2**31 - 1 elements; the kernels use int32 offsets")


def _lrn_consts(size: int, alpha: float, beta: float, k: float) -> tuple[float, float, float, float]:
    return float(alpha) / size, float(beta), float(k), _neg_sign(-float(beta))


def lrn_maxpool2d_forward(x: torch.Tensor, size: int, alpha: float, beta: float, k: float, groups: int = 1,
                          kernel_size=(3, 3), stride=(2, 2)) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, C, H, W) -> (y, argmax), both (N, C, OH, OW) in x's memory format (as torch's max_pool2d):
    y = max_pool2d(local_response_norm(x, size, alpha, beta, k, groups), kernel_size, stride), argmax the
    window offset kh * KW + kw of each maximum (int8)."""
    kernel_size, stride = tuple(kernel_size), tuple(stride)
    _check_args(x, size, groups, kernel_size, stride)
    N, C, H, W = x.shape
    OH, OW = output_size(H, W, kernel_size, stride)
    fmt = suggest_memory_format(x)
    y = _common.empty((N, C, OH, OW), dtype=x.dtype, device=x.device, memory_format=fmt)
    arg = _common.empty((N, C, OH, OW), dtype=argmax_dtype(kernel_size), device=x.device, memory_format=fmt)
    if y.numel() == 0:
        return y, arg
    block_c, block_p, num_warps = _block_sizes(C, OH * OW)
    assert block_c & (block_c - 1) == 0 and block_p & (block_p - 1) == 0, "blocks must be powers of two"
    grid = (N * triton.cdiv(C, block_c) * triton.cdiv(OH * OW, block_p),)
    _lrn_maxpool2d_fwd_kernel[grid](
        x, y, arg, N, C, OH, OW, C // groups, *x.stride(), *y.stride(), *arg.stride(),
        *_lrn_consts(size, alpha, beta, k),
        SIZE=size, KH=kernel_size[0], KW=kernel_size[1], SH=stride[0], SW=stride[1],
        BLOCK_C=block_c, BLOCK_P=block_p, ACC=_common.acc_dtype(x.dtype), UNROLL=size <= MAX_UNROLL,
        num_warps=num_warps,
    )
    return y, arg


def lrn_maxpool2d_backward(dy: torch.Tensor, x: torch.Tensor, argmax: torch.Tensor, size: int, alpha: float,
                           beta: float, k: float, groups: int = 1, kernel_size=(3, 3), stride=(2, 2)) -> torch.Tensor:
    """dx of lrn_maxpool2d_forward. dy, argmax: (N, C, OH, OW), any strides; x: (N, C, H, W); dx: like
    x (torch.empty_like's layout)."""
    kernel_size, stride = tuple(kernel_size), tuple(stride)
    _check_args(x, size, groups, kernel_size, stride)
    _common.check_tensor(dy, "dy", ndim=4)
    _common.check_same("x", x, "dy", dy)
    _common.check_tensor(argmax, "argmax", ndim=4, dtypes=(argmax_dtype(kernel_size),))
    N, C, H, W = x.shape
    OH, OW = output_size(H, W, kernel_size, stride)
    for name, t in (("dy", dy), ("argmax", argmax)):
        if tuple(t.shape) != (N, C, OH, OW):
            raise ValueError(f"{name} must have the pooled shape {(N, C, OH, OW)}, got {tuple(t.shape)}")
        if _max_offset(t) > _common.MAX_NUMEL:
            raise NotImplementedError(f"{name}'s strides reach past 2**31 - 1 elements; the kernels use int32 offsets")
    if argmax.device != x.device:
        raise ValueError(f"argmax must be on the device of x ({x.device}), got {argmax.device}")
    dx = _common.empty_like(x)
    if dx.numel() == 0:
        return dx
    block_c, block_s, num_warps = _block_sizes(C, H * W, backward=True)
    assert block_c & (block_c - 1) == 0 and block_s & (block_s - 1) == 0, "blocks must be powers of two"
    grid = (N * triton.cdiv(C, block_c) * triton.cdiv(H * W, block_s),)
    _lrn_maxpool2d_bwd_kernel[grid](
        dy, argmax, x, dx, N, C, H, W, OH, OW, C // groups,
        *dy.stride(), *argmax.stride(), *x.stride(), *dx.stride(),
        *_lrn_consts(size, alpha, beta, k),
        SIZE=size, KH=kernel_size[0], KW=kernel_size[1], SH=stride[0], SW=stride[1],
        BLOCK_C=block_c, BLOCK_S=block_s, ACC=_common.acc_dtype(x.dtype), UNROLL=size <= MAX_UNROLL,
        num_warps=num_warps,
    )
    return dx
