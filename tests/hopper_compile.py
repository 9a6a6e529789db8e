"""Compile every kernel launch the launchers make at AlexNet's real shapes for Hopper (sm_90), no GPU needed.

The interpreter accepts what the GPU compiler rejects (tl.dot blocks under 16, non-power-of-two
blocks, shared memory over 227 KB, type errors in code the interpreter never lowers). This script
runs the launchers on meta tensors with kernel launches intercepted, then compiles each distinct
launch with Triton's real compiler for a Hopper target. Run without TRITON_INTERPRET:

    python tests/hopper_compile.py        # prints one JSON line per compiled kernel; exit 1 on failure
"""

from __future__ import annotations

import json
import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET: it compiles for a GPU"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import KernelInterface  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastalex.kernels import conv2d as conv  # noqa: E402
from fastalex.kernels import lrn, maxpool2d  # noqa: E402
from perf.shapes import CONV, LRN, LRN_ARGS, POOL  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024
PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
       torch.int8: "*i8", torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64"}

launches = []


def _record(self, grid):
    def launch(*args, **kwargs):
        launches.append((self, args, kwargs))

    return launch


KernelInterface.__getitem__ = _record


def _source(kernel, args, kwargs):
    """Triton's ASTSource and compile options for one intercepted launch."""
    names = kernel.arg_names
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    signature, constexprs = {}, {}
    for i, (name, param) in enumerate(zip(names, kernel.params)):
        v = bound[name]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[(i,)] = v
        elif isinstance(v, torch.Tensor):
            signature[name] = PTR[v.dtype]
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            signature[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        elif isinstance(v, float):
            signature[name] = "fp64" if "float64" in str(param.annotation) else "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {name}={v!r}")
    options = {k: v for k, v in kwargs.items() if k not in names}
    key = (kernel.__name__, tuple(sorted(signature.items())), tuple(sorted((k[0], repr(v)) for k, v in constexprs.items())),
           tuple(sorted(options.items())))
    named = {names[k[0]]: repr(v) for k, v in constexprs.items()}
    return key, ASTSource(fn=kernel, signature=signature, constexprs=constexprs), options, named


def _collect(batch: int) -> None:
    meta = dict(device="meta")
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        shapes = CONV if dtype in (torch.float32, torch.bfloat16) else CONV[1:2]
        for s in shapes:
            x = torch.empty(batch, s.c_in, s.size, s.size, dtype=dtype, **meta)
            w = torch.empty(s.c_out, s.c_in // s.groups, s.kernel, s.kernel, dtype=dtype, **meta)
            b = torch.empty(s.c_out, dtype=dtype, **meta)
            st, pd = (s.stride, s.stride), (s.padding, s.padding)
            y = conv.conv2d_forward(x, w, b, st, pd, (1, 1), s.groups, (s.out_size, s.out_size), relu=True)
            conv.conv2d_input_grad(y, y, w, x.shape, st, pd, (1, 1), s.groups, relu=True)
            conv.conv2d_weight_grad(y, y, x, w.shape, st, pd, (1, 1), s.groups, relu=True, split_k=4)
            # channels_last (NHWC), as the model runs on GPUs: the forward's per-tap K blocks, the input
            # gradient (ReLU applied before; stride 1 runs the forward kernel), both wgrad kernels
            xl, yl = (t.contiguous(memory_format=torch.channels_last) for t in (x, y))
            conv.conv2d_forward(xl, w, b, st, pd, (1, 1), s.groups, (s.out_size, s.out_size), relu=True,
                                channels_last=True)
            conv.conv2d_input_grad(yl, None, w, x.shape, st, pd, (1, 1), s.groups, relu=False, channels_last=True)
            conv.conv2d_weight_grad(yl, yl, xl, w.shape, st, pd, (1, 1), s.groups, relu=True, split_k=4)
            conv.conv2d_weight_grad(yl, None, xl, w.shape, st, pd, (1, 1), s.groups, relu=False, taps=False)
        for _, c, size in LRN:
            x = torch.empty(batch, c, size, size, dtype=dtype, **meta)
            lrn.lrn_forward(x, **LRN_ARGS)
            lrn.lrn_backward(x, x, **LRN_ARGS)
        for _, c, size in POOL:
            x = torch.empty(batch, c, size, size, dtype=dtype, **meta)
            y, arg, _ = maxpool2d.maxpool2d_forward(x, (3, 3), (2, 2), (0, 0), (1, 1), return_indices=True)
            maxpool2d.maxpool2d_backward(y, arg, x.shape, (3, 3), (2, 2), (0, 0), (1, 1))


def main() -> int:
    _collect(batch=int(os.environ.get("BATCH", "128")))
    seen, failures = set(), 0
    for kernel, args, kwargs in launches:
        key, src, options, named = _source(kernel, args, kwargs)
        if key in seen:
            continue
        seen.add(key)
        t0 = time.time()
        row = dict(kernel=kernel.__name__, options=options, constexprs=named)
        try:
            compiled = triton.compile(src, target=TARGET, options=options)
            row.update(ok=compiled.metadata.shared <= SMEM_LIMIT, shared=compiled.metadata.shared)
        except Exception as e:  # report every failing config, not just the first
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:500]}")
        row["seconds"] = round(time.time() - t0, 2)
        failures += not row["ok"]
        print(json.dumps(row), flush=True)
    print(json.dumps(dict(compiled=len(seen), failures=failures)))
    return 1 if failures or not seen else 0


if __name__ == "__main__":
    sys.exit(main())
