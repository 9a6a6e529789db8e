"""Known kernels for checking perf.static: a plain GEMM, a kernel that spills, a specialization probe.

    python -m perf._static_examples        # one JSON object: perf.static's rows for each (no GPU needed)

tests/test_static.py runs this in a subprocess without TRITON_INTERPRET (the analysis compiles for sm_90).
"""

from __future__ import annotations

import json
import sys

import torch
import triton
import triton.language as tl

from perf import static


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # c (M, N) = a (M, K) @ b (K, N): the textbook pointer-increment K loop, fp32 accumulator.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, tl.cdiv(K, BLOCK_K)):
        acc += tl.dot(tl.load(a_ptrs), tl.load(b_ptrs))
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _spill_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    # Every element stays live across the reduction: BLOCK / (32 * num_warps) values a thread, far
    # more than the 255 registers a thread can have at BLOCK=16384 and one warp.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(y_ptr + offs, x * x - tl.sum(x, axis=0))


@triton.jit
def _probe_kernel(x_ptr, n, one, odd, BLOCK: tl.constexpr):
    # At the launch below: n = 64 (divisible by 16), one = 1 (a constant), odd = 7 (neither).
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs * one, offs.to(tl.float32), mask=offs < n + odd)


# perf.static's time model needs the GEMM's (M, N, K, groups, K-loop trips), as for the conv kernels.
static.GEMMS["_gemm_kernel"] = lambda b, g: (b["M"], b["N"], b["K"], 1, triton.cdiv(b["K"], b["BLOCK_K"]))

GEMM = dict(M=4096, N=4096, K=4096, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def _launches() -> list[static.Launch]:
    meta = dict(device="meta")
    with static.intercept() as launches:
        g = GEMM
        a = torch.empty(g["M"], g["K"], dtype=torch.bfloat16, **meta)
        b = torch.empty(g["K"], g["N"], dtype=torch.bfloat16, **meta)
        c = torch.empty(g["M"], g["N"], dtype=torch.bfloat16, **meta)
        grid = (triton.cdiv(g["M"], g["BLOCK_M"]), triton.cdiv(g["N"], g["BLOCK_N"]))
        _gemm_kernel[grid](a, b, c, g["M"], g["N"], g["K"], *a.stride(), *b.stride(), *c.stride(),
                           BLOCK_M=g["BLOCK_M"], BLOCK_N=g["BLOCK_N"], BLOCK_K=g["BLOCK_K"],
                           num_warps=g["num_warps"], num_stages=g["num_stages"])
        x = torch.empty(16384, dtype=torch.float32, **meta)
        _spill_kernel[(1,)](x, x, BLOCK=16384, num_warps=1)
        _probe_kernel[(1,)](x, 64, 1, 7, BLOCK=128, num_warps=4)
    return launches


def main() -> int:
    static.require_compiler()
    gemm, spill, probe = _launches()
    out = dict(gemm=static.analyse(gemm), spill=static.analyse(spill))
    spec = static.specialize(probe.kernel, probe.args, probe.kwargs)
    out["probe"] = dict(ones=spec.ones(probe.kernel), divisible_16=spec.divisible(probe.kernel),
                        signature=spec.signature, ttir=static.compile_spec(probe.kernel, spec).asm["ttir"])
    print(json.dumps(out, default=static._jsonable))
    return 0


if __name__ == "__main__":
    sys.exit(main())
