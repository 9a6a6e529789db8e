"""2-D convolution as implicit GEMM, forward and backward, with bias and a fused ReLU.

Shapes (g = groups, Cig = C_in / g, Cog = C_out / g):
  x (N, C_in, H, W), w (C_out, Cig, KH, KW), b (C_out,), y (N, C_out, OH, OW), any strides.

  forward  y  = relu?(x * w + b)          GEMM  M = N*OH*OW   N = Cog       K = (KH, KW, Cig)
  dgrad    dx = dy' *^T w                  GEMM  M = N*H*W     N = Cig       K = (KH, KW, Cog)
  wgrad    dw = dy'^T * x,  db = sum dy'   GEMM  M = Cog       N = Cig*KH*KW K = N*OH*OW (split-K)
                                                     N as (ci, kh, kw), or (kh, kw, ci) for NHWC x

dy' = dy masked by the ReLU (zero where y <= 0): the ops apply it once with torch's
threshold_backward before both gradient GEMMs (one pass over dy, where masking inside dgrad would
re-read y once per kernel tap), so the gradient kernels take dy' as it is. Groups are a grid axis. Padding is implicit (masked loads), so
any top/left padding plus an explicit output size covers torch's asymmetric 'same' padding.
Accumulation is fp32 (fp64 for fp64 inputs; tl.dot gets out_dtype=ACC, as Triton 3.6 rejects an fp64 acc otherwise).

Deterministic, forward and backward: no atomics; each shape's tiles and split are fixed (chosen from
the shape and the GPU's SM count, never by timing), and the split-K partials of the weight and bias
gradients are summed in a fixed order (_sum_splits_kernel): the same inputs on the same GPU give
bit-identical results, with or without torch.use_deterministic_algorithms.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastalex.kernels._common import (
    acc_dtype,
    cdiv,
    check_int32,
    dot_precision,
    dot_upcast,
    empty,
    is_16bit,
    is_interpreting,
    next_pow2,
    same,
    takes,
)

# Hopper's shared memory per block; a config's pipelined tiles must fit in it.
SMEM_LIMIT = 227 * 1024


@triton.jit
def _dot(acc, a, b, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a @ b (a, b upcast to fp32 where the interpreter's bf16 dot is wrong)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def _conv2d_fwd_kernel(
    x_ptr,  # (N, C_in, H, W)
    w_ptr,  # (C_out, Cig, KH, KW)
    b_ptr,  # (C_out,) or unused
    y_ptr,  # (N, C_out, OH, OW)
    H, W, OH, OW, Cig, Cog, M,  # M = N*OH*OW
    sxn, sxc, sxh, sxw,
    swo, swc, swh, sww,
    syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH, KW,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, TAP_BLOCKS: tl.constexpr,  # TAP_BLOCKS: Cig % BLOCK_K == 0
    ROW_BLOCKS: tl.constexpr,  # a K block is one kernel row: (kw, c) contiguous in x and w, KW*Cig <= BLOCK_K
    IN_BOUNDS: tl.constexpr,  # no padding: every tap of every output position lies in x (_in_bounds)
    ROW_TAIL: tl.constexpr,  # 0, or ROW_BLOCKS with BLOCK_K < KW*Cig: the rows' rest in one block of ROW_TAIL
    Y_DENSE: tl.constexpr,  # syn == OH * syh and syh == OW * syw (channels_last): position m of y at m * syw
    BLOCK_N2: tl.constexpr,  # 0, or a second column tile after the first (_split_n: BLOCK_N // 2; _row_tail_n)
    TAP_BITS: tl.constexpr,  # TAP_BLOCKS with padding, KH*KW <= 32: each position's valid taps as bits (_tap_bits)
    X_NEXT: tl.constexpr,  # ROW_TAIL, IN_BOUNDS, x through registers (16-bit): the next row's x loaded a trip ahead
    ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output positions (n, oh, ow)
    offs_n = pid_n * (BLOCK_N + BLOCK_N2) + tl.arange(0, BLOCK_N)  # output channels within group g
    mask_n = offs_n < Cog
    mask_m = offs_m < M
    if ROW_TAIL > 0:
        # The loads' rows and columns clamped into the tensors (see ROW_TAIL below): no load masks.
        m_in = tl.minimum(offs_m, M - 1)
        n_in = tl.minimum(offs_n, Cog - 1)
    else:
        m_in = offs_m
        n_in = offs_n
    if BLOCK_N2 > 0:
        # 3 x 2^k columns (the launcher's _split_n: 192 for 384 or 192 channels): no empty quarter tile.
        offs_n2 = pid_n * (BLOCK_N + BLOCK_N2) + BLOCK_N + tl.arange(0, BLOCK_N2)
        mask_n2 = offs_n2 < Cog
        w_cols2 = w_ptr + (g * Cog + (tl.minimum(offs_n2, Cog - 1) if ROW_TAIL > 0 else offs_n2)) * swo
        acc2 = tl.zeros((BLOCK_M, BLOCK_N2), dtype=ACC)
    n = m_in // (OH * OW)
    ohw = m_in % (OH * OW)
    ih0 = (ohw // OW) * stride_h - pad_h
    iw0 = (ohw % OW) * stride_w - pad_w
    x_rows = x_ptr + n * sxn + g * Cig * sxc  # (BLOCK_M,)
    w_cols = w_ptr + (g * Cog + n_in) * swo  # (BLOCK_N,)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    # K is flattened as (kh, kw, c), c fastest: a K block may span several taps, so few-channel
    # layers (conv1: 3 channels, 11x11 taps) waste no K steps, while for wide layers a block is a
    # run of channels at one tap (contiguous in NHWC).
    K_total = KH * KW * Cig
    if ROW_BLOCKS:
        # Few channels, channels contiguous (conv1: 3 channels, 11x11 taps, NHWC): one K block is one
        # kernel row kh, and along it (kw, c) is a contiguous run of KW*Cig elements in x (at the
        # window's left edge) and in the channels_last weight. So the block's addresses are a 1-D row
        # start plus j, and the padding test along the row, 0 <= iw0*Cig + j < W*Cig (c < Cig keeps
        # kw = j // Cig in step), is the same for every kh: computed once, no division in the loop.
        j = tl.arange(0, BLOCK_K)
        col0 = iw0 * Cig
        a_rows = x_rows + iw0 * sxw  # sxw == Cig, sxc == 1
        if ROW_TAIL > 0:
            # (_row_block_k) A row of 33 padded to 64 left half the block's loads and MMA empty; in
            # bf16 each a 2-byte load with its own mask bit and zero fill (rows start at unaligned
            # 6-byte steps: no vector or cp.async copies). Here the loop takes each row's
            # first BLOCK_K elements (32 of 33: no padding, so no column mask), rows past M read
            # position M - 1 and columns past Cog filter Cog - 1 (the store drops both), so the loop's
            # loads carry no mask at all; one ROW_TAIL block after the loop takes what is left of
            # every row (conv1: its last element, 11 rows -> 16). The launcher makes the second column
            # tile BLOCK_K wide (_row_tail_n): its y store gives the x tile 8 consecutive elements a
            # thread, one address a row and immediate offsets (perf.static: 394 -> 98 instructions a trip).
            a_rows = a_rows + ih0 * sxh
            w_tile = w_cols[None, :] + j[:, None]
            if BLOCK_N2 > 0:
                w_tile2 = w_cols2[None, :] + j[:, None]
            if X_NEXT:
                # 16-bit x's rows start at 2-byte steps: no cp.async, so x goes through registers and
                # each trip waits for its MMAs before storing the next tile. Loaded a trip ahead, the next
                # row's x is in flight during this row's MMAs instead of starting the next trip (the
                # last trip reloads the last row: in bounds, unused).
                a_tile = a_rows[:, None] + j[None, :]
                a_next = tl.load(a_tile)
            for kh in range(0, KH):
                if X_NEXT:
                    a = a_next
                    a_next = tl.load(a_tile + tl.minimum(kh + 1, KH - 1) * dil_h * sxh)
                else:
                    a_ptrs = (a_rows + kh * dil_h * sxh)[:, None] + j[None, :]
                    if IN_BOUNDS:
                        a = tl.load(a_ptrs)
                    else:
                        ih = ih0 + kh * dil_h
                        col = col0[:, None] + j[None, :]
                        a = tl.load(a_ptrs, mask=((ih >= 0) & (ih < H))[:, None] & (col >= 0) & (col < W * Cig),
                                    other=0.0)
                # (The weight's rows start 32-byte aligned (_weight_rows): 16-byte cp.async. Both column
                # tiles are loaded before the first MMA, which with x in registers waits for itself.)
                b = tl.load(w_tile + kh * swh)
                if BLOCK_N2 > 0:
                    b2 = tl.load(w_tile2 + kh * swh)
                acc = _dot(acc, a, b, ACC, PRECISION, UPCAST)
                if BLOCK_N2 > 0:
                    acc2 = _dot(acc2, a, b2, ACC, PRECISION, UPCAST)
            rest = KW * Cig - BLOCK_K  # per row
            t = tl.arange(0, ROW_TAIL)
            t_kh = t // rest
            t_j = BLOCK_K + t - t_kh * rest
            t_ok = t < KH * rest
            ih = ih0[:, None] + (t_kh * dil_h)[None, :]
            amask = t_ok[None, :]
            if not IN_BOUNDS:
                col = col0[:, None] + t_j[None, :]
                amask = amask & (ih >= 0) & (ih < H) & (col >= 0) & (col < W * Cig)
            a = tl.load(a_rows[:, None] + (t_kh * dil_h * sxh + t_j)[None, :], mask=amask, other=0.0)
            w_tail = (t_kh * swh + t_j)[:, None]
            b = tl.load(w_cols[None, :] + w_tail, mask=t_ok[:, None], other=0.0)
            acc = _dot(acc, a, b, ACC, PRECISION, UPCAST)
            if BLOCK_N2 > 0:
                b2 = tl.load(w_cols2[None, :] + w_tail, mask=t_ok[:, None], other=0.0)
                acc2 = _dot(acc2, a, b2, ACC, PRECISION, UPCAST)
        else:
            # The block is padded to a power of two (33 -> 64 for conv1): the MMA does more, the
            # instruction stream (what bounds this layer) far less.
            j_ok = j < KW * Cig
            for kh in range(0, KH):
                ih = ih0 + kh * dil_h
                if IN_BOUNDS:  # (conv1: no padding) only the ragged M block and the row's padding to BLOCK_K
                    amask = mask_m[:, None] & j_ok[None, :]
                else:
                    row_ok = mask_m & (ih >= 0) & (ih < H)
                    # (recomputed each row: cheaper than holding a BLOCK_M x BLOCK_K mask in registers)
                    col = col0[:, None] + j[None, :]
                    amask = row_ok[:, None] & (col >= 0) & (col < W * Cig) & j_ok[None, :]
                a = tl.load((a_rows + ih * sxh)[:, None] + j[None, :], mask=amask, other=0.0)
                b = tl.load(w_cols[None, :] + (kh * swh + j)[:, None], mask=j_ok[:, None] & mask_n[None, :],
                            other=0.0)
                acc = _dot(acc, a, b, ACC, PRECISION, UPCAST)
                if BLOCK_N2 > 0:
                    b2 = tl.load(w_cols2[None, :] + (kh * swh + j)[:, None], mask=j_ok[:, None] & mask_n2[None, :],
                                 other=0.0)
                    acc2 = _dot(acc2, a, b2, ACC, PRECISION, UPCAST)
    elif TAP_BITS:
        # TAP_BLOCKS with padding, the per-trip work cut to what a tap changes: the padding test of
        # every (position, tap) once before the loop, as bit kh*KW + kw of a word per position, and
        # each position's window origin as one int32 offset (the tap's own offset is a scalar). A
        # trip then tests one bit and adds one offset per row, and carries (tap, kh, kw) instead of
        # dividing k0. perf.static, the paper net's conv2 input gradient (128x64 tiles, 16 rows of A
        # a thread): 618 -> 291 instructions a trip fp32, ceiling 0.83 -> 1.00; the per-row ih/iw
        # arithmetic and compares were most of them. The other padded tap-block launches 212-256 -> 120-160.
        taps_ok = _tap_bits(ih0, iw0, mask_m, H, W, KH, KW, dil_h, dil_w)
        x_pos = n * sxn + ih0 * sxh + iw0 * sxw
        x_base = x_ptr + g * Cig * sxc
        tap = 0
        kh = 0
        kw = 0
        for k0 in range(0, K_total, BLOCK_K):
            c = (k0 - tap * Cig) + tl.arange(0, BLOCK_K)
            a = tl.load((x_base + (kh * dil_h * sxh + kw * dil_w * sxw)) + (x_pos[:, None] + (c * sxc)[None, :]),
                        mask=((taps_ok & (1 << tap)) != 0)[:, None], other=0.0)
            w_off = (c * swc + kh * swh + kw * sww)[:, None]
            b = tl.load(w_cols[None, :] + w_off, mask=mask_n[None, :], other=0.0)
            acc = _dot(acc, a, b, ACC, PRECISION, UPCAST)
            if BLOCK_N2 > 0:
                b2 = tl.load(w_cols2[None, :] + w_off, mask=mask_n2[None, :], other=0.0)
                acc2 = _dot(acc2, a, b2, ACC, PRECISION, UPCAST)
            # The next block's tap: one more where this block ends the tap's channels.
            step = (k0 + BLOCK_K == (tap + 1) * Cig).to(tl.int32)
            tap += step
            kw += step
            wrap = kw == KW
            kw = tl.where(wrap, 0, kw)
            kh += wrap.to(tl.int32)
    else:
        for k0 in range(0, K_total, BLOCK_K):
            if TAP_BLOCKS:
                # Every K block lies within one tap: (kh, kw) are scalars, the input row and its
                # padding test are per output position (1-D), not per (position, k) element.
                tap = k0 // Cig
                kh = tap // KW
                kw = tap % KW
                c = k0 - tap * Cig + tl.arange(0, BLOCK_K)
                ih = ih0 + kh * dil_h
                iw = iw0 + kw * dil_w
                if IN_BOUNDS:
                    row_ok = mask_m
                else:
                    row_ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a = tl.load((x_rows + ih * sxh + iw * sxw)[:, None] + (c * sxc)[None, :], mask=row_ok[:, None],
                            other=0.0)
                w_off = (c * swc + kh * swh + kw * sww)[:, None]
                b = tl.load(w_cols[None, :] + w_off, mask=mask_n[None, :], other=0.0)
                if BLOCK_N2 > 0:
                    b2 = tl.load(w_cols2[None, :] + w_off, mask=mask_n2[None, :], other=0.0)
                    acc2 = _dot(acc2, a, b2, ACC, PRECISION, UPCAST)
            else:
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K_total
                c = offs_k % Cig
                tap = offs_k // Cig
                kh = tap // KW
                kw = tap % KW
                ih = ih0[:, None] + (kh * dil_h)[None, :]
                iw = iw0[:, None] + (kw * dil_w)[None, :]
                amask = mask_m[:, None] & mask_k[None, :]
                if not IN_BOUNDS:
                    amask = amask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a = tl.load(x_rows[:, None] + (c * sxc)[None, :] + ih * sxh + iw * sxw, mask=amask, other=0.0)
                w_off = (c * swc + kh * swh + kw * sww)[:, None]
                b = tl.load(w_cols[None, :] + w_off, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                if BLOCK_N2 > 0:
                    b2 = tl.load(w_cols2[None, :] + w_off, mask=mask_k[:, None] & mask_n2[None, :], other=0.0)
                    acc2 = _dot(acc2, a, b2, ACC, PRECISION, UPCAST)
            acc = _dot(acc, a, b, ACC, PRECISION, UPCAST)

    if Y_DENSE:
        # The row offsets from offs_m alone: (n, oh, ow) need not stay live across the loop (at
        # 256x128 bf16 they were what spilled).
        y_rows = offs_m * syw
    else:
        y_rows = n * syn + (ohw // OW) * syh + (ohw % OW) * syw
    _store_y(acc, y_ptr, b_ptr, y_rows, offs_n, mask_m, mask_n, g, Cog, syc, HAS_BIAS, RELU, ACC)
    if BLOCK_N2 > 0:
        _store_y(acc2, y_ptr, b_ptr, y_rows, offs_n2, mask_m, mask_n2, g, Cog, syc, HAS_BIAS, RELU, ACC)


@triton.jit
def _tap_range(i0, size, K, dil):
    """The taps k with 0 <= i0 + k * dil < size, as [lo, hi) (lo <= hi <= K), per position."""
    lo = tl.minimum((tl.maximum(-i0, 0) + dil - 1) // dil, K)
    hi = tl.where(i0 < size, tl.minimum((size - 1 - i0) // dil, K - 1) + 1, 0)  # last tap inside, plus one
    return lo, tl.maximum(hi, lo)


@triton.jit
def _tap_bits(ih0, iw0, mask_m, H, W, KH, KW, dil_h, dil_w):
    """Per position (window origin ih0, iw0): bit kh*KW + kw set where tap (kh, kw) lies in x (KH*KW <= 32).

    Elementwise, no loop over the taps (a loop-carried tensor kept the compiler from computing the
    bits in the A tile's layout: it moved the bit test's result through shared memory every trip). The
    valid taps are a rectangle [h_lo, h_hi) x [w_lo, w_hi): the row range's bits, at multiples of KW,
    times the column range's bits (below 2**KW: no carries)."""
    h_lo, h_hi = _tap_range(ih0, H, KH, dil_h)
    w_lo, w_hi = _tap_range(iw0, W, KW, dil_w)
    one = tl.cast(1, tl.int64)
    rows = ((one << (KH * KW)) - 1) // ((one << KW) - 1)  # bit kh*KW for every kh
    h_bits = rows & ((one << (h_hi * KW)) - (one << (h_lo * KW)))
    w_bits = (one << w_hi) - (one << w_lo)
    return tl.where(mask_m, (h_bits * w_bits).to(tl.int32), 0)


@triton.jit
def _store_y(acc, y_ptr, b_ptr, y_rows, offs_n, mask_m, mask_n, g, Cog, syc, HAS_BIAS: tl.constexpr,
             RELU: tl.constexpr, ACC: tl.constexpr):
    """y[rows, g * Cog + offs_n] = relu?(acc + bias): the forward's epilogue for one column tile."""
    if HAS_BIAS:
        bias = tl.load(b_ptr + g * Cog + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(ACC)[None, :]
    if RELU:
        # Not tl.maximum: on the GPU it drops NaN, and torch's relu keeps it.
        acc = tl.where(acc < 0, tl.zeros_like(acc), acc)
    y_ptrs = (y_ptr + y_rows)[:, None] + ((g * Cog + offs_n) * syc)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _conv2d_dgrad_kernel(
    dy_ptr,  # (N, C_out, OH, OW), the ReLU mask already applied
    w_ptr,  # (C_out, Cig, KH, KW)
    dx_ptr,  # (N, C_in, H, W)
    H, W, OH, OW, Cig, Cog, M,  # M = N*H*W
    sdn, sdc, sdh, sdw,
    swo, swc, swh, sww,
    sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH, KW,
    ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # input positions (n, ih, iw)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels within group g
    mask_m = offs_m < M
    mask_n = offs_n < Cig
    n = offs_m // (H * W)
    ihw = offs_m % (H * W)
    ih = ihw // W
    iw = ihw % W
    dy_rows = dy_ptr + n * sdn + g * Cog * sdc
    w_cols = w_ptr + offs_n * swc  # weight channels are per group

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    # K flattened as (kh, kw, co), co fastest, as in the forward.
    K_total = KH * KW * Cog
    for k0 in range(0, K_total, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K_total
        co = offs_k % Cog
        tap = offs_k // Cog
        kh = tap // KW
        kw = tap % KW
        # The output position whose window holds (ih, iw) at tap (kh, kw), if there is one.
        th = ih[:, None] + pad_h - (kh * dil_h)[None, :]
        tw = iw[:, None] + pad_w - (kw * dil_w)[None, :]
        th_c = tl.maximum(th, 0)  # keep // and % on non-negative values (C and Python disagree)
        tw_c = tl.maximum(tw, 0)
        oh = th_c // stride_h
        ow = tw_c // stride_w
        hit = ((th >= 0) & (tw >= 0) & (th_c % stride_h == 0) & (tw_c % stride_w == 0) & (oh < OH) & (ow < OW)
               & mask_m[:, None] & mask_k[None, :])
        co_dy = (co * sdc)[None, :]
        a = tl.load(dy_rows[:, None] + co_dy + oh * sdh + ow * sdw, mask=hit, other=0.0)
        b = tl.load(w_cols[None, :] + ((g * Cog + co) * swo + kh * swh + kw * sww)[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)

    dx_ptrs = (dx_ptr + n * sxn + ih * sxh + iw * sxw)[:, None] + ((g * Cig + offs_n) * sxc)[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _positions(k_start, OH, OW, BLOCK_K: tl.constexpr):
    """The output positions (n, oh, ow) [BLOCK_K] of the K block at k_start, and BLOCK_K as QN planes +
    QH rows + RW columns (scalars) for _advance: the only division of the weight-gradient loops."""
    OHW = OH * OW
    offs_k = k_start + tl.arange(0, BLOCK_K)
    return (offs_k // OHW, (offs_k % OHW) // OW, offs_k % OW,
            BLOCK_K // OHW, (BLOCK_K % OHW) // OW, BLOCK_K % OW)


@triton.jit
def _advance(n, oh, ow, OH, OW, QN, QH, RW):
    """(n, oh, ow) moved on by BLOCK_K positions: columns, the carry into rows, then into planes (RW < OW
    and QH < OH, so each carry is 0 or 1)."""
    ow += RW
    cw = ow >= OW
    ow = tl.where(cw, ow - OW, ow)
    oh += QH + cw.to(tl.int32)
    ch = oh >= OH
    oh = tl.where(ch, oh - OH, oh)
    return n + QN + ch.to(tl.int32), oh, ow


@triton.jit
def _k_mask(k0, K, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Which of the K block's BLOCK_K positions from k0 lie below K: all where K % BLOCK_K == 0 (EVEN_K,
    AlexNet's every layer at batch 128) and the loop stops at K, so the mask folds away (conv1's flat
    weight gradient: 25 of 336 instructions a trip)."""
    j = tl.arange(0, BLOCK_K)
    if EVEN_K:
        return j < BLOCK_K
    else:
        return (k0 + j) < K


@triton.jit
def _dy_dense_tile(dy_ptr, k0, co_off_dy, sdw, mask_m, mask_k, BLOCK_K: tl.constexpr):
    """dy [BLOCK_M channels, BLOCK_K positions from k0] where dy's positions are one stride apart
    (channels_last, DY_DENSE): position p at p * sdw, so one pointer advanced by a constant."""
    return tl.load(dy_ptr + k0 * sdw + (co_off_dy[:, None] + tl.arange(0, BLOCK_K)[None, :] * sdw),
                   mask=mask_m[:, None] & mask_k[None, :], other=0.0)


@triton.jit
def _bias_zeros(BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr, BIAS_2D: tl.constexpr):
    """The bias sums' accumulator: (BLOCK_M,), or (BLOCK_M, BLOCK_K) reduced after the loop (BIAS_2D)."""
    if BIAS_2D:
        return tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
    else:
        return tl.zeros((BLOCK_M,), dtype=ACC)


@triton.jit
def _bias_sums(dbias, BIAS_2D: tl.constexpr):
    if BIAS_2D:
        return tl.sum(dbias, axis=1)
    else:
        return dbias


@triton.jit
def _bias_add(dbias, a, ACC: tl.constexpr, BIAS_2D: tl.constexpr):
    if BIAS_2D:
        return dbias + a.to(ACC)
    else:
        return dbias + tl.sum(a.to(ACC), axis=1)


@triton.jit
def _wgrad_accumulate(acc, dbias, a, b, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                      BIAS_2D: tl.constexpr):
    """acc += a @ b and dbias += the rows of a (BIAS_2D: += a, one add an element instead of a
    reduction across lanes each trip, for a BLOCK_M x BLOCK_K accumulator's registers), in the
    accumulator dtype."""
    return _dot(acc, a, b, ACC, PRECISION, UPCAST), _bias_add(dbias, a, ACC, BIAS_2D)


@triton.jit
def _conv2d_wgrad_kernel(
    dy_ptr,  # (N, C_out, OH, OW), the ReLU mask already applied
    x_ptr,  # (N, C_in, H, W)
    dw_ptr,  # (SPLIT, C_out, Cig*KH*KW) fp32/fp64 partials, N in (ci, kh, kw) or, if CI_FAST, (kh, kw, ci) order
    db_ptr,  # (SPLIT, C_out) fp32/fp64 partials
    H, W, OH, OW, Cig, Cog, K, K_PER_SPLIT,  # K = N*OH*OW; K_PER_SPLIT a multiple of BLOCK_K
    sdn, sdc, sdh, sdw,
    sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH, KW, C_out,
    CI_FAST: tl.constexpr,
    IN_BOUNDS: tl.constexpr,  # no padding: every tap of every output position lies in x (_in_bounds)
    DY_DENSE: tl.constexpr,  # as in _conv2d_wgrad_taps_kernel
    BIAS_2D: tl.constexpr,  # see _wgrad_accumulate
    IMAGE_BLOCKS: tl.constexpr,  # N % BLOCK_K == 0: K blocks of images at one output position (_wgrad_flat_images)
    BIAS_COL: tl.constexpr,  # IMAGE_BLOCKS, IN_BOUNDS, 16-bit, CKK % BLOCK_N > 0: db is the product's column CKK
    X_PAIRS: tl.constexpr,  # K blocks of images of one parity, x's rows read as 4-byte pairs (_wgrad_pairs)
    ROW_SCALARS: tl.constexpr,  # IN_BOUNDS, DY_DENSE and BLOCK_K <= OW: see _wgrad_flat_rows
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no position mask (_k_mask)
    ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    CKK = Cig * KH * KW
    if X_PAIRS:
        CKK = KH * _pair_row(KW * Cig)  # the partials' columns: KH rows of _pair_row (kh, r') columns
    num_pid_n = tl.cdiv(CKK, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output channels within group g
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # flat (ci, kh, kw), or (kh, kw, ci) if CI_FAST
    mask_m = offs_m < Cog
    mask_n = offs_n < CKK
    if CI_FAST:
        # Channels-contiguous x: adjacent lanes read adjacent channels of one tap (coalesced);
        # in weight order they would be different taps, a sector per element.
        ci = offs_n % Cig
        tap = offs_n // Cig
        kh = tap // KW
        kw = tap % KW
    else:
        ci = offs_n // (KH * KW)
        kh = (offs_n % (KH * KW)) // KW
        kw = offs_n % KW
    co_off_dy = (g * Cog + offs_m) * sdc
    # x at (position, column) = x_ptr + row offset (position's window corner) + column offset (the
    # tap and channel): one add per element, the multiplies 1-D.
    col_off = (g * Cig + ci) * sxc + (kh * dil_h) * sxh + (kw * dil_w) * sxw

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    dbias = _bias_zeros(BLOCK_M, BLOCK_K, ACC, BIAS_2D)
    k_start = split * K_PER_SPLIT
    if X_PAIRS:
        acc, dbias = _wgrad_pairs(acc, dbias, dy_ptr, x_ptr, co_off_dy, offs_n, mask_m, split, pid_n == 0, OH, OW,
                                  K, KH, KW * Cig, K_PER_SPLIT, sdn, sdh, sdw, sxn, sxh, sxw, stride_h, stride_w,
                                  BIAS_2D, ACC, PRECISION, UPCAST, BLOCK_K)
    elif IMAGE_BLOCKS:
        acc, dbias = _wgrad_flat_images(acc, dbias, dy_ptr, x_ptr, co_off_dy, col_off, mask_m, mask_n, kh, kw,
                                        H, W, OH, OW, K, k_start, K_PER_SPLIT, sdn, sdh, sdw, sxn, sxh, sxw,
                                        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                                        IN_BOUNDS, BIAS_2D, BIAS_COL, ACC, PRECISION, UPCAST, BLOCK_K)
    elif ROW_SCALARS:
        acc, dbias = _wgrad_flat_rows(acc, dbias, dy_ptr, x_ptr, co_off_dy, col_off, mask_m, mask_n, OH, OW, K,
                                      k_start, K_PER_SPLIT, sdw, sxn, sxh, sxw, stride_h, stride_w, pad_h, pad_w,
                                      EVEN_K, BIAS_2D, ACC, PRECISION, UPCAST, BLOCK_K)
    else:
        acc, dbias = _wgrad_flat_positions(acc, dbias, dy_ptr, x_ptr, co_off_dy, col_off, mask_m, mask_n, kh, kw,
                                           H, W, OH, OW, K, k_start, K_PER_SPLIT, sdn, sdh, sdw, sxn, sxh, sxw,
                                           stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                                           IN_BOUNDS, DY_DENSE, EVEN_K, BIAS_2D, ACC, PRECISION, UPCAST, BLOCK_K)

    dw_ptrs = dw_ptr + split * C_out * CKK + ((g * Cog + offs_m) * CKK)[:, None] + offs_n[None, :]
    tl.store(dw_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])
    if BIAS_COL:
        if pid_n == CKK // BLOCK_N:  # the block holding column CKK
            db = tl.sum(tl.where(offs_n[None, :] == CKK, acc, 0.0), axis=1)
            tl.store(db_ptr + split * C_out + g * Cog + offs_m, db, mask=mask_m)
    # Every column block computed the same bias sums; the first one writes them.
    elif pid_n == 0:
        tl.store(db_ptr + split * C_out + g * Cog + offs_m, _bias_sums(dbias, BIAS_2D), mask=mask_m)


@triton.jit
def _wgrad_flat_images(acc, dbias, dy_ptr, x_ptr, co_off_dy, col_off, mask_m, mask_n, kh, kw, H, W, OH, OW, K,
                       k_start, K_PER_SPLIT, sdn, sdh, sdw, sxn, sxh, sxw, stride_h, stride_w, pad_h, pad_w,
                       dil_h, dil_w, IN_BOUNDS: tl.constexpr, BIAS_2D: tl.constexpr, BIAS_COL: tl.constexpr,
                       ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_K: tl.constexpr):
    """The flat kernel's K loop over the positions in (oh, ow, n) order, where N % BLOCK_K == 0: a K block
    is BLOCK_K images at one output position (oh, ow), so position j of the block lies j images on from
    one corner in x and in dy. Each element's offset from the trip's scalar base is then loop-invariant
    (j * sxn + its column's offset), the padding test is per column, and a trip moves three scalars,
    where blocks along a row of OW positions crossed rows (a compare and select per element) and, in
    fp32, each of a thread's 16 x elements took 7 instructions (conv1: 297 -> 241 a trip).
    The sum's order differs from the other loops' (the result is as deterministic).
    BIAS_COL: x's columns past CKK load as 1.0 instead of 0.0, so the product's column CKK is dy's row
    sums, db, and the loop sums no bias: 16-bit x tiles go through registers, where the load's `other`
    costs what the zero did, while the sums took a shared-memory read, an unpack and an add an element
    of dy a trip (conv1 bf16: 34 of 204 instructions). Not for tf32, whose products would round dy."""
    N = K // (OH * OW)
    q = k_start // N
    n0 = k_start % N
    oh = q // OW
    ow = q % OW
    j = tl.arange(0, BLOCK_K)
    a_off = co_off_dy[:, None] + (j * sdn)[None, :]
    b_off = (j * sxn)[:, None] + col_off[None, :]
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        a = tl.load((dy_ptr + (n0 * sdn + oh * sdh + ow * sdw)) + a_off, mask=mask_m[:, None], other=0.0)
        ih0 = oh * stride_h - pad_h
        iw0 = ow * stride_w - pad_w
        bmask = mask_n
        if not IN_BOUNDS:
            ih = ih0 + kh * dil_h
            iw = iw0 + kw * dil_w
            bmask = bmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = tl.load((x_ptr + (n0 * sxn + ih0 * sxh + iw0 * sxw)) + b_off, mask=bmask[None, :],
                    other=1.0 if BIAS_COL else 0.0)
        if BIAS_COL:
            acc = _dot(acc, a, b, ACC, PRECISION, UPCAST)
        else:
            acc, dbias = _wgrad_accumulate(acc, dbias, a, b, ACC, PRECISION, UPCAST, BIAS_2D)
        n0, oh, ow = _next_images(n0, oh, ow, N, OW, BLOCK_K)
    return acc, dbias


@triton.jit
def _next_images(n0, oh, ow, N, OW, BLOCK_K: tl.constexpr):
    """The next K block of images at one output position: BLOCK_K images on, or the next (oh, ow)."""
    n0 += BLOCK_K
    wrap = n0 >= N
    n0 = tl.where(wrap, 0, n0)
    ow = tl.where(wrap, ow + 1, ow)
    wrap2 = ow >= OW
    ow = tl.where(wrap2, 0, ow)
    oh = tl.where(wrap2, oh + 1, oh)
    return n0, oh, ow


@triton.jit
def _pair_row(row):
    """Columns a kernel row takes in _wgrad_pairs: its `row` elements and the one before or after
    them, rounded up to whole pairs (conv1: 33 -> 34)."""
    return (row + 2) // 2 * 2


@triton.jit
def _wgrad_pairs(acc, dbias, dy_ptr, x_ptr, co_off_dy, offs_n, mask_m, split, with_bias, OH, OW, K, KH, ROW,
                 K_PER_SPLIT, sdn, sdh, sdw, sxn, sxh, sxw, stride_h, stride_w, BIAS_2D: tl.constexpr,
                 ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_K: tl.constexpr):
    """The flat kernel's K loop where 16-bit x's kernel rows start at odd elements (conv1: 3-channel
    pixels, 227-wide rows), so 2-byte loads through registers: here every row is read from the even
    element below its start, as 4-byte pairs, which cp.async copies and pipelines.

    The first half of the splits takes the even images, the second the odd (K: N*OH*OW / 2 positions
    a half, in (oh, ow, n // 2) order; the launcher's stride conditions keep (oh, ow) out of the
    parity). A row's start n sxn + (oh sh + kh) sxh + (ow sw) sxw then has the parity
    p = (n sxn + kh sxh) mod 2 for every position of the program, and its elements r of the window
    land in column kh * _pair_row(ROW) + r + p. The element each row reads besides its window (before
    it where p = 1, after it where p = 0) lands in a column that no weight takes, so a NaN or inf
    there stays out of dw (in the forward it would meet a zero weight: NaN). Columns past the last
    row read the last pair (in bounds; not stored). db: the first column tile's programs sum each
    trip's dy tile (with_bias; a uniform branch, skipped by the others)."""
    half_splits = tl.num_programs(2) // 2
    cls = split // half_splits  # image parity of this program's positions
    k_start = (split % half_splits) * K_PER_SPLIT
    RP = _pair_row(ROW)
    q = tl.minimum(offs_n // 2, KH * (RP // 2) - 1)  # pair index, clamped into the last row
    kh = q // (RP // 2)
    p = (cls * sxn + kh * sxh) & 1
    # Even at each pair's first element (the row start's parity taken out), so 4-byte aligned.
    pair = tl.multiple_of(cls * sxn + kh * sxh - p + 2 * (q - kh * (RP // 2)), 2)
    j = tl.arange(0, BLOCK_K)
    b_off = (j * (2 * sxn))[:, None] + pair[None, :] + (offs_n % 2)[None, :]
    a_off = co_off_dy[:, None] + (j * (2 * sdn))[None, :]
    N2 = K // (OH * OW)  # images of one parity
    q0 = k_start // N2
    i0 = k_start % N2
    oh = q0 // OW
    ow = q0 % OW
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        n0 = 2 * i0 + cls
        a = tl.load((dy_ptr + (n0 * sdn + oh * sdh + ow * sdw)) + a_off, mask=mask_m[:, None], other=0.0)
        # (cls * sxn is in `pair`; the rest is even: 2 i0 sxn, and the launcher's even stride terms)
        base = tl.multiple_of(2 * i0 * sxn + (oh * stride_h) * sxh + (ow * stride_w) * sxw, 2)
        b = tl.load((x_ptr + base) + b_off)
        acc = _dot(acc, a, b, ACC, PRECISION, UPCAST)
        if with_bias:
            dbias = _bias_add(dbias, a, ACC, BIAS_2D)
        i0, oh, ow = _next_images(i0, oh, ow, N2, OW, BLOCK_K)
    return acc, dbias


@triton.jit
def _wgrad_flat_rows(acc, dbias, dy_ptr, x_ptr, co_off_dy, col_off, mask_m, mask_n, OH, OW, K, k_start, K_PER_SPLIT,
                     sdw, sxn, sxh, sxw, stride_h, stride_w, pad_h, pad_w,
                     EVEN_K: tl.constexpr, BIAS_2D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                     UPCAST: tl.constexpr, BLOCK_K: tl.constexpr):
    """The flat kernel's K loop where a K block of output positions crosses at most one row (BLOCK_K <= OW),
    no tap leaves the image and dy is dense (conv1): the block's first position (n0, oh0, ow0) is
    scalars advanced by scalar carries, and position j's window corner is base0 + j * c before the
    row's end (j < OW - ow0) and the next row's base1 + j * c after it: one compare and select a
    position, where per-position (n, oh, ow) vectors took their carries and three multiplies."""
    OHW = OH * OW
    n0 = k_start // OHW
    oh0 = (k_start % OHW) // OW
    ow0 = k_start % OW
    j = tl.arange(0, BLOCK_K)
    cw = stride_w * sxw
    j_off = j * cw
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        mask_k = _k_mask(k0, K, EVEN_K, BLOCK_K)
        a = _dy_dense_tile(dy_ptr, k0, co_off_dy, sdw, mask_m, mask_k, BLOCK_K)
        last = oh0 + 1 >= OH
        jc = OW - ow0  # the first j in the next row
        base0 = n0 * sxn + (oh0 * stride_h - pad_h) * sxh + (ow0 * stride_w - pad_w) * sxw
        base1 = (tl.where(last, n0 + 1, n0) * sxn + (tl.where(last, 0, oh0 + 1) * stride_h - pad_h) * sxh
                 - pad_w * sxw - jc * cw)
        rows = j_off + tl.where(j < jc, 0, base1 - base0)
        b = tl.load((x_ptr + base0) + (rows[:, None] + col_off[None, :]), mask=mask_k[:, None] & mask_n[None, :],
                    other=0.0)
        acc, dbias = _wgrad_accumulate(acc, dbias, a, b, ACC, PRECISION, UPCAST, BIAS_2D)
        ow0 += BLOCK_K
        wrap = ow0 >= OW
        ow0 = tl.where(wrap, ow0 - OW, ow0)
        oh0 = tl.where(wrap, oh0 + 1, oh0)
        wrap2 = oh0 >= OH
        oh0 = tl.where(wrap2, oh0 - OH, oh0)
        n0 = tl.where(wrap2, n0 + 1, n0)
    return acc, dbias


@triton.jit
def _wgrad_flat_positions(acc, dbias, dy_ptr, x_ptr, co_off_dy, col_off, mask_m, mask_n, kh, kw, H, W, OH, OW, K,
                          k_start, K_PER_SPLIT, sdn, sdh, sdw, sxn, sxh, sxw, stride_h, stride_w, pad_h, pad_w,
                          dil_h, dil_w, IN_BOUNDS: tl.constexpr, DY_DENSE: tl.constexpr, EVEN_K: tl.constexpr,
                          BIAS_2D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """The flat kernel's K loop in general: per-position (n, oh, ow) vectors advanced by carries."""
    n, oh, ow, QN, QH, RW = _positions(k_start, OH, OW, BLOCK_K)
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        mask_k = _k_mask(k0, K, EVEN_K, BLOCK_K)
        if DY_DENSE:
            a = _dy_dense_tile(dy_ptr, k0, co_off_dy, sdw, mask_m, mask_k, BLOCK_K)
        else:
            a = tl.load(dy_ptr + co_off_dy[:, None] + (n * sdn + oh * sdh + ow * sdw)[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        ih0 = oh * stride_h - pad_h
        iw0 = ow * stride_w - pad_w
        bmask = mask_k[:, None] & mask_n[None, :]
        if not IN_BOUNDS:
            ih = ih0[:, None] + (kh * dil_h)[None, :]
            iw = iw0[:, None] + (kw * dil_w)[None, :]
            bmask = bmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = tl.load(x_ptr + (n * sxn + ih0 * sxh + iw0 * sxw)[:, None] + col_off[None, :], mask=bmask, other=0.0)
        acc, dbias = _wgrad_accumulate(acc, dbias, a, b, ACC, PRECISION, UPCAST, BIAS_2D)
        n, oh, ow = _advance(n, oh, ow, OH, OW, QN, QH, RW)
    return acc, dbias


@triton.jit
def _tap_dot(acc, a, x_base, row_off, oh_s, ow_s, ok_k, mask_c, c_off, col_w, t, T, KW, H, W, sxh, sxw,
             pad_h, pad_w, dil_h, dil_w, IN_BOUNDS: tl.constexpr, ROWS: tl.constexpr,
             ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a @ x_t for tap t (scalar): x_t [BLOCK_K, BLOCK_N] is x at each output position's window
    corner (row_off from x_base, oh_s, ow_s: 1-D) shifted by the tap, zero in the padding. A tap past T
    (the last block of taps) loads tap T - 1 again, which _tap_store drops: no per-element test.
    ROWS: a tap is a kernel row (KW == 1 here) and column j lies col_w[j] columns right of the window's
    left edge, so the padding test along w is per element."""
    t = tl.minimum(t, T - 1)
    dh = (t // KW) * dil_h - pad_h
    dw = (t % KW) * dil_w - pad_w
    ok = ok_k
    if not IN_BOUNDS:
        # 0 <= ih < H as one unsigned compare (H >= 0)
        ok = ok & ((oh_s + dh).to(tl.uint32, bitcast=True) < H)
        if not ROWS:
            ok = ok & ((ow_s + dw).to(tl.uint32, bitcast=True) < W)
    mask = ok[:, None] & mask_c[None, :]
    if ROWS and not IN_BOUNDS:
        mask = mask & (((ow_s + dw)[:, None] + col_w[None, :]).to(tl.uint32, bitcast=True) < W)
    rows = (x_base + (dh * sxh + dw * sxw)) + row_off
    b = tl.load(rows[:, None] + c_off[None, :], mask=mask, other=0.0)
    return _dot(acc, a, b, ACC, PRECISION, UPCAST)


@triton.jit
def _tap_store(dw_ptr, acc, split, C_out, T, Cig, g, Cog, offs_m, offs_c, mask_m, mask_c, t):
    """dw partial [split, g * Cog + offs_m, t, offs_c] = acc, for a tap t < T."""
    rows = dw_ptr + split * C_out * T * Cig + ((g * Cog + offs_m) * T + t) * Cig
    tl.store(rows[:, None] + offs_c[None, :], acc, mask=(mask_m & ((tl.zeros_like(offs_m) + t) < T))[:, None]
             & mask_c[None, :])


@triton.jit
def _conv2d_wgrad_taps_kernel(
    dy_ptr,  # (N, C_out, OH, OW), the ReLU mask already applied
    x_ptr,  # (N, C_in, H, W), channels contiguous (NHWC) for coalesced reads
    dw_ptr,  # (SPLIT, C_out, KH*KW, Cig) fp32/fp64 partials
    db_ptr,  # (SPLIT, C_out) fp32/fp64 partials
    H, W, OH, OW, Cig, Cog, K, K_PER_SPLIT,  # K = N*OH*OW; K_PER_SPLIT a multiple of BLOCK_K
    sdn, sdc, sdh, sdw,
    sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH, KW, C_out,
    CW,  # ROWS: the input channels of a column of the kernel row (Cig and KW are then KW * CW and 1)
    DY_DENSE: tl.constexpr,  # sdn == OH * sdh and sdh == OW * sdw: position p of dy at p * sdw
    IN_BOUNDS: tl.constexpr,  # no padding: every tap of every output position lies in x (_in_bounds)
    BIAS_2D: tl.constexpr,  # see _wgrad_accumulate
    TAPS: tl.constexpr,  # taps a program (1-4): each trip's dy tile feeds TAPS products
    ROWS: tl.constexpr,  # a tap is a kernel row, its columns (kw, ci): x's window rows are contiguous
    ROW_GAPS: tl.constexpr,  # ROWS where a row's KW runs of CW channels lie sxw apart (groups): per-column offsets
    BIAS_FIRST: tl.constexpr,  # only the programs that store the bias sums make them (a uniform branch a trip)
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no position mask (_k_mask)
    ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # The weight gradient one tap at a time: dw[:, tap, :] = dy'^T (Cog x K) * x shifted by the tap
    # (K x Cig). A program owns (co block, TAPS consecutive taps, ci block), so each tap's (kh, kw) are
    # scalars and the input rows and padding tests are per output position (1-D), where the flat kernel
    # computes both per (position, column) element. The columns are channels of one tap: contiguous in
    # NHWC. Where the tile is narrow (the paper net's groups: 128 x 64) the loads, not the MMAs, bound
    # the loop; TAPS > 1 reuses the dy tile for TAPS products, as a TAPS times wider tile would. In fp32
    # the loads are 4-byte copies (tf32 wgmma takes K-major tiles; both tiles are K-strided here), so
    # their address math is most of the loop: one row offset a position a trip, shared by the taps.
    # With ROWS the launcher makes a kernel row the tap (KH taps of KW * CW columns, (kw, ci), contiguous
    # in x where channels_last has one group): conv2's 96 channels a tap filled 3/4 of a 128-column
    # tile, its 480 a row fill 15/16 of four; the padding test along w is then per column (col_w). In
    # groups (ROW_GAPS; the paper net's conv2: 48 channels a group, 240 a row) the row's runs are apart.
    pid = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    T = KH * KW
    num_t = tl.cdiv(T, TAPS)
    num_m = tl.cdiv(Cog, BLOCK_M)
    pid_m = pid % num_m  # co blocks fastest: neighbouring programs share the x tile in L2
    t0 = ((pid // num_m) % num_t) * TAPS
    pid_c = pid // (num_m * num_t)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output channels within group g
    offs_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels within group g
    mask_m = offs_m < Cog
    mask_c = offs_c < Cig
    co_off_dy = (g * Cog + offs_m) * sdc
    # Scalar bases plus arange offsets: a thread's elements of a tile row then differ by constants that
    # ptxas folds into the copies' immediate offsets, where i32 offsets holding pid * BLOCK (which might
    # overflow before the sign extension, for all LLVM knows) took a 64-bit add per element.
    x_base = x_ptr + (g * Cig + pid_c * BLOCK_N) * sxc
    c_off = tl.arange(0, BLOCK_N) * sxc
    m_off = tl.arange(0, BLOCK_M) * sdc
    col_w = offs_c
    if ROWS:
        col_w = (offs_c // CW) * dil_w  # the column's kw, as an offset along w
        if ROW_GAPS:
            # In groups a kernel row is KW runs of the group's CW channels, a pixel (sxw) apart: the
            # column offsets are computed once, here. With CW % 16 == 0 Triton still sees runs of 16
            # contiguous columns, so the copies stay 16 bytes wide.
            x_base = x_ptr + g * CW * sxc
            c_off = (offs_c // CW) * sxw + (offs_c % CW) * sxc

    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)  # (unused accumulators are never carried)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    dbias = _bias_zeros(BLOCK_M, BLOCK_K, ACC, BIAS_2D)
    k_start = split * K_PER_SPLIT
    n, oh, ow, QN, QH, RW = _positions(k_start, OH, OW, BLOCK_K)
    dy_cols = dy_ptr + (g * Cog + pid_m * BLOCK_M) * sdc + (k_start + tl.arange(0, BLOCK_K)) * sdw  # DY_DENSE
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        mask_k = _k_mask(k0, K, EVEN_K, BLOCK_K)
        if DY_DENSE:
            a = tl.load(dy_cols[None, :] + m_off[:, None], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            dy_cols += BLOCK_K * sdw
        else:
            a = tl.load(dy_ptr + co_off_dy[:, None] + (n * sdn + oh * sdh + ow * sdw)[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        oh_s = oh * stride_h
        ow_s = ow * stride_w
        row_off = n * sxn + oh_s * sxh + ow_s * sxw
        acc0 = _tap_dot(acc0, a, x_base, row_off, oh_s, ow_s, mask_k, mask_c, c_off, col_w, t0, T, KW, H, W, sxh, sxw,
                        pad_h, pad_w, dil_h, dil_w, IN_BOUNDS, ROWS, ACC, PRECISION, UPCAST)
        if TAPS > 1:
            acc1 = _tap_dot(acc1, a, x_base, row_off, oh_s, ow_s, mask_k, mask_c, c_off, col_w, t0 + 1, T, KW, H,
                            W, sxh, sxw, pad_h, pad_w, dil_h, dil_w, IN_BOUNDS, ROWS, ACC, PRECISION, UPCAST)
        if TAPS > 2:
            acc2 = _tap_dot(acc2, a, x_base, row_off, oh_s, ow_s, mask_k, mask_c, c_off, col_w, t0 + 2, T, KW, H,
                            W, sxh, sxw, pad_h, pad_w, dil_h, dil_w, IN_BOUNDS, ROWS, ACC, PRECISION, UPCAST)
        if TAPS > 3:
            acc3 = _tap_dot(acc3, a, x_base, row_off, oh_s, ow_s, mask_k, mask_c, c_off, col_w, t0 + 3, T, KW, H,
                            W, sxh, sxw, pad_h, pad_w, dil_h, dil_w, IN_BOUNDS, ROWS, ACC, PRECISION, UPCAST)
        if BIAS_FIRST:
            if pid // num_m == 0:
                dbias = _bias_add(dbias, a, ACC, BIAS_2D)
        else:
            dbias = _bias_add(dbias, a, ACC, BIAS_2D)
        n, oh, ow = _advance(n, oh, ow, OH, OW, QN, QH, RW)

    _tap_store(dw_ptr, acc0, split, C_out, T, Cig, g, Cog, offs_m, offs_c, mask_m, mask_c, t0)
    if TAPS > 1:
        _tap_store(dw_ptr, acc1, split, C_out, T, Cig, g, Cog, offs_m, offs_c, mask_m, mask_c, t0 + 1)
    if TAPS > 2:
        _tap_store(dw_ptr, acc2, split, C_out, T, Cig, g, Cog, offs_m, offs_c, mask_m, mask_c, t0 + 2)
    if TAPS > 3:
        _tap_store(dw_ptr, acc3, split, C_out, T, Cig, g, Cog, offs_m, offs_c, mask_m, mask_c, t0 + 3)
    # The first (tap block, ci block) writes the bias sums (the others made the same, or with
    # BIAS_FIRST none).
    if pid // num_m == 0:
        tl.store(db_ptr + split * C_out + g * Cog + offs_m, _bias_sums(dbias, BIAS_2D), mask=mask_m)


@triton.jit
def _sum_parts(p_ptr, offs, mask, L, SPLIT, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr):
    """sum_s p[s, offs] of partials p (SPLIT, L), offs [BLOCK], in a fixed order (BLOCK_S splits a step,
    each step a fixed tree), so the gradients are deterministic; a step's loads are all in flight at
    once, where one split a step would wait a memory latency per split (conv1 splits 44 ways)."""
    acc = tl.zeros([BLOCK], dtype=p_ptr.dtype.element_ty)
    for s0 in range(0, SPLIT, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        t = tl.load(p_ptr + s[:, None] * L + offs[None, :], mask=(s < SPLIT)[:, None] & mask[None, :], other=0.0)
        acc += tl.sum(t, axis=0)
    return acc


@triton.jit
def _sum_bias(pb_ptr, db_ptr, C_out, SPLIT, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr):
    """db (C_out,) from its partials pb (SPLIT, C_out): the last program of a sum launch, so the bias
    costs no launch of its own."""
    for c0 in range(0, C_out, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        mask = offs < C_out
        db = _sum_parts(pb_ptr, offs, mask, C_out, SPLIT, BLOCK, BLOCK_S)
        tl.store(db_ptr + offs, db.to(db_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_splits_kernel(
    p_ptr,  # (SPLIT, L) partial sums of the weight gradient
    out_ptr,  # (L,) contiguous
    pb_ptr,  # (SPLIT, C_out) partial sums of the bias gradient
    db_ptr,  # (C_out,)
    L, C_out, SPLIT,
    BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # Programs 0 .. cdiv(L, BLOCK) - 1 sum BLOCK weight elements each; the last one sums the bias.
    pid = tl.program_id(0)
    if pid == tl.num_programs(0) - 1:
        _sum_bias(pb_ptr, db_ptr, C_out, SPLIT, BLOCK, BLOCK_S)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < L
        acc = _sum_parts(p_ptr, offs, mask, L, SPLIT, BLOCK, BLOCK_S)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_splits_to_weight_kernel(
    p_ptr,  # (SPLIT, C_out, T, Cig) partials, T = KH*KW taps, ci fastest
    out_ptr,  # (C_out, Cig, T) contiguous: the weight's layout
    pb_ptr,  # (SPLIT, C_out) partial sums of the bias gradient
    db_ptr,  # (C_out,)
    R, T, Cig, C_out, SPLIT,  # R = C_out*T rows (co, tap) of Cig channels
    KW, sxn, sxh,  # X_PAIRS: the partials' rows are _wgrad_pairs' columns (parities from x's strides)
    X_PAIRS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # _sum_splits_kernel's fixed-order sum (deterministic), then (co, tap, ci) -> (co, ci, tap).
    # A 2-D tile so both the reads (along ci) and the writes (along tap) stay contiguous. The grid has
    # a row of programs more than the weight needs: the first of it sums the bias, the rest return.
    if tl.program_id(0) == tl.num_programs(0) - 1:
        if tl.program_id(1) == 0:
            _sum_bias(pb_ptr, db_ptr, C_out, SPLIT, BLOCK_R * BLOCK_C, BLOCK_S)
    else:
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (offs_r < R)[:, None] & (offs_c < Cig)[None, :]
        if X_PAIRS:
            # Weight (kh, kw, ci) is column kh * RP + kw * Cig + ci + p of the partials, p the row's
            # parity in the split's half (_wgrad_pairs).
            KH = T // KW
            RP = _pair_row(KW * Cig)
            tap = offs_r % T
            kh = tap // KW
            src = ((offs_r // T) * (KH * RP) + kh * RP + (tap % KW) * Cig)[:, None] + offs_c[None, :]
            L = C_out * KH * RP
        else:
            src = offs_r[:, None] * Cig + offs_c[None, :]
            L = R * Cig
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=p_ptr.dtype.element_ty)
        for s0 in range(0, SPLIT, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            if X_PAIRS:
                # (the split's half: its images' parity, with the row's giving the column shift)
                par = ((((s // (SPLIT // 2)) * sxn)[:, None] + (kh * sxh)[None, :]) & 1)[:, :, None]
                t = tl.load(p_ptr + (s * L)[:, None, None] + src[None, :, :] + par,
                            mask=(s < SPLIT)[:, None, None] & mask[None, :, :], other=0.0)
            else:
                t = tl.load(p_ptr + (s * L)[:, None, None] + src[None, :, :],
                            mask=(s < SPLIT)[:, None, None] & mask[None, :, :], other=0.0)
            acc += tl.sum(t, axis=0)
        co = offs_r // T
        tap = offs_r % T
        dst = (co * (Cig * T) + tap)[:, None] + (offs_c * T)[None, :]
        tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration


def _taps_block_n(cig: int) -> int:
    """Column block of the per-tap weight gradient (columns: one tap's Cig channels): whole blocks
    where Cig allows (256, 384: 128; 192: 64), else the power of two covering Cig (96: 128, 48: 64)."""
    if cig % 128 == 0:
        return 128
    if cig % 64 == 0:
        return 64
    return max(16, min(128, next_pow2(cig)))


def _config(kind: str, dtype: torch.dtype, m: int, n: int) -> dict:
    """Block sizes for one GEMM of the convolution. `kind` is fwd, dgrad, wgrad (columns: the flat
    (ci, kh, kw)) or wgrad_taps (columns: one tap's n = Cig channels)."""
    if is_interpreting():
        # Few, large programs and K steps: interpreter time grows with both.
        if kind == "wgrad":
            return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=1)
        if kind == "wgrad_taps":
            return dict(BLOCK_M=64, BLOCK_N=max(16, min(128, next_pow2(n))), BLOCK_K=128, num_warps=4, num_stages=1)
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=1)
    small = is_16bit(dtype)
    block_n = 128 if n > 64 else (64 if n > 32 else (32 if n > 16 else 16))
    block_m = 128 if m >= 128 * 64 else 64
    block_k = 64 if small else 32
    if kind in ("fwd", "dgrad") and m >= 128 * 64 and n > 64 and dtype != torch.float64:
        # Measured on an H200 (perf/tune.py, batch 128, NHWC): wide tiles win for AlexNet's GEMMs.
        # conv2 fwd fp32 128x256x32: 0.51 ms vs 0.85 with 128x128; bf16 256x128x32 for conv1 (0.65 vs
        # 0.89 ms) and conv2 (0.36 vs 0.38 ms). The stride-1 input gradient runs the forward kernel too.
        if small:
            block_m, block_n, block_k = 256, 128, 32
        elif n > 128:
            block_m, block_n, block_k = 128, 256, 32
    if kind in ("fwd", "dgrad") and m >= 128 * 64 and n <= 64 and dtype != torch.float64:
        # Narrow GEMMs (the paper net's conv2 input gradient: 48 channels a group) are load-bound at
        # 128x64: twice the K a trip halves the loop overhead (perf.static: ceiling 0.76 -> 0.83; with
        # TAP_BITS 1.00 either way, 291 instructions for 512 tensor clocks a trip against 189 for 256 at
        # the single K: the wider keeps more issue headroom).
        block_k *= 2
    if kind == "wgrad":
        block_m = 128 if m > 64 else 64
        block_n = 128 if n > 64 else 64
        # The flat kernel's per-(position, column) im2col indices: at BLOCK_K 64 bf16 spilled inside the
        # loop (ptxas: ~1-1.7 KB, 190-260 local accesses a trip); 32 keeps the (position) state in registers.
        block_k = 32
    if kind == "wgrad_taps":
        # 256 output channels a tile where there are as many: twice the MMA work a trip for 1.5x the
        # loads, whose per-element address math bounds the loop (perf.static: ceiling 0.68 -> 1.0 fp32,
        # 0.57 -> 0.92 bf16).
        block_m = 256 if m >= 256 else (128 if m > 64 else 64)
        block_n = _taps_block_n(n)
        if block_m == 256 and m % 256 and m % 128 == 0:
            # 384 channels fill three 128-row tiles but only 1.5 of 256: conv3 (384 x 256) turns the
            # wide tile round, conv4 (384 x 384) takes 128 x 128 three taps a program
            # (taps_per_program) where 256 x 128 left a quarter of the MMA work on empty rows
            # (perf.static, tile use 0.74 -> 1.0: conv3 109 -> 84 us fp32, 55 -> 43 bf16; conv4 163 ->
            # 127, 82 -> 64).
            block_m, block_n = 128, (256 if n % 256 == 0 else block_n)
        if block_m == 128 and n > 128 and n % 64:
            # A kernel row a tap in groups (the paper net's conv2: 128 x 240 a group): 128 x 256, one row
            # a program. At 128 x 128 the 5 rows took blocks of 3 taps, a sixth of them past the last
            # (perf.static: 181 -> 149 us fp32 at 3 taps; 129 us here, ceiling 0.98; bf16 91 -> 64).
            block_n = 256
    stages = 3
    if kind == "wgrad_taps" and block_m * block_n >= 256 * 128 and not small:
        # fp32 at BLOCK_K 32 kept 24 bytes of spills (255 registers); 16 a step, 4 deep: 242 registers,
        # none spilled, ceiling 0.96 (perf.static). Since the loads' immediate offsets: 212 registers,
        # ceiling 1.0; 32 x 3 would now fit too (242, no spills, 1.0): for a GPU to choose.
        block_k, stages = 16, 4
    if dtype == torch.float64:
        block_m, block_n, block_k = min(block_m, 64), min(block_n, 64), 16
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    if kind == "fwd":
        warps = _fwd_warps(block_m, block_n, dtype)
    cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    check_config(cfg, dtype)
    return cfg


def _fwd_warps(block_m: int, block_n: int, dtype: torch.dtype) -> int:
    """Warps of a forward-kernel tile: two warpgroups from 128 x 128 up, except tf32 at 128 x 128, which
    keeps one. On two (8 warps) Triton 3.6, the GPU machines' version, waits for each wgmma before
    issuing the next (WARPGROUP.DEPBAR.LE gsb0, 0x0 after all 4 a trip: perf.static's "drains"), so a
    warpgroup's MMAs run one at a time; on one, neither 3.6 nor 3.9 waits (conv4: 210-212 registers,
    186-195 instructions a trip, two CTAs an SM, no spills). (_row_blocks' tail tiles follow the same
    rule at 128 x (64 + 32); _split_n's 64 + 32 keeps two warpgroups, which neither version drains.)"""
    if dtype == torch.float32 and block_m == 128 and block_n == 128:
        return 4
    return 8 if block_m * block_n >= 128 * 128 else 4


CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


def _pick(config: dict | None, kind: str, dtype: torch.dtype, m: int, n: int) -> dict:
    """The caller's config (checked) if given, else the heuristic's."""
    if config is None:
        return _config(kind, dtype, m, n)
    if set(config) != set(CONFIG_KEYS):
        raise ValueError(f"config must have exactly the keys {sorted(CONFIG_KEYS)}, got {sorted(config)}")
    check_config(config, dtype)
    return dict(config)


def check_config(cfg: dict, dtype: torch.dtype, block_n2: int = 0) -> None:
    """What the GPU compiler requires of a tl.dot config, which the interpreter does not check
    (block_n2: the forward's second column tile, whose weight tile takes shared memory too)."""
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = cfg[key]
        if v < 16 or v & (v - 1):
            raise ValueError(f"{key}={v}: tl.dot block sizes must be powers of two >= 16")
    elem = torch.empty((), dtype=dtype).element_size()
    smem = cfg["num_stages"] * (cfg["BLOCK_M"] + cfg["BLOCK_N"] + block_n2) * cfg["BLOCK_K"] * elem
    if smem > SMEM_LIMIT:
        raise ValueError(f"config {cfg} needs {smem} bytes of shared memory, more than {SMEM_LIMIT}")


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _wave_efficiency(tiles: int, sms: int) -> float:
    """How full a grid's last wave is: tiles / (SMs x the tiles the busiest SM runs)."""
    return tiles / (sms * cdiv(tiles, sms))


def _split_k(tiles: int, k_blocks: int, device: torch.device) -> int:
    """How many ways to split the wgrad reduction so the grid fills the GPU (1 in the interpreter).

    Within two waves of CTAs, the fullest last wave, and of the splits that fill it as well (to 1%) the
    fewest: a split's partials cost bytes to write and sum, while one wave of whole CTAs takes as long
    as two of half ones (conv1's 3 tiles: 44 ways, one full wave, not 88 in two; the paper net's conv2
    in groups, 10 tiles: 13, not 26). Where that wave is under 90% full, the first split within three
    waves that fills it (conv4's 54 tiles: 2 ways, 82% -> 7 ways, 95%)."""
    if is_interpreting():
        return 1
    sms = _num_sms(device)
    tiles = max(tiles, 1)
    # At most 128 ways; at least 8 K blocks a split.
    cap = max(1, min(k_blocks // 8 if k_blocks >= 16 else 1, 128))
    two_waves = max(1, min((2 * sms) // tiles, cap))
    fill = {s: _wave_efficiency(tiles * s, sms) for s in range(1, two_waves + 1)}
    best = max(fill.values())
    if best < 0.9:
        for s in range(two_waves + 1, min(cap, (3 * sms) // tiles) + 1):
            if _wave_efficiency(tiles * s, sms) >= 0.9:
                return s
    return min(s for s, f in fill.items() if f >= best - 0.01)


# ----------------------------------------------------------------------------------------------
# Launchers


def _assert_geometry(stride, padding, dilation, groups, C_out: int) -> None:
    """The launchers' preconditions on the geometry: (h, w) pairs and groups dividing C_out
    (fastalex.ops.conv2d checks them for users and raises)."""
    assert len(stride) == len(padding) == len(dilation) == 2 and min(*stride, *dilation) >= 1 and min(padding) >= 0
    assert isinstance(groups, int) and groups >= 1 and C_out % groups == 0, f"groups={groups}, C_out={C_out}"


def _split_n(cfg: dict, cog: int, dtype: torch.dtype) -> tuple[dict, int]:
    """(cfg, BLOCK_N2) for the forward kernel: a program's columns as 3 x 2^k where the heuristic's
    column tile leaves a quarter of the last one empty and the three-part width divides the channels
    (one of _fwd_tiles' options: where 128 x 128 fills the waves better, as for fp32's 384 channels, it wins).

    - 128 + 64 on 128 rows where a wide tile (128x256 fp32, 256x128 16-bit) would take 192 channels
      as 256: conv3-4's 384 in fp32, the paper net's 192 a group (conv4's forward, conv4-5's input
      gradient) in either (perf.static: ceiling 1.0; bf16 192 a group: 45 -> 34 us, 148 registers).
    - 64 + 32 on 128 rows, BLOCK_K 32 fp32 / 64 16-bit, where a tile of 128 columns would take 96:
      conv2's input gradient (96 input channels). perf.static: 113 / 109 registers, two CTAs an SM,
      ceiling 1.0, no spills (before its tap bits the same split fell to 0.53-0.66); the 32-column
      wgmma read 149 B/clk of operands (operand ceiling 0.86), so 336 -> 294 us fp32, 168 -> 147 bf16,
      not the 3/4 the tile use alone would give.
    256-row tiles keep one column tile (0.53, or spills); 48 channels as 32 + 16 stayed under 0.9."""
    if cfg["BLOCK_M"] * cfg["BLOCK_N"] < 128 * 128 or cog % cfg["BLOCK_N"] == 0:
        return cfg, 0
    if cfg["BLOCK_M"] * cfg["BLOCK_N"] == 128 * 256 and cog % 192 == 0:
        return dict(cfg, BLOCK_M=128, BLOCK_N=128), 64
    if cfg["BLOCK_N"] == 128 and cog % 96 == 0:
        cfg = dict(cfg, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64 if is_16bit(dtype) else 32, num_warps=8, num_stages=3)
        check_config(cfg, dtype, 32)
        return cfg, 32
    return cfg, 0


def _operand_share(widths: tuple[int, ...]) -> float:
    """The share of tensor-core rate a 128-row tile's wgmma keep with column parts of these widths, when
    their operand reads from shared memory bound them (perf.static's operand ceiling, at 128 B a clock):
    each 64-row wgmma reads its A for each part, so reads / FMAs grow with the parts. 1 for one part of
    >= 64 columns; 6/7 for 64 + 32."""
    n = sum(widths)
    return min(1.0, 2 * n / (64 * len(widths) + n))


def _fwd_tiles(cfg: dict, M: int, Cog: int, groups: int, dtype: torch.dtype, device: torch.device) -> tuple[dict, int]:
    """(cfg, BLOCK_N2) of a forward launch from the heuristic's config: it, its split into 3 x 2^k
    columns (_split_n), or for a wide tile (128x256 fp32, 256x128 16-bit) 128x128, whichever gives the
    busiest SM the least MMA time: rounds of tiles an SM runs (cdiv(tiles, SMs), a tile's ceiling being
    one CTA's alone on an SM, as perf.static counts waves) x the tile's area / _operand_share; the
    heuristic's on ties.

    conv5's forward and conv3's input gradient (21632 positions x 256 channels; the paper net's conv5 in
    bf16, 2 groups of 128) are 169-170 wide tiles on 132 SMs: the busiest SM runs two while 95 idle half
    the time; as 338 halves it runs three (perf.static: wave efficiency 0.64 -> 0.85). conv3-4's 384
    channels in fp32 (conv4-5's input gradients too): 338 tiles of 128 x 192 are 3 rounds of 3/4 of
    128 x 256's area, 507 of 128 x 128 are 4 rounds of half (0.85 -> 0.96: conv4 136 -> 121 us)."""
    sms = _num_sms(device)
    options = [(cfg, 0)]
    split = _split_n(cfg, Cog, dtype)
    if split[1]:
        options.append(split)
    if cfg["BLOCK_M"] * cfg["BLOCK_N"] == 128 * 256:
        half = dict(cfg, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64 if is_16bit(dtype) else 32,
                    num_warps=_fwd_warps(128, 128, dtype))
        check_config(half, dtype)
        options.append((half, 0))

    def busiest(option):
        c, n2 = option
        cols = c["BLOCK_N"] + n2
        tiles = cdiv(M, c["BLOCK_M"]) * cdiv(Cog, cols) * groups
        return cdiv(tiles, sms) * c["BLOCK_M"] * cols / _operand_share((c["BLOCK_N"], n2) if n2 else (cols,))

    return min(options, key=busiest)


def _positions_dense(t: torch.Tensor) -> bool:
    """Whether (N, C, H, W) t's positions (n, h, w) are one stride apart (channels_last, dense): position
    p at p * t.stride(3), so the kernels address it from p alone (Y_DENSE, DY_DENSE)."""
    sn, _, sh, sw = t.stride()
    return sh == t.shape[3] * sw and sn == t.shape[2] * sh


def _in_bounds(H: int, W: int, OH: int, OW: int, KH: int, KW: int, stride, padding, dilation) -> bool:
    """Whether every tap of every output position lies inside the (H, W) input: no top/left padding and
    the last window's last tap within the image (no bottom/right padding reached either, as 'same'
    with an even kernel would). The kernels then skip the per-element padding tests."""
    return (padding[0] == 0 and padding[1] == 0
            and (OH - 1) * stride[0] + (KH - 1) * dilation[0] < H and (OW - 1) * stride[1] + (KW - 1) * dilation[1] < W)


def _row_blocks(x, weight, dilation, tap_blocks: bool, cfg: dict, widen: bool) -> tuple[bool, dict]:
    """Whether the forward takes one kernel row per K block (ROW_BLOCKS), and the config for it.

    It needs (kw, c) contiguous in x (channels contiguous, one group's channels a whole pixel, no
    dilation along W) and a row of KW*Cig <= 128 elements; the launcher lays the weight out in rows
    (_weight_rows). A heuristic config (widen) gets BLOCK_K set for the row (_row_block_k: the power
    of two below it with the rest in a ROW_TAIL block, or the row's power of two), with pipeline stages
    dropped to fit shared memory; a caller's config is taken as it is (row blocks only if its BLOCK_K
    holds a row).
    """
    C_out, Cig, KH, KW = weight.shape
    row = KW * Cig
    if (tap_blocks or Cig == 1 or KH == 1 or row > 128 or dilation[1] != 1 or x.stride(1) != 1
            or x.stride(3) != Cig):
        return False, cfg
    # (On a GPU the heuristic's config is set for the row even where its BLOCK_K holds one: 16-bit
    # types at under 8192 positions (conv1 at batch 1-2) got 64x128x64 padded rows, 744 B of spills.
    # The interpreter keeps its few large K steps.)
    if cfg["BLOCK_K"] < row or (widen and not is_interpreting()):
        if not widen:
            return False, cfg
        # perf.static on sm_90 (conv1, 128 images): 128x64 with 4 warps keeps spills out of the loop
        # (128x128 x 8 warps: 10-30 local accesses a trip); issue-bound ceiling 1.0 fp32 (no padding
        # tests: IN_BOUNDS), against 0.18 on the flat path (predicted 417 -> 77 us). With a tail
        # (ROW_TAIL, conv1: 32 + 1 a row): 128 rows x (64 + 32) columns x 32, 8 warps, two CTAs an SM:
        # bf16 127 registers, ceiling 0.98 (256 rows: 1.0 at 213 registers, one CTA an SM; the padded
        # rows had 0.65 at 256x64, 0.56 and 12 B of spills at 128x64); fp32 124 registers (235 with
        # padded rows at 128x64, 4 warps), ceiling 1.0; no spills.
        elem = torch.empty((), dtype=x.dtype).element_size()
        block_k = _row_block_k(row, KH, elem)
        if block_k < row:
            block_m = min(cfg["BLOCK_M"], 128)
            # (tf32 on one warpgroup, as _fwd_warps: on two, Triton 3.6 waits for each of the loop's 8
            # wgmma in turn; on one, 220-229 registers, no waits, two CTAs an SM all the same)
            warps = 8 if block_m == 128 and is_16bit(x.dtype) else 4
        else:
            block_m = min(cfg["BLOCK_M"], 256 if is_16bit(x.dtype) else 128)
            warps = 8 if block_m == 256 else 4
        cfg = dict(BLOCK_M=block_m, BLOCK_N=min(cfg["BLOCK_N"], 64), BLOCK_K=block_k, num_warps=warps, num_stages=3)
        while cfg["num_stages"] > 1 and cfg["num_stages"] * (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * elem > SMEM_LIMIT:
            cfg["num_stages"] -= 1
        check_config(cfg, x.dtype)
    return True, cfg


def _row_block_k(row: int, KH: int, elem: int) -> int:
    """BLOCK_K of the heuristic's row blocks: the power of two below the row where the KH rows' rest
    fits one block of 16 (ROW_TAIL; conv1: 32 a row in the loop, 11 x 1 after it), else the row's power
    of two (33 -> 64, half of it padding). fp64 keeps the padded rows (no tensor cores to save)."""
    block_k = max(16, next_pow2(row))
    if elem <= 4 and block_k // 2 >= 16 and KH * (row - block_k // 2) <= 16:
        return block_k // 2
    return block_k


def _row_tail(row: int, KH: int, block_k: int) -> int:
    """ROW_TAIL of row blocks of block_k: 0 when a block holds a row, else the width of the block (a
    power of two >= 16) that takes the KH x (row - block_k) elements the loop leaves."""
    return 0 if block_k >= row else max(16, next_pow2(KH * (row - block_k)))


def _weight_rows(weight: torch.Tensor) -> torch.Tensor:
    """weight (C_out, Cig, KH, KW) for row blocks, in one copy: a view of (C_out, KH, R) rows, each
    kernel row's (kw, c) run of KW*Cig elements at the start of R (the run rounded up to 16 elements;
    the rest never read). Rows then start 32-byte aligned and the strides are multiples of 16 (the JIT's
    divisibility), so the weight tiles load as 16-byte vectors, cp.async, where conv1's 33-element rows
    (channels_last) took a 2-byte load per element (perf.static, bf16: 14 loads a thread a trip)."""
    C_out, Cig, KH, KW = weight.shape
    row = KW * Cig
    rows = torch.empty((C_out, KH, cdiv(row, 16) * 16), dtype=weight.dtype, device=weight.device)
    rows[:, :, :row] = weight.permute(0, 2, 3, 1).reshape(C_out, KH, row)
    return rows[:, :, :row].view(C_out, KH, KW, Cig).permute(0, 3, 1, 2)


def _row_tail_n(cog: int, block_k: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_N2) of ROW_TAIL launches: one column tile of BLOCK_K columns, after a first tile
    of up to 64 where cog needs more (conv1's 96: 64 + 32, no padding). The y store of a
    BLOCK_M x BLOCK_K tile is what gives the x tile's loads (the same shape) the layout of 8
    consecutive elements a thread (Triton's coalescing groups memory accesses of one shape): one
    address a row, the rest immediate offsets. Without it, each element took its own address and
    2-byte shared store (perf.static, 256x64x32: 149 instructions a trip, 246 registers)."""
    if cog <= block_k:
        return block_k, 0
    return max(16, min(64, next_pow2(cog - block_k))), block_k


def conv2d_forward(x, weight, bias, stride, padding, dilation, groups, output_size, relu,
                   channels_last=False, allow_tf32=True, config=None):
    """y (N, C_out, OH, OW) = relu?(conv2d(x, weight) + bias).

    x (N, C_in, H, W), weight (C_out, C_in/groups, KH, KW), bias (C_out,) or None: same dtype and
    device, any strides. padding = (top, left); output_size = (OH, OW) (torch's size for symmetric
    padding; one more row/column of bottom/right padding covers 'same' with even kernels).
    channels_last picks y's memory format. allow_tf32: fp32 products in tf32 on the GPU.
    config: block sizes, num_warps and num_stages instead of the heuristic's (for tuning).
    """
    assert takes(x, 4) and takes(weight, 4) and same(x, weight), "input and weight: 4-D, one dtype and device"
    assert x.shape[1] == weight.shape[1] * groups, f"input {tuple(x.shape)}, weight {tuple(weight.shape)}"
    assert bias is None or (takes(bias, 1) and same(x, bias) and bias.shape[0] == weight.shape[0])
    _assert_geometry(stride, padding, dilation, groups, weight.shape[0])
    check_int32("input", x)
    check_int32("weight", weight)
    N, _, H, W = x.shape
    C_out, Cig, KH, KW = weight.shape
    OH, OW = output_size
    check_int32("output", (N, C_out, OH, OW))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = empty((N, C_out, OH, OW), dtype=x.dtype, device=x.device, memory_format=fmt)
    M = N * OH * OW
    if M == 0:
        return y
    Cog = C_out // groups
    cfg = _pick(config, "fwd", x.dtype, M, Cog)
    tap_blocks = Cig % cfg["BLOCK_K"] == 0
    row_blocks, cfg = _row_blocks(x, weight, dilation, tap_blocks, cfg, config is None)
    if row_blocks:
        weight = _weight_rows(weight)
    elif channels_last:
        # The weight tile is read along K = (kh, kw, c): channels-contiguous weights make those reads
        # contiguous too (in (C_out, C_in, KH, KW) order every element is a separate access). A small
        # copy per call unless the weight is already channels_last.
        weight = weight.contiguous(memory_format=torch.channels_last)
    in_bounds = _in_bounds(H, W, OH, OW, KH, KW, stride, padding, dilation)
    tap_bits = tap_blocks and not in_bounds and KH * KW <= 32
    row_tail = _row_tail(KW * Cig, KH, cfg["BLOCK_K"]) if row_blocks else 0
    block_n2 = 0
    if row_tail:
        cfg["BLOCK_N"], block_n2 = _row_tail_n(Cog, cfg["BLOCK_K"])
    elif config is None:
        cfg, block_n2 = _fwd_tiles(cfg, M, Cog, groups, x.dtype, x.device)
    grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(Cog, cfg["BLOCK_N"] + block_n2), groups)
    _conv2d_fwd_kernel[grid](
        x, weight, bias if bias is not None else x, y,
        H, W, OH, OW, Cig, Cog, M,
        *x.stride(), *weight.stride(), *y.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH, KW,
        HAS_BIAS=bias is not None, RELU=relu, TAP_BLOCKS=tap_blocks, ROW_BLOCKS=row_blocks,
        IN_BOUNDS=in_bounds, ROW_TAIL=row_tail,
        Y_DENSE=_positions_dense(y), BLOCK_N2=block_n2, TAP_BITS=tap_bits,
        X_NEXT=bool(row_tail) and in_bounds and is_16bit(x.dtype),
        ACC=acc_dtype(x.dtype), PRECISION=dot_precision(x.dtype, allow_tf32), UPCAST=dot_upcast(x.dtype),
        **cfg,
    )
    return y


def conv2d_input_grad(grad_output, weight, input_shape, stride, padding, dilation, groups, channels_last=False,
                      allow_tf32=True, config=None):
    """dx (N, C_in, H, W) from grad_output (N, C_out, OH, OW) and weight (C_out, C_in/groups, KH, KW).

    A fused ReLU's mask is the caller's to apply first (the ops do, once, with threshold_backward).
    """
    assert takes(grad_output, 4) and takes(weight, 4) and same(grad_output, weight), \
        "grad_output and weight: 4-D, one dtype and device"
    assert grad_output.shape[1] == weight.shape[0] and input_shape[1] == weight.shape[1] * groups
    _assert_geometry(stride, padding, dilation, groups, weight.shape[0])
    check_int32("grad_output", grad_output)
    check_int32("weight", weight)
    check_int32("grad_input", input_shape)
    N, C_in, H, W = input_shape
    C_out, Cig, KH, KW = weight.shape
    _, _, OH, OW = grad_output.shape
    if tuple(stride) == (1, 1) and padding[0] <= dilation[0] * (KH - 1) and padding[1] <= dilation[1] * (KW - 1):
        # (config, if given, is then a forward config: the tile tables of both kinds are alike)
        return _input_grad_as_forward(grad_output, weight, input_shape, padding, dilation, groups, channels_last,
                                      allow_tf32, config)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dx = empty((N, C_in, H, W), dtype=grad_output.dtype, device=grad_output.device, memory_format=fmt)
    M = N * H * W
    if M == 0:
        return dx
    Cog = C_out // groups
    cfg = _pick(config, "dgrad", dx.dtype, M, Cig)
    grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(Cig, cfg["BLOCK_N"]), groups)
    _conv2d_dgrad_kernel[grid](
        grad_output, weight, dx,
        H, W, OH, OW, Cig, Cog, M,
        *grad_output.stride(), *weight.stride(), *dx.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH, KW,
        ACC=acc_dtype(dx.dtype), PRECISION=dot_precision(dx.dtype, allow_tf32), UPCAST=dot_upcast(dx.dtype),
        **cfg,
    )
    return dx


def _input_grad_as_forward(grad_output, weight, input_shape, padding, dilation, groups, channels_last, allow_tf32,
                           config=None):
    """dx of a stride-1 convolution is itself a stride-1 convolution: dy with the kernel flipped in
    space and input/output channels swapped within each group, padded by dilation*(K-1) - padding.
    The forward kernel runs it with dy's positions as the GEMM's M and no per-tap hit test."""
    N, C_in, H, W = input_shape
    C_out, Cig, KH, KW = weight.shape
    Cog = C_out // groups
    # (g, Cog, Cig, KH, KW) -> (g, Cig, Cog, KH, KW), flipped: a small copy of the weight.
    w_t = (weight.reshape(groups, Cog, Cig, KH, KW).flip(3, 4).transpose(1, 2)
           .reshape(groups * Cig, Cog, KH, KW))
    pad = [dilation[0] * (KH - 1) - padding[0], dilation[1] * (KW - 1) - padding[1]]
    return conv2d_forward(grad_output, w_t, None, (1, 1), pad, dilation, groups, (H, W), False,
                          channels_last=channels_last, allow_tf32=allow_tf32, config=config)


def taps_per_program(T: int, cfg: dict) -> int:
    """Taps a per-tap weight-gradient program takes (TAPS): 1 for 256x128 and 128x256 tiles (the single
    net's conv2, conv3 and conv5, already MMA-bound), else 3 where they divide T (3x3 kernels) and 4
    otherwise (5x5: 7 blocks for 25 taps), so narrower tiles reuse each dy tile 3-4 times; at most 3 for
    128x128 tiles (conv4), whose 3 fp32 accumulators already hold 192 of a thread's registers."""
    area = cfg["BLOCK_M"] * cfg["BLOCK_N"]
    if area >= 256 * 128 or T == 1:
        return 1
    taps = 3 if T % 3 == 0 else min(4, T)
    return min(taps, 3) if area >= 128 * 128 else taps


def _multi_tap_config(cfg: dict, taps_per: int, dtype: torch.dtype) -> dict:
    """The heuristic's per-tap config adjusted for TAPS > 1 (perf.static, the paper net's grouped
    layers, 128x64 tiles): 8 warps (4 spilled the accumulators), 2 stages in fp32 (3 spilled 72 B at
    4 taps before the loads' immediate offsets; now 216-252 registers, no spills: for a GPU to choose),
    BLOCK_K 32 for 16-bit types at 4 taps (64: 32 B). No spills; ceiling 1.0 fp32 and bf16 (0.84-0.94
    fp32, 0.91-0.92 bf16 before the immediate offsets), against 0.45-0.54 a tap at a time."""
    cfg = dict(cfg, num_warps=8)
    if cfg["BLOCK_M"] * cfg["BLOCK_N"] >= 128 * 128:
        # 3 accumulators of 128 x 128 (taps_per_program's most) hold 192 of a thread's registers: half
        # the K a trip keeps the tiles' loads out of local memory (conv4 at 3 taps: 16 x 3 stages fp32,
        # 32 x 3 bf16; 254-255 registers, no spills under Triton 3.6 and 3.9, where 32 x 2 fp32 spilled
        # 8 B and 64 x 3 bf16 396 B).
        cfg["BLOCK_K"] = max(16, cfg["BLOCK_K"] // 2)
    elif dtype == torch.float32:
        cfg["num_stages"] = 2
    elif taps_per == 4:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 32)
    check_config(cfg, dtype)
    return cfg


def default_taps(x, weight_shape) -> bool:
    """Whether conv2d_weight_grad runs the per-tap kernel when not told (as autograd calls it):
    channels-contiguous x, at least 16 input channels a group, more than one tap."""
    _, Cig, KH, KW = weight_shape
    return x.stride(1) == 1 and Cig >= 16 and KH * KW > 1


def default_rows(x, weight_shape, dilation) -> bool:
    """Whether the per-tap kernel takes a kernel row as its tap (columns (kw, ci), KW x Cig of them):
    where a tap's Cig channels leave its column tiles partly empty (conv2's 96 fill three quarters of
    128; the paper net's 48 a group, half of 64) and x's channels are contiguous, with no dilation
    along w. A row's columns are then contiguous in x with one group, or KW runs of Cig (ROW_GAPS)."""
    _, Cig, _, KW = weight_shape
    return KW > 1 and Cig % 64 != 0 and x.stride(1) == 1 and dilation[1] == 1


def wgrad_tiles(weight_shape, cfg: dict, taps: bool, rows: bool, pairs: bool = False) -> int:
    """Output tiles a group of a weight-gradient launch has (its grid's first axis; split-K multiplies
    them): co blocks x column blocks (with X_PAIRS, KH rows of _pair_cols columns), the per-tap
    kernel's by blocks of taps_per_program taps, a tap being a kernel row with rows (perf.tune sizes
    its split-K sweep from it)."""
    C_out_g, Cig, KH, KW = weight_shape  # C_out_g: the output channels of one group
    tiles = cdiv(C_out_g, cfg["BLOCK_M"])
    if not taps:
        return tiles * cdiv(KH * _pair_cols(KW * Cig) if pairs else Cig * KH * KW, cfg["BLOCK_N"])
    taps_t, taps_n = (KH, KW * Cig) if rows else (KH * KW, Cig)
    return tiles * cdiv(taps_t, taps_per_program(taps_t, cfg)) * cdiv(taps_n, cfg["BLOCK_N"])


def conv2d_weight_grad(grad_output, x, weight_shape, stride, padding, dilation, groups, allow_tf32=True,
                       split_k=None, config=None, taps=None, rows=None):
    """(dw (C_out, C_in/groups, KH, KW), db (C_out,)) from grad_output (N, C_out, OH, OW) and x.

    A fused ReLU's mask is the caller's to apply first, as for conv2d_input_grad. The reduction over the N*OH*OW
    output positions is split `split_k` ways (default: enough to fill the GPU) into fp32 partials
    that a second kernel sums in a fixed order: deterministic. dw is contiguous in the weight's
    layout whatever x's; for channels-contiguous x the partials are in (co, kh, kw, ci) order and
    the sum permutes them.
    taps: run the per-tap kernel (columns: one tap's input channels) rather than the flat one
    (columns: all of (ci, kh, kw)); None: default_taps(x, weight_shape).
    rows: the per-tap kernel with a kernel row a tap (columns (kw, ci)); None: default_rows.
    """
    assert takes(grad_output, 4) and takes(x, 4) and same(grad_output, x), \
        "grad_output and input: 4-D, one dtype and device"
    C_out, Cig, KH, KW = weight_shape
    assert grad_output.shape[:2] == (x.shape[0], C_out) and x.shape[1] == Cig * groups
    _assert_geometry(stride, padding, dilation, groups, C_out)
    check_int32("grad_output", grad_output)
    check_int32("input", x)
    N, C_in, H, W = x.shape
    _, _, OH, OW = grad_output.shape
    Cog = C_out // groups
    CKK = Cig * KH * KW
    T = KH * KW
    K = N * OH * OW
    dtype, device = grad_output.dtype, grad_output.device
    acc_t = torch.float64 if dtype == torch.float64 else torch.float32
    channels_fast = x.stride(1) == 1 and Cig > 1
    in_bounds = _in_bounds(H, W, OH, OW, KH, KW, stride, padding, dilation)
    if taps is None:
        taps = default_taps(x, weight_shape)
    taps_per = 1
    rows = bool(taps and (default_rows(x, weight_shape, dilation) if rows is None else rows))
    assert not rows or dilation[1] == 1, "rows: no dilation along w"
    # The per-tap kernel's taps and their columns: (KH*KW, Cig), or with rows (KH, KW*Cig), in the
    # same memory order (co, kh, kw, ci), so the partials and their sums are the same either way.
    taps_t, taps_kw, taps_n = (KH, 1, KW * Cig) if rows else (T, KW, Cig)
    if taps:
        cfg = _pick(config, "wgrad_taps", dtype, Cog, taps_n)
        taps_per = taps_per_program(taps_t, cfg)
        if config is None and taps_per > 1 and not is_interpreting():
            cfg = _multi_tap_config(cfg, taps_per, dtype)
    else:
        cfg = _pick(config, "wgrad", dtype, Cog, CKK)
        wide = dict(cfg, BLOCK_K=64)
        if config is None and not is_interpreting() and (
                _pairs(x, wide, N, OH, OW, weight_shape, stride, dilation, in_bounds)
                or _bias_col(wide, dtype, N, CKK, in_bounds)):
            # Without the bias's sums in the loop (BIAS_COL) or with x by cp.async (X_PAIRS) the 16-bit
            # loop has the registers for K 64: twice the MMA a trip against the same fixed cost
            # (perf.static, conv1 bf16: ceiling 0.78 -> 0.98 with BIAS_COL, 210 registers; X_PAIRS 1.0,
            # 226 registers (Triton 3.6: 229), no spills, no wgmma drain).
            cfg = wide
    pairs = not taps and _pairs(x, cfg, N, OH, OW, weight_shape, stride, dilation, in_bounds)
    cols = KH * _pair_cols(KW * Cig) if pairs else CKK  # the partials' columns
    tiles = wgrad_tiles((Cog, Cig, KH, KW), cfg, taps, rows, pairs)
    k_blocks = cdiv(K, cfg["BLOCK_K"])
    split = split_k if split_k is not None else _split_k(tiles * groups, k_blocks, device)
    split = max(1, min(int(split), max(k_blocks, 1)))
    k_per_split = cdiv(k_blocks, split) * cfg["BLOCK_K"]
    k_len = K
    if pairs:
        # Half the splits a parity of images, each half over K / 2 positions (_wgrad_pairs).
        split = split + split % 2
        k_len = K // 2
        k_per_split = cdiv(k_blocks // 2, split // 2) * cfg["BLOCK_K"]
    # Partials in (co, kh, kw, ci) order: the per-tap kernel's, and the flat kernel's when x's channels
    # are contiguous (NHWC); when Cig or KH*KW is 1 the orders coincide.
    ci_fast = taps or (channels_fast and T > 1)
    dw_part = empty((split, C_out, cols), dtype=acc_t, device=device)
    db_part = empty((split, C_out), dtype=acc_t, device=device)
    if K == 0:
        dw_part.zero_()
        db_part.zero_()
    else:
        # (taps_n, taps_kw: Cig and KW, but for a kernel row a tap)
        args = (grad_output, x, dw_part, db_part,
                H, W, OH, OW, taps_n, Cog, k_len, k_per_split,
                *grad_output.stride(), *x.stride(),
                stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                KH, taps_kw, C_out)
        # The bias sums a trip's dy tile into a 2-D accumulator where the registers allow (16-bit
        # types, tiles up to 128x128; perf.static: bf16 conv1 0.23 -> 0.27, the paper net's grouped
        # layers 0.45 -> 0.52, no spills; fp32 and the 256-row tiles spilled with it).
        bias_col = not (taps or pairs) and _bias_col(cfg, dtype, N, CKK, in_bounds)  # then no sums in the loop
        bias_2d = (is_16bit(dtype) and cfg["BLOCK_M"] * cfg["BLOCK_N"] <= 128 * 128
                   and not bias_col)
        common = dict(DY_DENSE=_positions_dense(grad_output), BIAS_2D=bias_2d, EVEN_K=K % cfg["BLOCK_K"] == 0,
                      IN_BOUNDS=in_bounds,
                      ACC=acc_dtype(dtype), PRECISION=dot_precision(dtype, allow_tf32), UPCAST=dot_upcast(dtype), **cfg)
        if taps:
            # 16-bit tiles too wide for a 2-D bias accumulator reduce each trip's dy tile across warps
            # through shared memory (7 more barriers a trip on 256 x 128 bf16): only the programs that
            # store the sums (1 in 5-27 on AlexNet) do it. In fp32 the sums stay within warps, and the
            # branch would make Triton wait for each wgmma (perf.static: 2-6 drains a trip).
            bias_first = is_16bit(dtype) and not bias_2d
            _conv2d_wgrad_taps_kernel[(tiles, groups, split)](
                *args, Cig, TAPS=taps_per, ROWS=rows, ROW_GAPS=rows and x.stride(3) != Cig * x.stride(1),
                BIAS_FIRST=bias_first, **common)
        else:
            _conv2d_wgrad_kernel[(tiles, groups, split)](
                *args, CI_FAST=ci_fast, IMAGE_BLOCKS=N % cfg["BLOCK_K"] == 0,
                BIAS_COL=bias_col, X_PAIRS=pairs,
                ROW_SCALARS=in_bounds and common["DY_DENSE"] and cfg["BLOCK_K"] <= OW, **common)
    dw = empty(tuple(weight_shape), dtype=dtype, device=device)
    db = empty((C_out,), dtype=dtype, device=device)
    # One launch sums the partials of both (its last program the bias), up to 4096 a step (_sum_blocks).
    if ci_fast and Cig > 1 and T > 1:
        # Tiles of 128-256 (row, channel) pairs: reads along ci, writes along the taps (conv1's 3
        # channels take 4 columns, not 32).
        bc = max(4, min(32, next_pow2(Cig)))
        br = max(8, 128 // bc)
        _sum_splits_to_weight_kernel[(cdiv(C_out * T, br) + 1, cdiv(Cig, bc))](
            dw_part, dw, db_part, db, C_out * T, T, Cig, C_out, split, KW, x.stride(0), x.stride(2),
            X_PAIRS=pairs, BLOCK_R=br, BLOCK_C=bc, BLOCK_S=_sum_blocks(split, br * bc))
    else:
        L = dw.numel()
        block = max(16, min(1024, next_pow2(L) // 8))
        _sum_splits_kernel[(cdiv(L, block) + 1,)](dw_part, dw, db_part, db, L, C_out, split, BLOCK=block,
                                                   BLOCK_S=_sum_blocks(split, block))
    return dw, db


def _pair_cols(row: int) -> int:
    """_pair_row on the host: the columns a kernel row of `row` elements takes with X_PAIRS."""
    return (row + 2) // 2 * 2


def _pairs(x: torch.Tensor, cfg: dict, N: int, OH: int, OW: int, weight_shape, stride, dilation,
           in_bounds: bool) -> bool:
    """Whether the flat weight gradient reads x's kernel rows as 4-byte pairs (X_PAIRS, _wgrad_pairs):
    16-bit x whose kernel rows (kw, ci) are contiguous runs (channels_last, one group, no dilation), no
    padding, the images in two halves of whole K blocks, strides that keep a row start's parity
    independent of (oh, ow), and the last pair read inside x's storage (each row is read from one
    element below its start or to one past its end)."""
    _, Cig, KH, KW = weight_shape
    sxn, sxc, sxh, sxw = x.stride()
    if not (is_16bit(x.dtype) and in_bounds and tuple(dilation) == (1, 1) and Cig > 1 and KH * KW > 1
            and sxc == 1 and sxw == Cig and x.shape[1] == Cig and N % (2 * cfg["BLOCK_K"]) == 0
            and (stride[0] * sxh) % 2 == 0 and (stride[1] * sxw) % 2 == 0):
        return False
    last = 0
    for cls in (0, 1):
        start = (N - 2 + cls) * sxn + ((OH - 1) * stride[0] + KH - 1) * sxh + (OW - 1) * stride[1] * sxw
        last = max(last, start - (cls * sxn + (KH - 1) * sxh) % 2 + _pair_cols(KW * Cig) - 1)
    return x.storage_offset() + last < x.untyped_storage().nbytes() // x.element_size()


def _bias_col(cfg: dict, dtype: torch.dtype, N: int, CKK: int, in_bounds: bool) -> bool:
    """Whether the flat weight gradient takes db as its product's column CKK (BIAS_COL, see
    _wgrad_flat_images): K blocks of images (N % BLOCK_K == 0), no padding (the masked x columns load
    as 1.0, and only they are masked), a 16-bit type (exact dy products; tf32 would round dy) and a
    column past CKK in the last column block."""
    return (N % cfg["BLOCK_K"] == 0 and in_bounds and is_16bit(dtype)
            and CKK % cfg["BLOCK_N"] != 0)


def _sum_blocks(split: int, block: int) -> int:
    """Splits a step of the partial sums: all of them where a step stays within 4096 elements."""
    return max(1, min(next_pow2(split), 4096 // block))
