"""Local response norm then max-pool, fused: one Triton pass forward, one backward.

AlexNet runs conv -> ReLU -> LRN -> 3x3/2 max-pool twice, on its largest activations. Run apart, the
LRN writes its full-size output and the pool reads it back (and the backward writes and reads the
full-size pool gradient). Fused, the forward reads x once and writes only the pooled y plus a
1-byte argmax; the backward reads x, dy and the argmax and writes dx. With the ReLU before the LRN
fused too (relu=True: x is the conv's output before its ReLU), the conv's backward has no ReLU mask
to apply: torch's threshold_backward, three passes over the net's largest activation, is gone.

Semantics: y = max_pool2d(lrn(x)) (with relu: max_pool2d(lrn(relu(x)))), lrn as kernels/lrn.py
(torch's local_response_norm with size, alpha, beta, k; with `groups`, the channel window clipped to
each of `groups` equal channel blocks) and a max-pool of kernel (KH, KW), stride (SH, SW), no padding,
no dilation, floor mode. The LRN value
of every window tap is rounded to y's dtype before the compare, so values AND argmax are those of
lrn_forward followed by maxpool2d_forward (bit for bit in the interpreter): ties keep the first
maximum, the last NaN wins (`take = (v > best) | (v != v)`, as torch). argmax holds the window
offset kh * KW + kw (int8).

Forward: one tile of [BLOCK_C channels, BLOCK_P pooled positions] per program; each of the KH * KW
taps recomputes its LRN value (SIZE shifted loads, nearly all cache hits, and one pow). Overlapping
windows (3x3/2) recompute each input's LRN 2.25 times on average: cheap next to writing and
re-reading the LRN output (4 B an element for fp32), and the kernel stays one pass of plain loads.

Backward, with z = lrn(x) and dz the pool gradient routed to z (dz = 0 except at argmax positions):

    dx_i = dz_i * s_i^(-beta) - 2*beta*alpha/size * x_i * sum_{c in M(i)} (dz_c * z_c) / s_c

(kernels/lrn.py's formula and structure; M(i) the mirror window). One tile of [BLOCK_C channels,
BLOCK_S input positions] per program; each dz_c is gathered where it is needed: only the
ceil(KH/SH) x ceil(KW/SW) windows (4 for 3x3/2) can hold an input, and a window's gradient counts
when its argmax is this input's offset in it (maxpool2d's deterministic gather, in the same order).
The LRN denominators s_c are recomputed from x, not saved: saving them would add a full-size write
to the forward (which otherwise writes ~1/4 element of y and 1/4 byte of argmax per input) and a
full-size read to the backward, where the recompute is L1/L2 hits.

Channel quads (_fwd_quads, _bwd_quads; `_quads` says where): with unit channel stride and C and
C/groups multiples of 4 (channels_last AlexNet), a thread takes 4 consecutive channels of one
position and loads x, and backward each pool window's argmax and dy, as whole vectors: its own quad
and the quads either side, which the LRN windows reach. A group holds whole quads, so a quad is
masked as a whole and no channel needs a mask of its own; the values are those of the per-channel
form above, bit for bit (the same expressions, in the same order).

Cells (_fwd_cells, _bwd_cells; `_cells` says where): where the quads run and the pool's stride is 2
both ways with windows of at most 4 (AlexNet's 3x3/2), a thread takes a 2 x 2 cell. Forward, four
pooled outputs whose windows overlap: each of the cell's taps (25 for 3x3/2, against 36 for four
outputs apart) has its LRN computed once and goes to every output whose window holds it. Backward,
four input positions that share their candidate pool windows: each window is loaded once for the
four, and only the (position, window) pairs that can hit are tested (9 of 16). Same values, bit for
bit (each output sees its taps, each input its windows, in the same order).

Deterministic (no atomics, fixed order). Any strides: NCHW, channels_last and strided tensors are
read in place through their 4-D strides (no copies).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch._prims_common import suggest_memory_format

from fastalex.kernels import _common
from fastalex.kernels._common import MAX_GRID_YZ, cdiv
from fastalex.kernels.lrn import (MAX_UNROLL, _channel_block, _cross, _div, _neg_sign, _pow, _relu, _scalar,
                                  _tile, _window_sumsq, simple_pow)
from fastalex.kernels._geometry import argmax_dtype, output_size, pools_in_cells
from fastalex.kernels.maxpool2d import _cell_hits, _hit

__all__ = ["lrn_maxpool2d_forward", "lrn_maxpool2d_backward"]


@triton.jit
def _tap_lrn(ptr, c, lo, hi, sx_c, a, k_, neg_beta, sign, SIZE: tl.constexpr, BLOCK_C: tl.constexpr,
             BLOCK_P: tl.constexpr, ACC: tl.constexpr, SIMPLE_POW: tl.constexpr, RELU: tl.constexpr):
    """The LRN value at `ptr` (channels c [BLOCK_C, 1] of one tap; of relu(x) where RELU): kernels.lrn's
    window sum and expression, op for op (so bit for bit), with the centre load reused as x."""
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    x = acc
    for d in tl.static_range(SIZE):
        j = c + (d - SIZE // 2)
        v = _relu(tl.load(ptr + (d - SIZE // 2) * sx_c, mask=(j >= lo) & (j < hi), other=0.0).to(ACC), RELU)
        acc += v * v
        if d == SIZE // 2:
            x = v  # masked exactly where c >= C (lo <= c < lo + CG always)
    return x * _pow(k_ + a * acc, neg_beta, sign, SIMPLE_POW)


@triton.jit
def _split4(v, B0: tl.constexpr, B1: tl.constexpr):
    """[B0, B1, 4] -> its four [B0, B1] slices v[..., 0..3]. The 4 lie in one thread (a vector load's
    elements), so the splits are register renames."""
    even, odd = tl.split(tl.reshape(v, [B0, B1, 2, 2]))
    v0, v2 = tl.split(even)
    v1, v3 = tl.split(odd)
    return v0, v1, v2, v3


@triton.jit
def _join4(v0, v1, v2, v3, B0: tl.constexpr, B1: tl.constexpr):
    """_split4's inverse: four [B0, B1] tensors -> [B0, B1, 4] (for one vector store)."""
    return tl.reshape(tl.join(tl.join(v0, v2), tl.join(v1, v3)), [B0, B1, 4])


@triton.jit
def _load_quad(q, mask, ACC: tl.constexpr, RELU: tl.constexpr):
    """relu(x) (x where not RELU) at the quads q points to ([B0, B1, 4]) as one vector load, 0 where
    the quad's mask (a whole quad's: its group's) is off."""
    return _relu(tl.load(q, mask=mask, other=0.0).to(ACC), RELU)


@triton.jit
def _pick(J: tl.constexpr, l0, l1, l2, l3, m0, m1, m2, m3, r0, r1, r2, r3):
    """Channel cb + J (-4 <= J < 8) of a thread's strip of 12: the quads before (l), at (m) and after
    (r) its own quad cb."""
    if J < 0:
        if J == -4:
            v = l0
        elif J == -3:
            v = l1
        elif J == -2:
            v = l2
        else:
            v = l3
    elif J < 4:
        if J == 0:
            v = m0
        elif J == 1:
            v = m1
        elif J == 2:
            v = m2
        else:
            v = m3
    else:
        if J == 4:
            v = r0
        elif J == 5:
            v = r1
        elif J == 6:
            v = r2
        else:
            v = r3
    return v


@triton.jit
def _strip_sumsq(J: tl.constexpr, l0, l1, l2, l3, m0, m1, m2, m3, r0, r1, r2, r3, SIZE: tl.constexpr,
                 B0: tl.constexpr, B1: tl.constexpr, ACC: tl.constexpr):
    """Channel cb + J's LRN window sum of squares from the thread's strip (_pick), in _tap_lrn's order."""
    acc = tl.zeros([B0, B1], dtype=ACC)
    for d in tl.static_range(SIZE):
        v = _pick(J + d - SIZE // 2, l0, l1, l2, l3, m0, m1, m2, m3, r0, r1, r2, r3)
        acc += v * v
    return acc


@triton.jit
def _quad_masks(cb, C, CG, QPT: tl.constexpr):
    """For threads taking QPT quads from channel cb ([1, B1]): their group's first channel lo and
    [1, B1, 1] masks of the quad before, their own quads and the quad after (a group holds whole quads,
    so each quad is in it or out of it whole)."""
    lo = (cb // CG) * CG
    mid_ok = (cb < C)[:, :, None]  # (QPT 2: the second quad too, C % 8 == 0)
    left_ok = (cb > lo)[:, :, None] & mid_ok  # cb - 4 >= lo
    right_ok = (cb + 4 * QPT < lo + CG)[:, :, None]
    return lo, left_ok, mid_ok, right_ok


@triton.jit
def _running_max(v, best, arg, T: tl.constexpr):
    """The pool's running maximum after tap T with value v: ties keep the first, the last NaN wins (as
    torch)."""
    take = (v > best) | (v != v)
    return tl.where(take, v, best), tl.where(take, T, arg)


@triton.jit
def _quad_lrn(x_q, left_ok, mid_ok, right_ok, a, k_, neg_beta, sign, y_ty: tl.constexpr, SIZE: tl.constexpr,
              B0: tl.constexpr, B1: tl.constexpr, ACC: tl.constexpr, SIMPLE_POW: tl.constexpr, RELU: tl.constexpr):
    """The LRN values of a thread's 4 channels at one tap ([B0, B1, 4], x_q its quad's pointers): the
    three quads' loads (whole vectors, masked by group), each channel's value as _tap_lrn computes it
    (same ops, same order), rounded as the unfused LRN stores it, so ties (and the argmax) are the
    unfused ops'."""
    l0, l1, l2, l3 = _split4(_load_quad(x_q - 4, left_ok, ACC, RELU), B0, B1)
    m0, m1, m2, m3 = _split4(_load_quad(x_q, mid_ok, ACC, RELU), B0, B1)
    r0, r1, r2, r3 = _split4(_load_quad(x_q + 4, right_ok, ACC, RELU), B0, B1)
    v0 = m0
    v1 = m1
    v2 = m2
    v3 = m3
    for i in tl.static_range(4):
        acc = _strip_sumsq(i, l0, l1, l2, l3, m0, m1, m2, m3, r0, r1, r2, r3, SIZE, B0, B1, ACC)
        x = _pick(i, l0, l1, l2, l3, m0, m1, m2, m3, r0, r1, r2, r3)
        v = (x * _pow(k_ + a * acc, neg_beta, sign, SIMPLE_POW)).to(y_ty).to(ACC)
        if i == 0:
            v0 = v
        elif i == 1:
            v1 = v
        elif i == 2:
            v2 = v
        else:
            v3 = v
    return _join4(v0, v1, v2, v3, B0, B1)


@triton.jit
def _fwd_quads(x_ptr, y_ptr, arg_ptr, C, OH, OW, CG, sx_n, sx_h, sx_w, sy_n, sy_h, sy_w, sa_n, sa_h, sa_w,
               a, k_, neg_beta, sign, SIZE: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr,
               SW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr,
               SIMPLE_POW: tl.constexpr, RELU: tl.constexpr):
    """The forward where channels are contiguous (unit channel stride) and come in groups of whole
    quads (C and CG multiples of 4): each thread takes 4 consecutive channels of one pooled position
    and loads each tap's x as three vectors, its quad and the quads either side (the LRN window's
    neighbours, SIZE <= 9), masked a whole quad at a time by the group (so no channel needs a mask).
    Tiles are [BLOCK_P positions, BLOCK_C // 4 quads, 4]."""
    BQ: tl.constexpr = BLOCK_C // 4
    P = OH * OW
    # A 3-D grid (position blocks, channel blocks, samples; _grid): no divisions to find them.
    n = tl.program_id(2)
    cb = tl.program_id(1) * BLOCK_C + 4 * tl.arange(0, BQ)[None, :]  # [1, BQ]: each thread's first channel
    p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P))[:, None]  # [BLOCK_P, 1]
    _, left_ok, mid_ok, right_ok = _quad_masks(cb, C, CG, 1)
    pc = tl.minimum(p, P - 1)  # in-bounds loads for padded lanes (never stored)
    e = tl.arange(0, 4)[None, None, :]
    x_q = (x_ptr + n * sx_n + ((pc // OW) * SH) * sx_h + ((pc % OW) * SW) * sx_w + cb)[:, :, None] + e
    best = tl.full([BLOCK_P, BQ, 4], float("-inf"), ACC)
    arg = tl.zeros([BLOCK_P, BQ, 4], tl.int32)  # an all -inf window reports offset 0, as torch
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            v = _quad_lrn(x_q + (kh * sx_h + kw * sx_w), left_ok, mid_ok, right_ok, a, k_, neg_beta, sign,
                          y_ptr.dtype.element_ty, SIZE, BLOCK_P, BQ, ACC, SIMPLE_POW, RELU)
            best, arg = _running_max(v, best, arg, kh * KW + kw)
    _pooled_store(y_ptr, arg_ptr, n, p // OW, p % OW, (p < P)[:, :, None] & mid_ok, cb, best, arg,
                  sy_n, sy_h, sy_w, sa_n, sa_h, sa_w)


@triton.jit
def _pooled_store(y_ptr, arg_ptr, n, oh, ow, out, cb, best, arg, sy_n, sy_h, sy_w, sa_n, sa_h, sa_w):
    """Stores the threads' pooled quads (y and argmax, [B0, B1, 4]) at pooled position (oh, ow) where `out`."""
    e = tl.arange(0, 4)[None, None, :]
    tl.store((y_ptr + n * sy_n + oh * sy_h + ow * sy_w + cb)[:, :, None] + e, best.to(y_ptr.dtype.element_ty),
             mask=out)
    tl.store((arg_ptr + n * sa_n + oh * sa_h + ow * sa_w + cb)[:, :, None] + e, arg.to(arg_ptr.dtype.element_ty),
             mask=out)


@triton.jit
def _fwd_cells(x_ptr, y_ptr, arg_ptr, C, OH, OW, CG, sx_n, sx_h, sx_w, sy_n, sy_h, sy_w, sa_n, sa_h, sa_w,
               a, k_, neg_beta, sign, SIZE: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr,
               SW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr,
               SIMPLE_POW: tl.constexpr, RELU: tl.constexpr):
    """_fwd_quads with a cell of 2 x 2 pooled outputs (2 ci + I, 2 cj + J) a thread: their windows
    overlap (3x3/2: 25 taps for 4 outputs, where one output a thread evaluates 36), so each tap's LRN
    value is computed once and goes to the running max of every output whose window holds it. A
    window's taps come in row-major order, so each output sees them in _fwd_quads' order, bit for bit.
    Tiles are [BLOCK_P cells, BLOCK_C // 4 quads, 4]."""
    BQ: tl.constexpr = BLOCK_C // 4
    CW = (OW + 1) // 2
    NCELL = ((OH + 1) // 2) * CW
    n = tl.program_id(2)
    cb = tl.program_id(1) * BLOCK_C + 4 * tl.arange(0, BQ)[None, :]
    s = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P))[:, None]
    sc = tl.minimum(s, NCELL - 1)
    ci = sc // CW
    cj = sc % CW
    _, left_ok, mid_ok, right_ok = _quad_masks(cb, C, CG, 1)
    e = tl.arange(0, 4)[None, None, :]
    x_q = (x_ptr + n * sx_n + cb)[:, :, None] + e
    # Taps of outputs past the plane's last (odd OH or OW) read the last row / column that has a window
    # (in bounds; those outputs are never stored).
    h_last = (OH - 1) * SH + KH - 1
    w_last = (OW - 1) * SW + KW - 1
    best00 = tl.full([BLOCK_P, BQ, 4], float("-inf"), ACC)
    best01, best10, best11 = best00, best00, best00
    arg00 = tl.zeros([BLOCK_P, BQ, 4], tl.int32)  # an all -inf window reports offset 0, as torch
    arg01, arg10, arg11 = arg00, arg00, arg00
    for r in tl.static_range(SH + KH):
        row = (tl.minimum(2 * SH * ci + r, h_last) * sx_h)[:, :, None]
        for c in tl.static_range(SW + KW):
            # (r, c): tap (r - I SH, c - J SW) of output (I, J) where that lies in its window
            if (r < KH or r >= SH) and (c < KW or c >= SW):  # some output's
                v = _quad_lrn(x_q + row + (tl.minimum(2 * SW * cj + c, w_last) * sx_w)[:, :, None], left_ok,
                              mid_ok, right_ok, a, k_, neg_beta, sign, y_ptr.dtype.element_ty, SIZE, BLOCK_P,
                              BQ, ACC, SIMPLE_POW, RELU)
                if r < KH:
                    if c < KW:
                        best00, arg00 = _running_max(v, best00, arg00, r * KW + c)
                    if c >= SW:
                        best01, arg01 = _running_max(v, best01, arg01, r * KW + c - SW)
                if r >= SH:
                    if c < KW:
                        best10, arg10 = _running_max(v, best10, arg10, (r - SH) * KW + c)
                    if c >= SW:
                        best11, arg11 = _running_max(v, best11, arg11, (r - SH) * KW + c - SW)
    inside = (s < NCELL)[:, :, None] & mid_ok
    oh = 2 * ci
    ow = 2 * cj
    _pooled_store(y_ptr, arg_ptr, n, oh, ow, inside, cb, best00, arg00, sy_n, sy_h, sy_w, sa_n, sa_h, sa_w)
    _pooled_store(y_ptr, arg_ptr, n, oh, ow + 1, inside & (ow + 1 < OW)[:, :, None], cb, best01, arg01,
                  sy_n, sy_h, sy_w, sa_n, sa_h, sa_w)
    _pooled_store(y_ptr, arg_ptr, n, oh + 1, ow, inside & (oh + 1 < OH)[:, :, None], cb, best10, arg10,
                  sy_n, sy_h, sy_w, sa_n, sa_h, sa_w)
    _pooled_store(y_ptr, arg_ptr, n, oh + 1, ow + 1, inside & ((oh + 1 < OH) & (ow + 1 < OW))[:, :, None], cb,
                  best11, arg11, sy_n, sy_h, sy_w, sa_n, sa_h, sa_w)


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
    SIMPLE_POW: tl.constexpr,  # kernels.lrn._pow
    RELU: tl.constexpr,  # the input's ReLU first: y = pool(lrn(relu(x)))
    QUADS: tl.constexpr,  # channels contiguous in whole quads (_fwd_quads)
    CELLS: tl.constexpr,  # _fwd_quads in cells of 2 x 2 outputs (_fwd_cells)
):
    a = _scalar(alpha_over_size, ACC)
    neg_beta = -_scalar(beta, ACC)
    k_ = _scalar(k, ACC)
    sign = _scalar(neg_sign, ACC)
    if CELLS:
        _fwd_cells(x_ptr, y_ptr, arg_ptr, C, OH, OW, CG, sx_n, sx_h, sx_w, sy_n, sy_h, sy_w, sa_n, sa_h, sa_w,
                   a, k_, neg_beta, sign, SIZE, KH, KW, SH, SW, BLOCK_C, BLOCK_P, ACC, SIMPLE_POW, RELU)
    elif QUADS:
        _fwd_quads(x_ptr, y_ptr, arg_ptr, C, OH, OW, CG, sx_n, sx_h, sx_w, sy_n, sy_h, sy_w, sa_n, sa_h, sa_w,
                   a, k_, neg_beta, sign, SIZE, KH, KW, SH, SW, BLOCK_C, BLOCK_P, ACC, SIMPLE_POW, RELU)
    else:
        n, c, p, c_mask, p_mask, lo, hi = _tile(N, C, OH * OW, CG, BLOCK_C, BLOCK_P)
        mask = c_mask & p_mask
        oh = p // OW
        ow = p % OW
        x_base = x_ptr + n * sx_n
        # Loads read clamped positions (padded lanes repeat the last output: in bounds, never stored), so
        # their masks depend on the channel row only and are shared by every tap; one pointer per element,
        # each tap and window channel a scalar (or, for a unit stride, an immediate) offset from it.
        pc = tl.minimum(p, OH * OW - 1)
        x_row = x_base + c * sx_c + ((pc // OW) * SH) * sx_h + ((pc % OW) * SW) * sx_w
        best = tl.full([BLOCK_C, BLOCK_P], float("-inf"), ACC)
        arg = tl.zeros([BLOCK_C, BLOCK_P], tl.int32)  # an all -inf window reports offset 0, as torch
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                # No padding, floor mode: every tap of a valid output lies inside the input.
                if UNROLL:
                    z = _tap_lrn(x_row + (kh * sx_h + kw * sx_w), c, lo, hi, sx_c, a, k_, neg_beta, sign,
                                 SIZE, BLOCK_C, BLOCK_P, ACC, SIMPLE_POW, RELU)
                else:
                    s_off = (oh * SH + kh) * sx_h + (ow * SW + kw) * sx_w
                    sumsq = _window_sumsq(x_base, c, s_off, p_mask, lo, hi, sx_c, -(SIZE // 2), SIZE,
                                          BLOCK_C, BLOCK_P, ACC, UNROLL, RELU)
                    x = _relu(tl.load(x_base + c * sx_c + s_off, mask=mask, other=0.0).to(ACC), RELU)
                    z = x * _pow(k_ + a * sumsq, neg_beta, sign, SIMPLE_POW)
                # Rounded as the unfused LRN stores it, so ties (and the argmax) are the unfused ops'.
                v = z.to(y_ptr.dtype.element_ty).to(ACC)
                best, arg = _running_max(v, best, arg, kh * KW + kw)
        tl.store(y_ptr + n * sy_n + c * sy_c + oh * sy_h + ow * sy_w, best.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(arg_ptr + n * sa_n + c * sa_c + oh * sa_h + ow * sa_w, arg.to(arg_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _relu_grad(g, r, RELU: tl.constexpr):
    """The gradient g of r = relu(x) taken back to x where RELU: 0 where r <= 0 (torch's
    threshold_backward(g, r, 0): a NaN r passes g), else g."""
    if RELU:
        return tl.where(r <= 0, 0.0, g)
    else:
        return g


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
def _mirror_terms(x_base, dy_base, arg_base, c, h, w, x_soff, s_mask, lo, hi, OH, OW,
                  sx_c, sd_c, sd_h, sd_w, sa_c, sa_h, sa_w, off, a, k_, neg_beta, sign,
                  SIZE: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr, UNROLL: tl.constexpr,
                  SIMPLE_POW: tl.constexpr, RELU: tl.constexpr):
    """For the LRN outputs cc = c + off: ((dz_cc * z_cc) / s_cc, dz_cc * s_cc^(-beta)), both 0
    where cc is outside c's group (kernels.lrn._mirror_term, with dz gathered from the pool)."""
    cc = c + off
    valid = (cc >= lo) & (cc < hi) & s_mask
    x_c = _relu(tl.load(x_base + cc * sx_c + x_soff, mask=valid, other=0.0).to(ACC), RELU)
    dz_c = _routed_grad(dy_base, arg_base, cc, h, w, valid, OH, OW, sd_c, sd_h, sd_w, sa_c, sa_h, sa_w,
                        KH, KW, SH, SW, BLOCK_C, BLOCK_S, ACC)
    s_c = k_ + a * _window_sumsq(x_base, c, x_soff, s_mask, lo, hi, sx_c, off - SIZE // 2, SIZE,
                                 BLOCK_C, BLOCK_S, ACC, UNROLL, RELU)
    r_c = _pow(s_c, neg_beta, sign, SIMPLE_POW)
    term = _div(dz_c * (x_c * r_c), s_c)
    return tl.where(valid, term, 0.0), tl.where(valid, dz_c * r_c, 0.0)


@triton.jit
def _xload(x_row, cb, C, sx_c, J: tl.constexpr, ACC: tl.constexpr, RELU: tl.constexpr):
    """x (relu(x) where RELU) at channels cb + J (0 outside [0, C)): one expression per J, so the
    compiler loads it once for every window and mirror term that needs it."""
    j = cb + J
    return _relu(tl.load(x_row + J * sx_c, mask=(j >= 0) & (j < C), other=0.0).to(ACC), RELU)


@triton.jit
def _group_lo(cb, lo_b, CG, J: tl.constexpr, ONE_STEP: tl.constexpr, SAME_GROUP: tl.constexpr):
    """The first channel of the group of channel cb + J, lo_b that of cb, wherever cb + J is in cb's
    group or a later one; for a channel in an earlier group (J < 0), whose quantities no input of the
    thread uses (each input's terms stay in its group), any value. ONE_STEP (|J| < CG): from lo_b by
    one comparison, no division. SAME_GROUP (the thread's 4 inputs share cb's group): lo_b, for every
    channel whose quantities they use; the rest are masked out where they would be added."""
    if SAME_GROUP:
        return lo_b
    elif ONE_STEP:
        return lo_b + tl.where(cb - lo_b + J >= CG, CG, 0)
    else:
        return (tl.maximum(cb + J, 0) // CG) * CG


@triton.jit
def _channel_quantities(x_row, arg_w, dy_w, cb, h, w, C, CG, OH, OW, sx_c, sd_c, sd_h, sd_w, sa_c, sa_h, sa_w,
                        a, k_, neg_beta, sign, lo_b, J: tl.constexpr, SIZE: tl.constexpr,
                        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr, ONE_STEP: tl.constexpr,
                        SAME_GROUP: tl.constexpr, SIMPLE_POW: tl.constexpr, RELU: tl.constexpr):
    """For the LRN outputs cc = cb + J: (s_cc, dz_cc * (x_cc * r_cc), dz_cc * r_cc), r = s^(-beta), each
    computed once and shared by the (up to SIZE) inputs of the tile whose mirror window holds cc.

    s_cc is kernels.lrn's window sum over cc's own group (for the inputs that use it, their group),
    in its order; dz_cc maxpool2d's gather in its order (see _routed_grad)."""
    cc = cb + J
    g_lo = _group_lo(cb, lo_b, CG, J, ONE_STEP, SAME_GROUP)  # cc's group (see there)
    g_hi = tl.minimum(g_lo + CG, C)
    acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    x_c = acc
    for d in tl.static_range(SIZE):
        v = _xload(x_row, cb, C, sx_c, J + d - SIZE // 2, ACC, RELU)
        jj = cc + (d - SIZE // 2)
        vm = tl.where((jj >= g_lo) & (jj < g_hi), v, 0.0)
        acc += vm * vm
        if d == SIZE // 2:
            x_c = v
    s_c = k_ + a * acc
    ch_ok = (cc >= 0) & (cc < C)
    dz = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    for th in tl.static_range((KH + SH - 1) // SH):
        oh = h // SH - th
        kh = h - oh * SH
        h_ok = (oh >= 0) & (oh < OH) & (kh < KH)
        for tw in tl.static_range((KW + SW - 1) // SW):
            ow = w // SW - tw
            kw = w - ow * SW
            # The window's test first (the same for every J: computed once), then the channel's.
            ok = (h_ok & (ow >= 0) & (ow < OW) & (kw < KW)) & ch_ok
            # Masked lanes read -1, which matches no offset.
            # The window's pointers first (the same for every J: computed once), then the channel:
            # with a unit channel stride (channels_last) an immediate offset in the load.
            a_ = tl.load((arg_w - (th * sa_h + tw * sa_w)) + J * sa_c, mask=ok, other=-1)
            # (compared unsigned: a zero-extended byte, no sign extension; -1 reads 255, still no match)
            hit = ok & (a_.to(tl.uint8, bitcast=True).to(tl.int32) == kh * KW + kw)
            dz += tl.load((dy_w - (th * sd_h + tw * sd_w)) + J * sd_c, mask=hit, other=0.0).to(ACC)
    r_c = _pow(s_c, neg_beta, sign, SIMPLE_POW)
    return s_c, dz * (x_c * r_c), dz * r_c


@triton.jit
def _add_term(acc, s_j, w_j, cb, J: tl.constexpr, lo_v, hi_v):
    """acc + (dz_cc * z_cc) / s_cc for cc = cb + J in the group [lo_v, hi_v) of an input channel
    (kernels.lrn._mirror_term's expression; 0 added otherwise, as there). The term does not depend on
    the input: for inputs of one group the compiler computes it once and adds it to each sum."""
    cc = cb + J
    return acc + tl.where((cc >= lo_v) & (cc < hi_v), _div(w_j, s_j), 0.0)


@triton.jit
def _mirror_step(J: tl.constexpr, OFF_LO: tl.constexpr, OFF_HI: tl.constexpr, s_j, w_j, dr_j, cb,
                 acc0, acc1, acc2, acc3, d0, d1, d2, d3, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3):
    """LRN output cb + J's terms added to the sums of the thread's inputs cb + v whose mirror window
    [v + OFF_LO, v + OFF_HI] holds it (called in ascending J: each sum in ascending offset), and its
    direct term dr_j kept where it is one of them."""
    if J <= OFF_HI:
        acc0 = _add_term(acc0, s_j, w_j, cb, J, lo0, hi0)
    if J - 1 >= OFF_LO:
        if J - 1 <= OFF_HI:
            acc1 = _add_term(acc1, s_j, w_j, cb, J, lo1, hi1)
    if J - 2 >= OFF_LO:
        if J - 2 <= OFF_HI:
            acc2 = _add_term(acc2, s_j, w_j, cb, J, lo2, hi2)
    if J - 3 >= OFF_LO:
        acc3 = _add_term(acc3, s_j, w_j, cb, J, lo3, hi3)
    if J == 0:
        d0 = dr_j
    if J == 1:
        d1 = dr_j
    if J == 2:
        d2 = dr_j
    if J == 3:
        d3 = dr_j
    return acc0, acc1, acc2, acc3, d0, d1, d2, d3


@triton.jit
def _dx(direct, acc, x, a, neg_beta, SIMPLE_POW: tl.constexpr, RELU: tl.constexpr):
    """An input's gradient from its direct term and its sum of mirror terms (through the ReLU where
    RELU), as kernels.lrn's."""
    return _relu_grad(direct + _cross(x, acc, a, neg_beta, SIMPLE_POW), x, RELU)


@triton.jit
def _bwd_shared(dy_ptr, arg_ptr, x_ptr, dx_ptr, N, C, H, W, OH, OW, CG,
                sd_n, sd_c, sd_h, sd_w, sa_n, sa_c, sa_h, sa_w, sx_n, sx_c, sx_h, sx_w, sg_n, sg_c, sg_h, sg_w,
                a, k_, neg_beta, sign, SIZE: tl.constexpr,
                KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr, ONE_STEP: tl.constexpr,
                SAME_GROUP: tl.constexpr, SIMPLE_POW: tl.constexpr, RELU: tl.constexpr):
    """The unrolled backward: each thread holds 4 consecutive channels cb + v (v < 4) at one position, so
    the SIZE + 3 LRN outputs their mirror windows cover get their s, pow and pool gather once (not
    4 * SIZE times); every dx is the same expression, in the same order, as the per-input form."""
    BC: tl.constexpr = (BLOCK_C + 3) // 4
    pid = tl.program_id(0)
    S = H * W
    num_s = tl.cdiv(S, BLOCK_S)
    num_c = tl.cdiv(C, BLOCK_C)
    pid_s = pid % num_s
    c0 = ((pid // num_s) % num_c) * BLOCK_C
    n = pid // (num_s * num_c)
    q = tl.arange(0, BC)[:, None]
    cb = c0 + 4 * q
    c_end = tl.minimum(c0 + BLOCK_C, C)
    s = (pid_s * BLOCK_S + tl.arange(0, BLOCK_S))[None, :]
    s_ok = s < S
    sc = tl.minimum(s, S - 1)  # loads at clamped positions: in bounds, never stored
    h = sc // W
    w = sc % W
    x_row = x_ptr + n * sx_n + cb * sx_c + h * sx_h + w * sx_w
    # The candidate windows (oh, ow) = (h // SH, w // SW) - (th, tw) as offsets from the first one.
    arg_w = arg_ptr + n * sa_n + cb * sa_c + (h // SH) * sa_h + (w // SW) * sa_w
    dy_w = dy_ptr + n * sd_n + cb * sd_c + (h // SH) * sd_h + (w // SW) * sd_w
    lo0 = (cb // CG) * CG  # the one division by CG: the other groups are found from it (_group_lo)
    lo1 = _group_lo(cb, lo0, CG, 1, ONE_STEP, SAME_GROUP)
    lo2 = _group_lo(cb, lo0, CG, 2, ONE_STEP, SAME_GROUP)
    lo3 = _group_lo(cb, lo0, CG, 3, ONE_STEP, SAME_GROUP)
    hi0 = tl.minimum(lo0 + CG, C)
    hi1 = tl.minimum(lo1 + CG, C)
    hi2 = tl.minimum(lo2 + CG, C)
    hi3 = tl.minimum(lo3 + CG, C)
    x0 = _xload(x_row, cb, C, sx_c, 0, ACC, RELU)
    x1 = _xload(x_row, cb, C, sx_c, 1, ACC, RELU)
    x2 = _xload(x_row, cb, C, sx_c, 2, ACC, RELU)
    x3 = _xload(x_row, cb, C, sx_c, 3, ACC, RELU)
    acc0 = tl.zeros([BC, BLOCK_S], dtype=ACC)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    d0 = acc0
    d1 = acc0
    d2 = acc0
    d3 = acc0
    OFF_LO: tl.constexpr = -((SIZE - 1) // 2)
    OFF_HI: tl.constexpr = SIZE // 2
    # Mirror outputs cb + J in ascending J: each input's terms arrive in ascending offset, as there.
    for J in tl.static_range(OFF_LO, OFF_HI + 4):
        s_j, w_j, dr_j = _channel_quantities(x_row, arg_w, dy_w, cb, h, w, C, CG, OH, OW, sx_c, sd_c, sd_h, sd_w,
                                             sa_c, sa_h, sa_w, a, k_, neg_beta, sign, lo0, J, SIZE, KH, KW, SH, SW,
                                             BC, BLOCK_S, ACC, ONE_STEP, SAME_GROUP, SIMPLE_POW, RELU)
        acc0, acc1, acc2, acc3, d0, d1, d2, d3 = _mirror_step(
            J, OFF_LO, OFF_HI, s_j, w_j, dr_j, cb, acc0, acc1, acc2, acc3, d0, d1, d2, d3,
            lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3)
    g_row = dx_ptr + n * sg_n + cb * sg_c + h * sg_h + w * sg_w
    ty = dx_ptr.dtype.element_ty
    tl.store(g_row, _dx(d0, acc0, x0, a, neg_beta, SIMPLE_POW, RELU).to(ty), mask=(cb < c_end) & s_ok)
    tl.store(g_row + sg_c, _dx(d1, acc1, x1, a, neg_beta, SIMPLE_POW, RELU).to(ty), mask=(cb + 1 < c_end) & s_ok)
    tl.store(g_row + 2 * sg_c, _dx(d2, acc2, x2, a, neg_beta, SIMPLE_POW, RELU).to(ty), mask=(cb + 2 < c_end) & s_ok)
    tl.store(g_row + 3 * sg_c, _dx(d3, acc3, x3, a, neg_beta, SIMPLE_POW, RELU).to(ty), mask=(cb + 3 < c_end) & s_ok)


@triton.jit
def _gather_quad(arg_q, dy_q, ok, T, dz, ACC: tl.constexpr):
    """dz + dy where the window's argmax is this input's offset T in it, for a quad: both loads whole
    vectors (masked only by window and quad)."""
    return _hit(tl.load(arg_q, mask=ok, other=-1), tl.load(dy_q, mask=ok, other=0.0), T, dz, ACC)


@triton.jit
def _window_strip(arg_q, dy_q, ok, left_ok, mid_ok, right_ok, QPT: tl.constexpr):
    """One pool window's argmax and dy at a thread's strip of quads (the quad before, its QPT quads, the
    quad after; the second of QPT 2 repeats the first where QPT is 1), masked by window and quad."""
    a_l = tl.load(arg_q - 4, mask=ok & left_ok, other=-1)
    d_l = tl.load(dy_q - 4, mask=ok & left_ok, other=0.0)
    a_m = tl.load(arg_q, mask=ok & mid_ok, other=-1)
    d_m = tl.load(dy_q, mask=ok & mid_ok, other=0.0)
    a_m2 = a_m
    d_m2 = d_m
    if QPT == 2:
        a_m2 = tl.load(arg_q + 4, mask=ok & mid_ok, other=-1)
        d_m2 = tl.load(dy_q + 4, mask=ok & mid_ok, other=0.0)
    a_r = tl.load(arg_q + 4 * QPT, mask=ok & right_ok, other=-1)
    d_r = tl.load(dy_q + 4 * QPT, mask=ok & right_ok, other=0.0)
    return a_l, a_m, a_m2, a_r, d_l, d_m, d_m2, d_r


@triton.jit
def _strip_hits(a_l, a_m, a_m2, a_r, d_l, d_m, d_m2, d_r, T, dz_l, dz_m, dz_m2, dz_r, ACC: tl.constexpr,
                QPT: tl.constexpr):
    """_hit over a strip of quads (_window_strip's)."""
    dz_l = _hit(a_l, d_l, T, dz_l, ACC)
    dz_m = _hit(a_m, d_m, T, dz_m, ACC)
    if QPT == 2:
        dz_m2 = _hit(a_m2, d_m2, T, dz_m2, ACC)
    dz_r = _hit(a_r, d_r, T, dz_r, ACC)
    return dz_l, dz_m, dz_m2, dz_r


@triton.jit
def _quad_quantities(J: tl.constexpr, x_l0, x_l1, x_l2, x_l3, x_m0, x_m1, x_m2, x_m3, x_r0, x_r1, x_r2, x_r3,
                     dz_l0, dz_l1, dz_l2, dz_l3, dz_m0, dz_m1, dz_m2, dz_m3, dz_r0, dz_r1, dz_r2, dz_r3,
                     a, k_, neg_beta, sign, SIZE: tl.constexpr, B0: tl.constexpr, B1: tl.constexpr,
                     ACC: tl.constexpr, SIMPLE_POW: tl.constexpr):
    """_channel_quantities for channel cb + J from the thread's strips of x and dz (SIZE <= 5): the
    strips are already 0 outside cb's group, which is what its masks made of them."""
    s_c = k_ + a * _strip_sumsq(J, x_l0, x_l1, x_l2, x_l3, x_m0, x_m1, x_m2, x_m3, x_r0, x_r1, x_r2, x_r3, SIZE,
                                B0, B1, ACC)
    x_c = _pick(J, x_l0, x_l1, x_l2, x_l3, x_m0, x_m1, x_m2, x_m3, x_r0, x_r1, x_r2, x_r3)
    dz = _pick(J, dz_l0, dz_l1, dz_l2, dz_l3, dz_m0, dz_m1, dz_m2, dz_m3, dz_r0, dz_r1, dz_r2, dz_r3)
    r_c = _pow(s_c, neg_beta, sign, SIMPLE_POW)
    return s_c, dz * (x_c * r_c), dz * r_c


@triton.jit
def _quad_grad(x_l, x_m, x_r, dz_l, dz_m, dz_r, cb, lo, hi, a, k_, neg_beta, sign, SIZE: tl.constexpr,
               B0: tl.constexpr, B1: tl.constexpr, ACC: tl.constexpr, SIMPLE_POW: tl.constexpr, RELU: tl.constexpr):
    """dx [B0, B1, 4] of the quads cb .. cb + 3 ([1, B1]; their group [lo, hi)) from x and the routed
    pool gradient dz at the quads before (l), at (m) and after (r) them, each [B0, B1, 4] and 0
    outside the group: _bwd_shared's expressions, in its order."""
    x_l0, x_l1, x_l2, x_l3 = _split4(x_l, B0, B1)
    x_m0, x_m1, x_m2, x_m3 = _split4(x_m, B0, B1)
    x_r0, x_r1, x_r2, x_r3 = _split4(x_r, B0, B1)
    dz_l0, dz_l1, dz_l2, dz_l3 = _split4(dz_l, B0, B1)
    dz_m0, dz_m1, dz_m2, dz_m3 = _split4(dz_m, B0, B1)
    dz_r0, dz_r1, dz_r2, dz_r3 = _split4(dz_r, B0, B1)
    acc0 = tl.zeros([B0, B1], dtype=ACC)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    d0 = acc0
    d1 = acc0
    d2 = acc0
    d3 = acc0
    OFF_LO: tl.constexpr = -((SIZE - 1) // 2)
    OFF_HI: tl.constexpr = SIZE // 2
    # As _bwd_shared: mirror outputs cb + J in ascending J.
    for J in tl.static_range(OFF_LO, OFF_HI + 4):
        s_j, w_j, dr_j = _quad_quantities(J, x_l0, x_l1, x_l2, x_l3, x_m0, x_m1, x_m2, x_m3, x_r0, x_r1, x_r2, x_r3,
                                          dz_l0, dz_l1, dz_l2, dz_l3, dz_m0, dz_m1, dz_m2, dz_m3,
                                          dz_r0, dz_r1, dz_r2, dz_r3, a, k_, neg_beta, sign, SIZE, B0, B1,
                                          ACC, SIMPLE_POW)
        acc0, acc1, acc2, acc3, d0, d1, d2, d3 = _mirror_step(
            J, OFF_LO, OFF_HI, s_j, w_j, dr_j, cb, acc0, acc1, acc2, acc3, d0, d1, d2, d3,
            lo, hi, lo, hi, lo, hi, lo, hi)
    return _join4(_dx(d0, acc0, x_m0, a, neg_beta, SIMPLE_POW, RELU),
                  _dx(d1, acc1, x_m1, a, neg_beta, SIMPLE_POW, RELU),
                  _dx(d2, acc2, x_m2, a, neg_beta, SIMPLE_POW, RELU),
                  _dx(d3, acc3, x_m3, a, neg_beta, SIMPLE_POW, RELU), B0, B1)


@triton.jit
def _strip_x(x_q, left_ok, mid_ok, right_ok, ACC: tl.constexpr, RELU: tl.constexpr, QPT: tl.constexpr):
    """relu(x) at a thread's strip of quads from its first quad x_q: the quad before, its QPT quads (the
    second repeats the first where QPT is 1), the quad after."""
    x_l = _load_quad(x_q - 4, left_ok, ACC, RELU)
    x_m = _load_quad(x_q, mid_ok, ACC, RELU)
    x_m2 = x_m
    if QPT == 2:
        x_m2 = _load_quad(x_q + 4, mid_ok, ACC, RELU)
    x_r = _load_quad(x_q + 4 * QPT, right_ok, ACC, RELU)
    return x_l, x_m, x_m2, x_r


@triton.jit
def _strip_dx(g_q, out, x_l, x_m, x_m2, x_r, dz_l, dz_m, dz_m2, dz_r, cb, lo, hi, a, k_, neg_beta, sign,
              SIZE: tl.constexpr, B0: tl.constexpr, B1: tl.constexpr, ACC: tl.constexpr, SIMPLE_POW: tl.constexpr,
              RELU: tl.constexpr, QPT: tl.constexpr):
    """Stores dx of a thread's QPT quads (from cb; at g_q, where `out`) from x and dz at its strip. With QPT 2
    the two quads' 12-channel strips overlap in 8 channels, whose LRN quantities (sums, powers, gathered
    gradients) the compiler computes once for both: 12 sets for 8 inputs instead of 8 for 4."""
    g = _quad_grad(x_l, x_m, x_m2, dz_l, dz_m, dz_m2, cb, lo, hi, a, k_, neg_beta, sign, SIZE, B0, B1, ACC,
                   SIMPLE_POW, RELU)
    if QPT == 2:
        tl.store(g_q, g.to(g_q.dtype.element_ty), mask=out)
        g = _quad_grad(x_m, x_m2, x_r, dz_m, dz_m2, dz_r, cb + 4, lo, hi, a, k_, neg_beta, sign, SIZE, B0, B1,
                       ACC, SIMPLE_POW, RELU)
        tl.store(g_q + 4, g.to(g_q.dtype.element_ty), mask=out)
    else:
        g = _quad_grad(x_l, x_m, x_r, dz_l, dz_m, dz_r, cb, lo, hi, a, k_, neg_beta, sign, SIZE, B0, B1, ACC,
                       SIMPLE_POW, RELU)
        tl.store(g_q, g.to(g_q.dtype.element_ty), mask=out)


@triton.jit
def _bwd_quads(dy_ptr, arg_ptr, x_ptr, dx_ptr, C, H, W, OH, OW, CG,
               sd_n, sd_h, sd_w, sa_n, sa_h, sa_w, sx_n, sx_h, sx_w, sg_n, sg_h, sg_w,
               a, k_, neg_beta, sign, SIZE: tl.constexpr,
               KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
               BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr, SIMPLE_POW: tl.constexpr,
               RELU: tl.constexpr, PAIRS: tl.constexpr):
    """_bwd_shared where channels are contiguous in whole quads a group (as _fwd_quads; SIZE <= 5): a
    thread takes a quad (two adjacent quads of one group with PAIRS: C and CG multiples of 8) of one
    position and loads x as vectors, its quads and the quads either side, and each pool window's
    argmax and dy the same way, masked a whole quad at a time; then the same expressions in the same
    order (_strip_dx). Tiles are [BLOCK_S positions, BLOCK_C // (4 or 8) threads, 4]."""
    QPT: tl.constexpr = 2 if PAIRS else 1  # quads a thread
    BQ: tl.constexpr = BLOCK_C // (4 * QPT)
    S = H * W
    n = tl.program_id(2)  # a 3-D grid, as _fwd_quads
    cb = tl.program_id(1) * BLOCK_C + 4 * QPT * tl.arange(0, BQ)[None, :]  # [1, BQ]: the thread's first channel
    s = (tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S))[:, None]  # [BLOCK_S, 1]
    sc = tl.minimum(s, S - 1)  # loads at clamped positions: in bounds, never stored
    h = sc // W
    w = sc % W
    lo, left_ok, mid_ok, right_ok = _quad_masks(cb, C, CG, QPT)
    e = tl.arange(0, 4)[None, None, :]
    x_l, x_m, x_m2, x_r = _strip_x((x_ptr + n * sx_n + h * sx_h + w * sx_w + cb)[:, :, None] + e,
                                   left_ok, mid_ok, right_ok, ACC, RELU, QPT)
    # The pool gradient routed to the strip's channels: the candidate windows as in _routed_grad.
    arg_q = (arg_ptr + n * sa_n + (h // SH) * sa_h + (w // SW) * sa_w + cb)[:, :, None] + e
    dy_q = (dy_ptr + n * sd_n + (h // SH) * sd_h + (w // SW) * sd_w + cb)[:, :, None] + e
    dz_l = tl.zeros([BLOCK_S, BQ, 4], ACC)
    dz_m = dz_l
    dz_m2 = dz_l
    dz_r = dz_l
    for th in tl.static_range((KH + SH - 1) // SH):
        oh = h // SH - th
        kh = h - oh * SH
        h_ok = (oh >= 0) & (oh < OH) & (kh < KH)
        for tw in tl.static_range((KW + SW - 1) // SW):
            ow = w // SW - tw
            kw = w - ow * SW
            ok = (h_ok & (ow >= 0) & (ow < OW) & (kw < KW))[:, :, None]
            a_l, a_m, a_m2, a_r, d_l, d_m, d_m2, d_r = _window_strip(
                arg_q - (th * sa_h + tw * sa_w), dy_q - (th * sd_h + tw * sd_w), ok, left_ok, mid_ok, right_ok, QPT)
            dz_l, dz_m, dz_m2, dz_r = _strip_hits(a_l, a_m, a_m2, a_r, d_l, d_m, d_m2, d_r, (kh * KW + kw)[:, :, None],
                                                  dz_l, dz_m, dz_m2, dz_r, ACC, QPT)
    g_q = (dx_ptr + n * sg_n + h * sg_h + w * sg_w + cb)[:, :, None] + e
    _strip_dx(g_q, (s < S)[:, :, None] & mid_ok, x_l, x_m, x_m2, x_r, dz_l, dz_m, dz_m2, dz_r, cb, lo, lo + CG,
              a, k_, neg_beta, sign, SIZE, BLOCK_S, BQ, ACC, SIMPLE_POW, RELU, QPT)


@triton.jit
def _cell_dx(I: tl.constexpr, J: tl.constexpr, x_ptr, dx_ptr, n, ci, cj, inside, H, W, sx_n, sx_h, sx_w,
             sg_n, sg_h, sg_w, dz_l, dz_m, dz_m2, dz_r, cb, lo, left_ok, mid_ok, right_ok, a, k_, neg_beta, sign,
             CG, SIZE: tl.constexpr, B0: tl.constexpr, B1: tl.constexpr, ACC: tl.constexpr,
             SIMPLE_POW: tl.constexpr, RELU: tl.constexpr, QPT: tl.constexpr):
    """dx at position (I, J) of the threads' cells (2 ci + I, 2 cj + J), from its gathered dz."""
    h = 2 * ci + I
    w = 2 * cj + J
    e = tl.arange(0, 4)[None, None, :]
    # x at clamped positions: in bounds, never stored
    x_q = (x_ptr + n * sx_n + tl.minimum(h, H - 1) * sx_h + tl.minimum(w, W - 1) * sx_w + cb)[:, :, None] + e
    x_l, x_m, x_m2, x_r = _strip_x(x_q, left_ok, mid_ok, right_ok, ACC, RELU, QPT)
    out = (inside & (h < H) & (w < W))[:, :, None] & mid_ok
    _strip_dx((dx_ptr + n * sg_n + h * sg_h + w * sg_w + cb)[:, :, None] + e, out, x_l, x_m, x_m2, x_r,
              dz_l, dz_m, dz_m2, dz_r, cb, lo, lo + CG, a, k_, neg_beta, sign, SIZE, B0, B1, ACC, SIMPLE_POW, RELU,
              QPT)


@triton.jit
def _bwd_cells(dy_ptr, arg_ptr, x_ptr, dx_ptr, C, H, W, OH, OW, CG,
               sd_n, sd_h, sd_w, sa_n, sa_h, sa_w, sx_n, sx_h, sx_w, sg_n, sg_h, sg_w,
               a, k_, neg_beta, sign, SIZE: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
               BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr, SIMPLE_POW: tl.constexpr,
               RELU: tl.constexpr, PAIRS: tl.constexpr):
    """_bwd_quads for a pool of stride 2 both ways and windows of at most 4: a thread takes a cell of
    2 x 2 input positions (2 ci + I, 2 cj + J). Every position of a cell has the same candidate windows
    (oh = ci - t, ow = cj - u; t, u in 0, 1), and each position's offset in each of them is known when
    compiling (2 t + I, 2 u + J), so the thread loads a window's argmax and dy once for its 4 positions
    and tests only the pairs that can hit: 9 for a 3x3 window, where one position a thread loads 4
    windows and tests all 4. Each position's dz adds its windows in _bwd_quads' order, bit for bit.
    Tiles are [BLOCK_S cells, BLOCK_C // (4 or 8) threads, 4]."""
    QPT: tl.constexpr = 2 if PAIRS else 1
    BQ: tl.constexpr = BLOCK_C // (4 * QPT)
    CW = (W + 1) // 2
    NCELL = ((H + 1) // 2) * CW
    n = tl.program_id(2)
    cb = tl.program_id(1) * BLOCK_C + 4 * QPT * tl.arange(0, BQ)[None, :]
    s = (tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S))[:, None]
    sc = tl.minimum(s, NCELL - 1)
    ci = sc // CW
    cj = sc % CW
    lo, left_ok, mid_ok, right_ok = _quad_masks(cb, C, CG, QPT)
    e = tl.arange(0, 4)[None, None, :]
    arg_q = (arg_ptr + n * sa_n + ci * sa_h + cj * sa_w + cb)[:, :, None] + e
    dy_q = (dy_ptr + n * sd_n + ci * sd_h + cj * sd_w + cb)[:, :, None] + e
    z = tl.zeros([BLOCK_S, BQ, 4], ACC)
    # dz of the cell's positions (00, 01, 10, 11) at the strip's quads (l, m, m2, r)
    dz00_l, dz00_m, dz00_m2, dz00_r = z, z, z, z
    dz01_l, dz01_m, dz01_m2, dz01_r = z, z, z, z
    dz10_l, dz10_m, dz10_m2, dz10_r = z, z, z, z
    dz11_l, dz11_m, dz11_m2, dz11_r = z, z, z, z
    for t in tl.static_range((KH + 1) // 2):
        for u in tl.static_range((KW + 1) // 2):
            ok = ((ci >= t) & (ci - t < OH) & (cj >= u) & (cj - u < OW))[:, :, None]
            a_l, a_m, a_m2, a_r, d_l, d_m, d_m2, d_r = _window_strip(
                arg_q - (t * sa_h + u * sa_w), dy_q - (t * sd_h + u * sd_w), ok, left_ok, mid_ok, right_ok, QPT)
            dz00_l, dz01_l, dz10_l, dz11_l = _cell_hits(a_l, d_l, t, u, KH, KW, dz00_l, dz01_l, dz10_l, dz11_l, ACC)
            dz00_m, dz01_m, dz10_m, dz11_m = _cell_hits(a_m, d_m, t, u, KH, KW, dz00_m, dz01_m, dz10_m, dz11_m, ACC)
            if QPT == 2:
                dz00_m2, dz01_m2, dz10_m2, dz11_m2 = _cell_hits(a_m2, d_m2, t, u, KH, KW,
                                                                dz00_m2, dz01_m2, dz10_m2, dz11_m2, ACC)
            dz00_r, dz01_r, dz10_r, dz11_r = _cell_hits(a_r, d_r, t, u, KH, KW, dz00_r, dz01_r, dz10_r, dz11_r, ACC)
    inside = s < NCELL
    _cell_dx(0, 0, x_ptr, dx_ptr, n, ci, cj, inside, H, W, sx_n, sx_h, sx_w, sg_n, sg_h, sg_w,
             dz00_l, dz00_m, dz00_m2, dz00_r, cb, lo, left_ok, mid_ok, right_ok, a, k_, neg_beta, sign, CG, SIZE,
             BLOCK_S, BQ, ACC, SIMPLE_POW, RELU, QPT)
    _cell_dx(0, 1, x_ptr, dx_ptr, n, ci, cj, inside, H, W, sx_n, sx_h, sx_w, sg_n, sg_h, sg_w,
             dz01_l, dz01_m, dz01_m2, dz01_r, cb, lo, left_ok, mid_ok, right_ok, a, k_, neg_beta, sign, CG, SIZE,
             BLOCK_S, BQ, ACC, SIMPLE_POW, RELU, QPT)
    _cell_dx(1, 0, x_ptr, dx_ptr, n, ci, cj, inside, H, W, sx_n, sx_h, sx_w, sg_n, sg_h, sg_w,
             dz10_l, dz10_m, dz10_m2, dz10_r, cb, lo, left_ok, mid_ok, right_ok, a, k_, neg_beta, sign, CG, SIZE,
             BLOCK_S, BQ, ACC, SIMPLE_POW, RELU, QPT)
    _cell_dx(1, 1, x_ptr, dx_ptr, n, ci, cj, inside, H, W, sx_n, sx_h, sx_w, sg_n, sg_h, sg_w,
             dz11_l, dz11_m, dz11_m2, dz11_r, cb, lo, left_ok, mid_ok, right_ok, a, k_, neg_beta, sign, CG, SIZE,
             BLOCK_S, BQ, ACC, SIMPLE_POW, RELU, QPT)


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
    ONE_STEP: tl.constexpr,  # every channel offset a thread's window spans is below CG (_group_lo)
    SAME_GROUP: tl.constexpr,  # a thread's 4 channels (from a multiple of 4) in one group: CG % 4 == 0
    SIMPLE_POW: tl.constexpr,  # kernels.lrn._pow
    RELU: tl.constexpr,  # the forward's input ReLU: dx is the gradient of relu's input
    QUADS: tl.constexpr,  # channels contiguous in whole quads (_bwd_quads)
    PAIRS: tl.constexpr,  # _bwd_quads with two quads a thread
    CELLS: tl.constexpr,  # _bwd_quads in cells of 2 x 2 positions (_bwd_cells)
):
    a = _scalar(alpha_over_size, ACC)
    neg_beta = -_scalar(beta, ACC)
    k_ = _scalar(k, ACC)
    sign = _scalar(neg_sign, ACC)
    if CELLS:
        _bwd_cells(dy_ptr, arg_ptr, x_ptr, dx_ptr, C, H, W, OH, OW, CG,
                   sd_n, sd_h, sd_w, sa_n, sa_h, sa_w, sx_n, sx_h, sx_w, sg_n, sg_h, sg_w,
                   a, k_, neg_beta, sign, SIZE, KH, KW, BLOCK_C, BLOCK_S, ACC, SIMPLE_POW, RELU, PAIRS)
    elif QUADS:
        _bwd_quads(dy_ptr, arg_ptr, x_ptr, dx_ptr, C, H, W, OH, OW, CG,
                   sd_n, sd_h, sd_w, sa_n, sa_h, sa_w, sx_n, sx_h, sx_w, sg_n, sg_h, sg_w,
                   a, k_, neg_beta, sign, SIZE, KH, KW, SH, SW, BLOCK_C, BLOCK_S, ACC, SIMPLE_POW, RELU, PAIRS)
    elif UNROLL:
        _bwd_shared(dy_ptr, arg_ptr, x_ptr, dx_ptr, N, C, H, W, OH, OW, CG,
                    sd_n, sd_c, sd_h, sd_w, sa_n, sa_c, sa_h, sa_w, sx_n, sx_c, sx_h, sx_w, sg_n, sg_c, sg_h, sg_w,
                    a, k_, neg_beta, sign, SIZE, KH, KW, SH, SW, BLOCK_C, BLOCK_S, ACC, ONE_STEP, SAME_GROUP,
                    SIMPLE_POW, RELU)
    else:
        n, c, s, c_mask, s_mask, lo, hi = _tile(N, C, H * W, CG, BLOCK_C, BLOCK_S)
        mask = c_mask & s_mask
        h = s // W
        w = s % W
        x_base = x_ptr + n * sx_n
        dy_base = dy_ptr + n * sd_n
        arg_base = arg_ptr + n * sa_n
        x_soff = h * sx_h + w * sx_w
        x_i = _relu(tl.load(x_base + c * sx_c + x_soff, mask=mask, other=0.0).to(ACC), RELU)
        # The outputs cc = i + off in M(i); the one with off = 0 also gives the direct term dz_i * s_i^(-beta)
        # (SIZE window sums and SIZE gathers in all, for one uniform loop).
        acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
        direct = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
        # A loop, not SIZE copies (large windows): compile time stays flat.
        for m in range(SIZE):
            off = m - (SIZE - 1) // 2
            term, d = _mirror_terms(x_base, dy_base, arg_base, c, h, w, x_soff, s_mask, lo, hi, OH, OW,
                                    sx_c, sd_c, sd_h, sd_w, sa_c, sa_h, sa_w, off,
                                    a, k_, neg_beta, sign, SIZE, KH, KW, SH, SW, BLOCK_C, BLOCK_S, ACC, UNROLL,
                                    SIMPLE_POW, RELU)
            acc += term
            direct += tl.where(off == 0, d, 0.0)
        dx = _relu_grad(direct + _cross(x_i, acc, a, neg_beta, SIMPLE_POW), x_i, RELU)
        tl.store(dx_ptr + n * sg_n + c * sg_c + h * sg_h + w * sg_w, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers

# The forward in cells: at most 168 registers a thread, so 3 tiles of 128 threads fit an SM (65536
# registers) whatever ptxas would pick: Triton 3.6's takes 179 in fp32 (2 tiles), 3.9's 153-160; capped,
# 150-167 and no spills in either (perf.static). Not the backward: capped, ptxas takes more than the
# 116-138 it picks (3 tiles an SM instead of 4 in fp32).
FWD_CELLS_MAXNREG = 168


def _quads(size: int, groups: int, *tensors: torch.Tensor, backward: bool = False) -> int:
    """The channels a thread of _fwd_quads / _bwd_quads takes in this launch, 0 where it cannot: 4
    (the backward 8, two quads, where C and C/groups are multiples of 8), given channels contiguous in
    every tensor, whole quads a group, the LRN windows the kernel needs within the neighbouring quads
    (size 9 forward, 5 backward: a quad's strip of 12 channels holds the windows of 8), and the
    samples within a grid axis."""
    N, C = tensors[0].shape[:2]
    if not (all(t.stride(1) == 1 for t in tensors) and C % 4 == 0 and (C // groups) % 4 == 0
            and size <= (5 if backward else 9) and N <= MAX_GRID_YZ):
        return 0
    return 8 if backward and C % 8 == 0 and (C // groups) % 8 == 0 else 4


def _cells(kernel_size: tuple[int, int], stride: tuple[int, int]) -> bool:
    """Whether the quads kernels take cells of 2 x 2 positions (_fwd_cells, _bwd_cells): stride 2 both
    ways, windows of at most 4 (pools_in_cells)."""
    return pools_in_cells(kernel_size, stride)


def _grid(N: int, C: int, P: int, block_c: int, block_p: int, quads: int) -> tuple[int, ...]:
    """The quads kernels' 3-D grid (position blocks, channel blocks, samples), else one flat axis."""
    if quads:
        return (cdiv(P, block_p), cdiv(C, block_c), N)
    return (N * cdiv(C, block_c) * cdiv(P, block_p),)


def _block_sizes(C: int, P: int, backward: bool = False, quads: int = 0, cells: bool = False) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_P, num_warps), powers of two; P is the pooled (forward) or input (backward) plane,
    or the backward's cells. quads: the channels a thread of the quads kernels takes (_quads), 0 for the
    others; cells: the backward's 2 x 2 cells a thread (_cells)."""
    if quads and not _common.is_interpreting():
        # 256 threads (8 warps) a tile where the plane has the positions (~75 registers a thread); in
        # cells (4 positions a thread, ~120-135 registers) 128: 3 tiles an SM, where 256 fit one
        threads = 128 if cells else 256
        block_c = max(_channel_block(C), quads)
        block_p = min(_common.next_pow2(P), max(threads * quads // block_c, 1))
        return block_c, block_p, max(1, min(8, block_c * block_p // (32 * quads)))
    if _common.is_interpreting():
        # The interpreter's cost is per program: as few, large tiles as possible.
        block_c = min(_common.next_pow2(C), 256)
        block_p = min(_common.next_pow2(P), max(2**15 // block_c, 1))
        return block_c, block_p, 4
    block_c = _channel_block(C)  # as kernels/lrn.py
    # Elements a thread from ptxas on sm_90 (size 5, 3x3/2): registers grow with them (ptxas keeps
    # every tap's loads in flight): forward 1 / 2 / 4 a thread ~40 / 80-90 / 130-165 registers. The
    # unrolled backward gives each thread 4 consecutive channels of one position (_bwd_shared), ~105
    # registers; fewer threads than tile / 4 would replicate its work.
    tile, per_thread = (1024, 4) if backward else (512, 2)
    block_c = min(block_c, tile // 16)  # at least 16 positions a tile (coalesced NCHW rows)
    block_p = min(_common.next_pow2(P), max(tile // block_c, 16))
    num_warps = max(1, min(8, block_c * block_p // (32 * per_thread)))
    return block_c, block_p, num_warps


def _assert_args(x: torch.Tensor, size, groups, kernel_size, stride) -> None:
    """The launchers' preconditions (fastalex.ops.lrn_maxpool2d checks them for users and raises), and
    the int32 limit on x (raised)."""
    assert _common.takes(x, 4), "x: a 4-D float tensor"
    assert isinstance(size, int) and size >= 1, f"size={size!r}"
    C, H, W = x.shape[1:]
    assert isinstance(groups, int) and groups >= 1 and C % groups == 0, f"groups={groups!r}, {C} channels"
    assert len(kernel_size) == len(stride) == 2 and min(*kernel_size, *stride) >= 1
    assert C > 0 and H >= kernel_size[0] and W >= kernel_size[1], f"x {tuple(x.shape)}, kernel_size {kernel_size}"
    _common.check_int32("x", x)


def _lrn_consts(size: int, alpha: float, beta: float, k: float) -> tuple[float, float, float, float]:
    return float(alpha) / size, float(beta), float(k), _neg_sign(-float(beta))


def lrn_maxpool2d_forward(x: torch.Tensor, size: int, alpha: float, beta: float, k: float, groups: int = 1,
                          kernel_size=(3, 3), stride=(2, 2), relu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, C, H, W) -> (y, argmax), both (N, C, OH, OW) in x's memory format (as torch's max_pool2d):
    y = max_pool2d(local_response_norm(x, size, alpha, beta, k, groups), kernel_size, stride), argmax the
    window offset kh * KW + kw of each maximum (int8). relu: of relu(x) instead (x is then the
    pre-activation, and no ReLU output is ever written)."""
    kernel_size, stride = tuple(kernel_size), tuple(stride)
    _assert_args(x, size, groups, kernel_size, stride)
    N, C, H, W = x.shape
    OH, OW = output_size(H, W, kernel_size, stride)
    fmt = suggest_memory_format(x)
    y = _common.empty((N, C, OH, OW), dtype=x.dtype, device=x.device, memory_format=fmt)
    arg = _common.empty((N, C, OH, OW), dtype=argmax_dtype(kernel_size), device=x.device, memory_format=fmt)
    if y.numel() == 0:
        return y, arg
    quads = _quads(size, groups, x, y, arg)
    cells = bool(quads) and _cells(kernel_size, stride)
    P = cdiv(OH, 2) * cdiv(OW, 2) if cells else OH * OW  # the threads' outputs, or cells
    block_c, block_p, num_warps = _block_sizes(C, P, quads=quads, cells=cells)
    assert block_c & (block_c - 1) == 0 and block_p & (block_p - 1) == 0, "blocks must be powers of two"
    grid = _grid(N, C, P, block_c, block_p, quads)
    _lrn_maxpool2d_fwd_kernel[grid](
        x, y, arg, N, C, OH, OW, C // groups, *x.stride(), *y.stride(), *arg.stride(),
        *_lrn_consts(size, alpha, beta, k),
        SIZE=size, KH=kernel_size[0], KW=kernel_size[1], SH=stride[0], SW=stride[1],
        BLOCK_C=block_c, BLOCK_P=block_p, ACC=_common.acc_dtype(x.dtype), UNROLL=size <= MAX_UNROLL,
        SIMPLE_POW=simple_pow(size, alpha, beta, k), RELU=bool(relu), QUADS=quads > 0, CELLS=cells,
        num_warps=num_warps, **({"maxnreg": FWD_CELLS_MAXNREG} if cells else {}),
    )
    return y, arg


def lrn_maxpool2d_backward(dy: torch.Tensor, x: torch.Tensor, argmax: torch.Tensor, size: int, alpha: float,
                           beta: float, k: float, groups: int = 1, kernel_size=(3, 3), stride=(2, 2),
                           relu: bool = False) -> torch.Tensor:
    """dx of lrn_maxpool2d_forward (with the same relu: then the gradient of the ReLU's input x, masked
    as torch's relu backward masks it). dy, argmax: (N, C, OH, OW), any strides; x: (N, C, H, W); dx:
    like x (torch.empty_like's layout)."""
    kernel_size, stride = tuple(kernel_size), tuple(stride)
    _assert_args(x, size, groups, kernel_size, stride)
    N, C, H, W = x.shape
    OH, OW = output_size(H, W, kernel_size, stride)
    pooled = (N, C, OH, OW)
    assert _common.takes(dy, 4) and _common.same(x, dy) and tuple(dy.shape) == pooled, f"dy: pooled shape {pooled}"
    assert _common.takes(argmax, 4, dtypes=(argmax_dtype(kernel_size),)) and tuple(argmax.shape) == pooled
    assert argmax.device == x.device
    _common.check_int32("dy", dy)
    _common.check_int32("argmax", argmax)
    dx = _common.empty_like(x)
    if dx.numel() == 0:
        return dx
    quads = _quads(size, groups, x, dx, dy, argmax, backward=True)
    cells = bool(quads) and _cells(kernel_size, stride)
    S = cdiv(H, 2) * cdiv(W, 2) if cells else H * W  # the threads' positions, or cells
    block_c, block_s, num_warps = _block_sizes(C, S, backward=True, quads=quads, cells=cells)
    assert block_c & (block_c - 1) == 0 and block_s & (block_s - 1) == 0, "blocks must be powers of two"
    grid = _grid(N, C, S, block_c, block_s, quads)
    _lrn_maxpool2d_bwd_kernel[grid](
        dy, argmax, x, dx, N, C, H, W, OH, OW, C // groups,
        *dy.stride(), *argmax.stride(), *x.stride(), *dx.stride(),
        *_lrn_consts(size, alpha, beta, k),
        SIZE=size, KH=kernel_size[0], KW=kernel_size[1], SH=stride[0], SW=stride[1],
        BLOCK_C=block_c, BLOCK_S=block_s, ACC=_common.acc_dtype(x.dtype), UNROLL=size <= MAX_UNROLL,
        SIMPLE_POW=simple_pow(size, alpha, beta, k),
        ONE_STEP=C // groups > size // 2 + 3,  # the offsets -(size-1)//2 .. size//2 + 3 of _bwd_shared
        # (threads start at multiples of 4 where the channel block is; AlexNet's groups: 48-256 channels)
        SAME_GROUP=(C // groups) % 4 == 0 and block_c % 4 == 0, RELU=bool(relu), QUADS=quads > 0,
        PAIRS=quads == 8, CELLS=cells,
        num_warps=num_warps,
    )
    return dx
