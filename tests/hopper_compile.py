"""Compile every kernel launch the launchers make at AlexNet's real shapes for Hopper (sm_90), no GPU needed.

The interpreter accepts what the GPU compiler rejects (tl.dot blocks under 16, non-power-of-two
blocks, shared memory over 227 KB, type errors in code the interpreter never lowers). This script
runs the launchers on meta tensors with kernel launches intercepted, then compiles each distinct
launch with Triton's real compiler for a Hopper target, specialized as the JIT specializes it at
that launch (perf.static.specialize). Run without TRITON_INTERPRET:

    python tests/hopper_compile.py        # prints one JSON line per compiled kernel; exit 1 on failure
"""

from __future__ import annotations

import json
import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET: it compiles for a GPU"

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastalex.kernels import conv2d as conv  # noqa: E402
from fastalex.kernels import lrn, maxpool2d  # noqa: E402
from fastalex.kernels import lrn_maxpool2d  # noqa: E402
from perf.shapes import CONV, LRN, LRN_ARGS, POOL  # noqa: E402
# The interception and the JIT's specialization (ints equal to 1 as constants, 16-divisible ints and
# aligned pointers as tt.divisibility=16) are perf.static's: the kernels compiled here are the ones a
# real launch compiles, and the ones perf.static studies.
from perf.static import SMEM_PER_CTA, compile_spec, intercept, specialize  # noqa: E402


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
            conv.conv2d_input_grad(y, w, x.shape, st, pd, (1, 1), s.groups)
            conv.conv2d_weight_grad(y, x, w.shape, st, pd, (1, 1), s.groups, split_k=4)
            # channels_last (NHWC), as the model runs on GPUs: the forward's per-tap K blocks, the input
            # gradient (ReLU applied before; stride 1 runs the forward kernel), both wgrad kernels
            xl, yl = (t.contiguous(memory_format=torch.channels_last) for t in (x, y))
            conv.conv2d_forward(xl, w, b, st, pd, (1, 1), s.groups, (s.out_size, s.out_size), relu=True,
                                channels_last=True)
            conv.conv2d_input_grad(yl, w, x.shape, st, pd, (1, 1), s.groups, channels_last=True)
            conv.conv2d_weight_grad(yl, xl, w.shape, st, pd, (1, 1), s.groups, split_k=4)
            conv.conv2d_weight_grad(yl, xl, w.shape, st, pd, (1, 1), s.groups, taps=False)
        for _, c, size in LRN:
            x = torch.empty(batch, c, size, size, dtype=dtype, **meta)
            lrn.lrn_forward(x, **LRN_ARGS)
            lrn.lrn_backward(x, x, **LRN_ARGS)
        for _, c, size in POOL:
            x = torch.empty(batch, c, size, size, dtype=dtype, **meta)
            y, arg, _ = maxpool2d.maxpool2d_forward(x, (3, 3), (2, 2), (0, 0), (1, 1), return_indices=True)
            maxpool2d.maxpool2d_backward(y, arg, x.shape, (3, 3), (2, 2), (0, 0), (1, 1))
            # (AlexNet's 3x3/2 takes the cells backward; padded, the one-input-a-thread kernel)
            y, arg, _ = maxpool2d.maxpool2d_forward(x, (3, 3), (2, 2), (1, 1), (1, 1))
            maxpool2d.maxpool2d_backward(y, arg, x.shape, (3, 3), (2, 2), (1, 1), (1, 1))
        _collect_lrn_maxpool2d(batch, dtype)


def _collect_lrn_maxpool2d(batch: int, dtype: torch.dtype) -> None:
    """lrn1 -> pool1 and lrn2 -> pool2 fused: single net (groups 1) and towers (groups 2), NCHW and NHWC;
    in NHWC also with the conv's ReLU first (relu=True: what AlexNet trains with)."""
    for _, c, size in LRN:
        for groups in (1, 2):
            for fmt, relus in ((torch.contiguous_format, (False,)), (torch.channels_last, (False, True))):
                x = torch.empty(batch, c, size, size, dtype=dtype, device="meta").contiguous(memory_format=fmt)
                for relu in relus:
                    y, arg = lrn_maxpool2d.lrn_maxpool2d_forward(x, **LRN_ARGS, groups=groups, relu=relu)
                    lrn_maxpool2d.lrn_maxpool2d_backward(y, x, arg, **LRN_ARGS, groups=groups, relu=relu)


def main() -> int:
    with intercept() as launches:
        _collect(batch=int(os.environ.get("BATCH", "128")))
    seen, failures = set(), 0
    for launch in launches:
        kernel = launch.kernel
        spec = specialize(kernel, launch.args, launch.kwargs)
        key = spec.key(kernel)
        if key in seen:
            continue
        seen.add(key)
        t0 = time.time()
        options = {k: v for k, v in launch.kwargs.items() if k not in kernel.arg_names}
        row = dict(kernel=kernel.__name__, options=options,
                   constexprs=spec.named_constexprs(kernel), ones=spec.ones(kernel))
        try:
            compiled = compile_spec(kernel, spec)
            row.update(ok=compiled.metadata.shared <= SMEM_PER_CTA, shared=compiled.metadata.shared)
        except Exception as e:  # report every failing config, not just the first
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:500]}")
        row["seconds"] = round(time.time() - t0, 2)
        failures += not row["ok"]
        print(json.dumps(row), flush=True)
    print(json.dumps(dict(compiled=len(seen), failures=failures)))
    return 1 if failures or not seen else 0


if __name__ == "__main__":
    sys.exit(main())
