"""Max-pool 2-D: forward (values + compact argmax) and a deterministic gather backward.

Forward: one tile of output positions per program, `tl.static_range` over the KH x KW window,
padding reads as -inf and is never chosen; `take = (v > best) | (v != v)` like torch's CPU and
CUDA kernels, so ties keep the first maximum and the last NaN in a window wins. Besides y it
writes a compact argmax: the window offset kh * KW + kw (int8 for windows of <= 127 elements),
and, on request, torch's int64 index ih * W + iw into each (H, W) plane.

Backward: one tile of INPUT positions per program. For each (kh, kw) the only output whose
window holds this input at that offset is oh = (ih + pad - kh * dil) / stride (when divisible and
in range); its gradient is added when its argmax is that offset. No atomics, fixed order: the
result is bitwise deterministic (the forward too: one program per output, a fixed window order).
Where the stride is 2 both ways with no padding or dilation and windows of at most 4 (AlexNet's
3x3/2; `pools_in_cells`), a thread takes a 2 x 2 cell of inputs instead: the cell's inputs share
their candidate windows, so each window is loaded once for four inputs and only the (input, window)
pairs that can hit are tested, in the same order (bit for bit the same gradient).

Tensors are (N, C, H, W) or unbatched (C, H, W); any strides. Outputs follow the input's memory
format like torch (channels_last in, channels_last out).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch._prims_common import suggest_memory_format

from fastalex.kernels._common import (MAX_GRID_YZ, acc_dtype, cdiv, check_int32, empty, is_interpreting, next_pow2,
                                      takes)
from fastalex.kernels._geometry import argmax_dtype, output_size, pools_in_cells

__all__ = ["argmax_dtype", "output_size", "maxpool2d_forward", "maxpool2d_backward"]


@triton.jit
def _decode(offs, C, H, W, CHANNELS_LAST: tl.constexpr):
    """Flat positions -> (n, c, h, w), walked in (n, h, w, c) order for channels_last, else (n, c, h, w)."""
    if CHANNELS_LAST:
        c = offs % C
        r = offs // C
        w = r % W
        r = r // W
        h = r % H
        n = r // H
    else:
        w = offs % W
        r = offs // W
        h = r % H
        r = r // H
        c = r % C
        n = r // C
    return n, c, h, w


@triton.jit
def _maxpool2d_fwd_kernel(
    x_ptr,  # (N, C, H, W), strides sxn, sxc, sxh, sxw
    y_ptr,  # (N, C, OH, OW), strides syn, syc, syh, syw (also those of arg and idx)
    arg_ptr,  # (N, C, OH, OW) int8/16/32: window offset kh * KW + kw of the maximum
    idx_ptr,  # (N, C, OH, OW) int64: ih * W + iw (written only when WRITE_INDICES)
    total, C, H, W, OH, OW,
    sxn, sxc, sxh, sxw,
    syn, syc, syh, syw,
    # Window geometry as constants (one compile per geometry; AlexNet has one, 3x3 stride 2): the backward
    # divides by the stride at every tap, ~20 instructions for a runtime int, a shift for a constant 2.
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,  # walk outputs in (n, oh, ow, c) order so lanes hit adjacent memory
    WRITE_INDICES: tl.constexpr,
    # Compare in fp32 (fp64 for fp64 input): exact for fp16/bf16, and the interpreter's bf16 compares are wrong.
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n, c, oh, ow = _decode(offs, C, OH, OW, CHANNELS_LAST)
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    x_base = x_ptr + n * sxn + c * sxc
    # torch starts from the first window element at ih >= 0, iw >= 0 (even if past the input in
    # ceil mode), value -inf: an all -inf (or empty) window reports that index.
    kh0 = (tl.maximum(-h0, 0) + DH - 1) // DH
    kw0 = (tl.maximum(-w0, 0) + DW - 1) // DW
    arg = kh0 * KW + kw0
    best = tl.full([BLOCK], float("-inf"), ACC)
    for kh in tl.static_range(KH):
        ih = h0 + kh * DH
        h_ok = mask & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = w0 + kw * DW
            ok = h_ok & (iw >= 0) & (iw < W)
            # Masked lanes read -inf, which is never taken: no need to AND `ok` in again.
            v = tl.load(x_base + ih * sxh + iw * sxw, mask=ok, other=float("-inf")).to(ACC)
            take = (v > best) | (v != v)
            best = tl.where(take, v, best)
            arg = tl.where(take, kh * KW + kw, arg)
    y_off = n * syn + c * syc + oh * syh + ow * syw
    tl.store(y_ptr + y_off, best.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(arg_ptr + y_off, arg.to(arg_ptr.dtype.element_ty), mask=mask)
    if WRITE_INDICES:
        ih = h0 + (arg // KW) * DH
        iw = w0 + (arg % KW) * DW
        tl.store(idx_ptr + y_off, ih.to(tl.int64) * W + iw, mask=mask)


@triton.jit
def _maxpool2d_bwd_kernel(
    dy_ptr,  # (N, C, OH, OW), strides sdn, sdc, sdh, sdw
    arg_ptr,  # (N, C, OH, OW) window offsets, strides san, sac, sah, saw
    dx_ptr,  # (N, C, H, W), strides sxn, sxc, sxh, sxw
    total, C, H, W, OH, OW,
    sdn, sdc, sdh, sdw,
    san, sac, sah, saw,
    sxn, sxc, sxh, sxw,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    ACC: tl.constexpr,  # fp32, or fp64 for fp64 gradients
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n, c, ih, iw = _decode(offs, C, H, W, CHANNELS_LAST)
    dy_base = dy_ptr + n * sdn + c * sdc
    arg_base = arg_ptr + n * san + c * sac
    acc = tl.zeros([BLOCK], ACC)
    for kh in tl.static_range(KH):
        # Clamp before // and % so negative numerators never meet C-vs-floor division semantics.
        th = ih + PH - kh * DH
        th_c = tl.maximum(th, 0)
        oh = th_c // SH
        h_ok = mask & (th >= 0) & (th_c - oh * SH == 0) & (oh < OH)
        for kw in tl.static_range(KW):
            tw = iw + PW - kw * DW
            tw_c = tl.maximum(tw, 0)
            ow = tw_c // SW
            ok = h_ok & (tw >= 0) & (tw_c - ow * SW == 0) & (ow < OW)
            # Masked lanes read -1, which matches no offset.
            a = tl.load(arg_base + oh * sah + ow * saw, mask=ok, other=-1)
            hit = a.to(tl.int32) == kh * KW + kw
            g = tl.load(dy_base + oh * sdh + ow * sdw, mask=hit, other=0.0)
            acc += g.to(ACC)
    tl.store(dx_ptr + n * sxn + c * sxc + ih * sxh + iw * sxw, acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _hit(arg, dy, T, dz, ACC: tl.constexpr):
    """dz + dy where a window's int8 argmax (loaded as -1 where masked) is T, else dz + 0: a select,
    bitwise what a load masked by the hit gave."""
    # (compared unsigned: a zero-extended byte; -1 reads 255, which matches no offset)
    hit = arg.to(tl.uint8, bitcast=True).to(tl.int32) == T
    return dz + tl.where(hit, dy.to(ACC), 0.0)


@triton.jit
def _cell_hits(a, d, t: tl.constexpr, u: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, dz00, dz01, dz10, dz11,
               ACC: tl.constexpr):
    """Window (ci - t, cj - u)'s argmax a and dy d into the dz of the cell positions (2 ci + I, 2 cj + J)
    it can hold, at their offsets (2 t + I) KW + 2 u + J; pairs past the window's edge (2 t + I >= KH
    or 2 u + J >= KW) are never tested (pools_in_cells' stride-2 cells)."""
    T = 2 * t * KW + 2 * u  # position 00's offset in this window
    dz00 = _hit(a, d, T, dz00, ACC)
    if 2 * u + 1 < KW:
        dz01 = _hit(a, d, T + 1, dz01, ACC)
    if 2 * t + 1 < KH:
        dz10 = _hit(a, d, T + KW, dz10, ACC)
        if 2 * u + 1 < KW:
            dz11 = _hit(a, d, T + KW + 1, dz11, ACC)
    return dz00, dz01, dz10, dz11


@triton.jit
def _maxpool2d_bwd_cells_kernel(
    dy_ptr, arg_ptr, dx_ptr,  # as _maxpool2d_bwd_kernel's (argmax int8)
    C, H, W, OH, OW,
    sdn, sdc, sdh, sdw,
    san, sac, sah, saw,
    sxn, sxc, sxh, sxw,
    KH: tl.constexpr, KW: tl.constexpr,
    ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The backward where the stride is 2 both ways, with no padding or dilation and windows of at
    most 4 (pools_in_cells; AlexNet's 3x3/2): a thread takes one channel of a cell of 2 x 2 input
    positions (2 ci + I, 2 cj + J). They share their candidate windows (oh = ci - t, ow = cj - u; t, u
    in 0, 1) and each one's offset in each is known when compiling (2 t + I, 2 u + J): a window's
    argmax and dy are loaded once for the 4 positions and only the pairs that can hit are tested (9
    for 3x3, where _maxpool2d_bwd_kernel tests 36 for 4 inputs and divides to find each). Each
    position adds its windows in that kernel's order, from 0, bit for bit. Tiles are [BLOCK_S cells,
    BLOCK_C channels] of one sample on a 3-D grid (cell blocks, channel blocks, samples)."""
    CW = (W + 1) // 2
    NCELL = ((H + 1) // 2) * CW
    n = tl.program_id(2)
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    s = (tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S))[:, None]
    ci = s // CW
    cj = s % CW
    inside = (s < NCELL) & (c < C)
    arg_w = arg_ptr + n * san + c * sac + ci * sah + cj * saw
    dy_w = dy_ptr + n * sdn + c * sdc + ci * sdh + cj * sdw
    dz00 = tl.zeros([BLOCK_S, BLOCK_C], ACC)
    dz01 = dz00
    dz10 = dz00
    dz11 = dz00
    for t in tl.static_range((KH + 1) // 2):
        for u in tl.static_range((KW + 1) // 2):
            ok = inside & (ci >= t) & (ci - t < OH) & (cj >= u) & (cj - u < OW)
            a = tl.load(arg_w - (t * sah + u * saw), mask=ok, other=-1)
            d = tl.load(dy_w - (t * sdh + u * sdw), mask=ok, other=0.0)
            dz00, dz01, dz10, dz11 = _cell_hits(a, d, t, u, KH, KW, dz00, dz01, dz10, dz11, ACC)
    dx = dx_ptr + n * sxn + c * sxc + (2 * ci) * sxh + (2 * cj) * sxw
    right = (2 * cj + 1 < W)
    below = (2 * ci + 1 < H)
    ty = dx_ptr.dtype.element_ty
    tl.store(dx, dz00.to(ty), mask=inside)  # (a cell's first position is always in the plane)
    tl.store(dx + sxw, dz01.to(ty), mask=inside & right)
    tl.store(dx + sxh, dz10.to(ty), mask=inside & below)
    tl.store(dx + sxh + sxw, dz11.to(ty), mask=inside & below & right)


def _assert_pairs(kernel_size, stride, padding, dilation) -> None:
    """The launchers' preconditions on the window (fastalex.ops.maxpool2d checks them for users and raises)."""
    assert all(len(v) == 2 for v in (kernel_size, stride, padding, dilation))
    assert min(*kernel_size, *stride, *dilation) >= 1 and min(padding) >= 0
    assert padding[0] <= kernel_size[0] // 2 and padding[1] <= kernel_size[1] // 2, "padding <= kernel_size // 2"


def _as4d(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 4 else t.unsqueeze(0)


def _block(total: int) -> tuple[int, int]:
    """(BLOCK, num_warps): big blocks under the interpreter, where each program costs Python time."""
    if is_interpreting():
        block = min(4096, next_pow2(total))
    else:
        block = 512 if total >= 2**20 else 256
    assert block & (block - 1) == 0, "BLOCK must be a power of two (tl.arange)"
    return block, 4


def _cell_blocks(C: int, cells: int) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_C, num_warps) of the cells backward: channels along a warp (channels_last rows
    coalesce), 256 cells x channels a tile, 2 a thread; under the interpreter large tiles."""
    if is_interpreting():
        block_c = min(next_pow2(C), 256)
        return min(next_pow2(cells), max(2**14 // block_c, 1)), block_c, 4
    block_c = min(next_pow2(C), 32)
    return max(256 // block_c, 1), block_c, 4


def maxpool2d_forward(x: torch.Tensor, kernel_size, stride, padding, dilation, ceil_mode: bool = False,
                      return_indices: bool = False):
    """x (N, C, H, W) or (C, H, W) -> (y, argmax, indices) of shape (N, C, OH, OW) or (C, OH, OW).

    argmax holds window offsets kh * KW + kw (dtype argmax_dtype(kernel_size)); indices is torch's
    int64 ih * W + iw when return_indices, else an empty int64 tensor. Outputs take x's memory format.
    """
    assert takes(x) and x.dim() in (3, 4) and min(x.shape[-3:]) > 0, f"input {tuple(x.shape)}"
    _assert_pairs(kernel_size, stride, padding, dilation)
    C, H, W = x.shape[-3:]
    OH, OW = output_size(H, W, kernel_size, stride, padding, dilation, ceil_mode)
    assert OH >= 1 and OW >= 1, f"output size ({OH}, {OW})"
    shape = (*x.shape[:-2], OH, OW)
    check_int32("input", x)
    check_int32("output", shape)
    fmt = suggest_memory_format(x)
    y = empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    arg = empty(shape, dtype=argmax_dtype(kernel_size), device=x.device, memory_format=fmt)
    if return_indices:
        idx = empty(shape, dtype=torch.int64, device=x.device, memory_format=fmt)
    else:
        idx = torch.empty((0,), dtype=torch.int64, device=x.device)
    total = y.numel()
    if total == 0:
        return y, arg, idx
    x4, y4, a4 = _as4d(x), _as4d(y), _as4d(arg)
    i4 = _as4d(idx) if return_indices else a4  # never written when not requested
    BLOCK, warps = _block(total)
    _maxpool2d_fwd_kernel[(cdiv(total, BLOCK),)](
        x4, y4, a4, i4, total, C, H, W, OH, OW,
        *x4.stride(), *y4.stride(),
        *(int(v) for v in (*stride, *padding, *dilation)),
        KH=kernel_size[0], KW=kernel_size[1], CHANNELS_LAST=fmt == torch.channels_last,
        WRITE_INDICES=return_indices, ACC=acc_dtype(x.dtype), BLOCK=BLOCK, num_warps=warps,
    )
    return y, arg, idx


def maxpool2d_backward(dy: torch.Tensor, argmax: torch.Tensor, input_size, kernel_size, stride, padding,
                       dilation, channels_last: bool = False) -> torch.Tensor:
    """dy, argmax (N, C, OH, OW) or (C, OH, OW) -> dx of shape input_size (channels_last if asked).

    dx[n, c, ih, iw] = sum of dy over the outputs whose argmax is (ih, iw), added in a fixed order.
    """
    input_size = tuple(int(s) for s in input_size)
    assert takes(dy) and len(input_size) in (3, 4) and dy.dim() == len(input_size) and dy.shape[:-2] == input_size[:-2], \
        f"grad_output {tuple(dy.shape)}, input_size {input_size}"
    assert takes(argmax, dtypes=(argmax_dtype(kernel_size),)) and argmax.shape == dy.shape
    assert argmax.device == dy.device and (len(input_size) == 4 or not channels_last)
    _assert_pairs(kernel_size, stride, padding, dilation)
    C, H, W = input_size[-3:]
    OH, OW = dy.shape[-2:]
    check_int32("grad_output", dy)
    check_int32("argmax", argmax)
    check_int32("grad_input", input_size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dx = empty(input_size, dtype=dy.dtype, device=dy.device, memory_format=fmt)
    total = dx.numel()
    if total == 0:
        return dx
    dy4, a4, dx4 = _as4d(dy), _as4d(argmax), _as4d(dx)
    if pools_in_cells(kernel_size, stride, padding, dilation) and dx4.shape[0] <= MAX_GRID_YZ:
        cells = cdiv(H, 2) * cdiv(W, 2)
        block_s, block_c, warps = _cell_blocks(C, cells)
        _maxpool2d_bwd_cells_kernel[(cdiv(cells, block_s), cdiv(C, block_c), dx4.shape[0])](
            dy4, a4, dx4, C, H, W, OH, OW, *dy4.stride(), *a4.stride(), *dx4.stride(),
            KH=kernel_size[0], KW=kernel_size[1], ACC=acc_dtype(dy.dtype), BLOCK_S=block_s, BLOCK_C=block_c,
            num_warps=warps,
        )
        return dx
    BLOCK, warps = _block(total)
    _maxpool2d_bwd_kernel[(cdiv(total, BLOCK),)](
        dy4, a4, dx4, total, C, H, W, OH, OW,
        *dy4.stride(), *a4.stride(), *dx4.stride(),
        *(int(v) for v in (*stride, *padding, *dilation)),
        KH=kernel_size[0], KW=kernel_size[1], CHANNELS_LAST=channels_last,
        ACC=acc_dtype(dy.dtype), BLOCK=BLOCK, num_warps=warps,
    )
    return dx
