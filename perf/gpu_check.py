"""GPU check: every fastalex kernel at AlexNet's real shapes on a CUDA device, then timed against torch.

    python -m perf.gpu_check [--batch 128] [--out DIR] [--dtypes float32,bfloat16] [--quick]

1. Correctness: forward and every gradient against torch in float64 on the same GPU, on fresh
   random inputs, NCHW and channels_last, each dtype (fp32 may use tf32 as cuDNN does by default).
2. The whole AlexNet (every variant, fp32 and bf16 autocast): forward + backward with the Triton
   kernels against torch's ops, compared and timed.
3. Speed: forward and backward medians (triton.testing.do_bench) of fastalex (Triton) vs torch
   (cuDNN with cudnn.benchmark=True; torch's composite LRN), in both layouts; speed-up = torch / fastalex.
Writes gpu_check.json (card, driver, versions, date, rows) into --out ($OUT, else perf/results/local)
and prints a table. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as TF

import fastalex
import fastalex.functional as F
from perf.shapes import CONV, LRN, LRN_ARGS, POOL, tiny

TOL = {torch.float32: 5e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def environment(device: str) -> dict:
    import triton

    if device != "cuda":
        return {"card": f"{device} (smoke run, Triton interpreter)", "torch": torch.__version__,
                "triton": triton.__version__, "python": platform.python_version(),
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    return {
        "card": torch.cuda.get_device_name(0), "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1), "driver": driver, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cudnn_benchmark": True, "allow_tf32_conv": torch.backends.cudnn.allow_tf32,
    }


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if layout == "nhwc" and t.dim() == 4 else t.contiguous()


def bench(fn, quick: bool) -> float:
    """Median milliseconds of fn: CUDA events via do_bench on a GPU, one wall-clock run elsewhere (smoke)."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=20 if quick else 60, return_mode="median")


def run_case(op, layer, dtype, layout, *args):
    """_run_case, with an error recorded as a failed check: one broken case must not hide the rest."""
    try:
        _run_case(op, layer, dtype, layout, *args)
    except Exception as e:  # noqa: BLE001 (reported, and the exit status says so)
        args[-1].append(dict(op=op, layer=layer, dtype=str(dtype)[6:], layout=layout, tensor="error",
                             rel_err=float("inf"), tol=0.0, ok=False, error=f"{type(e).__name__}: {str(e)[:800]}"))
        print(f"ERROR {op} {layer} {dtype} {layout}: {type(e).__name__}: {str(e)[:800]}", flush=True)


def _run_case(op: str, layer: str, dtype, layout, make, fwd_fast, fwd_torch, flops, nbytes, quick, rows, checks):
    """Check one op at one shape against float64, then time forward and backward of both."""
    inputs = make(dtype, layout)
    ref_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    with fastalex.backend("triton"):
        y = fwd_fast(*inputs)
    ref = fwd_torch(*ref_inputs)
    dy = torch.randn_like(ref)
    grads = torch.autograd.grad(y, [t for t in inputs if t.requires_grad], dy.to(y.dtype))
    ref_back = ref
    if op == "conv2d_relu":
        # The gradients follow the kernel's own ReLU mask: with tf32 products, outputs within
        # rounding of zero flip sign, and each flip moves a whole dy element (a relative error
        # near 1e-2 at these sizes that says nothing about the backward kernels).
        ref_back = fwd_torch.pre(*ref_inputs) * ~(y.detach() <= 0)
    elif op == "lrn_max_pool2d":
        # The kernel pools LRN values rounded to the dtype (as the unfused ops do): bf16 ties then pick
        # the first maximum, where float64 picks the true one, and each such window moves a whole dy
        # element. The gradient reference pools the rounded values too (identity gradient through the rounding).
        ref_back = fwd_torch.rounded(*ref_inputs, dtype=dtype)
    ref_grads = torch.autograd.grad(ref_back, [t for t in ref_inputs if t.requires_grad], dy)
    names = ["output"] + [f"grad{i}" for i in range(len(grads))]
    for name, a, r in zip(names, (y, *grads), (ref, *ref_grads)):
        err = rel_err(a, r)
        checks.append(dict(op=op, layer=layer, dtype=str(dtype)[6:], layout=layout, tensor=name, rel_err=err,
                           tol=TOL[dtype], ok=err <= TOL[dtype]))
    del ref, ref_grads, ref_inputs

    wrt = [t for t in inputs if t.requires_grad]
    times = {}
    for impl, fn in (("fastalex", fwd_fast), ("torch", fwd_torch)):
        with fastalex.backend("triton" if impl == "fastalex" else "torch"):
            out = fn(*inputs)
            g = torch.randn_like(out)
            times[impl, "fwd"] = bench(lambda: fn(*inputs), quick)
            times[impl, "bwd"] = bench(lambda: torch.autograd.grad(out, wrt, g, retain_graph=True), quick)
    for pas in ("fwd", "bwd"):
        f_ms, t_ms = times["fastalex", pas], times["torch", pas]
        n_flops = flops * (1 if pas == "fwd" else len(wrt))
        rows.append(dict(op=op, layer=layer, dtype=str(dtype)[6:], layout=layout, **{"pass": pas},
                         fastalex_ms=f_ms, torch_ms=t_ms, speedup=t_ms / f_ms, flops=n_flops,
                         bytes=nbytes * (1 if pas == "fwd" else 2),
                         fastalex_tflops=n_flops / f_ms / 1e9 if n_flops else None,
                         fastalex_gbps=nbytes * (1 if pas == "fwd" else 2) / f_ms / 1e6))


def _lrn_pool_ref(x):
    """torch's ops for lrn_max_pool2d(relu=True), as AlexNet runs it (the conv's ReLU first): what the
    fused kernel replaces (timed as the baseline)."""
    return TF.max_pool2d(TF.local_response_norm(TF.relu(x), **LRN_ARGS), 3, 2)


def _lrn_pool_rounded(x, dtype):
    """_lrn_pool_ref with the LRN values rounded to dtype before the pool, the identity as their gradient."""
    z = TF.local_response_norm(TF.relu(x), **LRN_ARGS)
    r = torch.where(torch.isfinite(z), z + (z.detach().to(dtype).to(z.dtype) - z.detach()), z)
    return TF.max_pool2d(r, 3, 2)


_lrn_pool_ref.rounded = _lrn_pool_rounded


def check_models(B: int, quick: bool, rows: list, checks: list, dev: str = "cuda", smoke: bool = False) -> None:
    """Whole AlexNet forward + backward, Triton kernels vs torch's ops, every variant (fp32 and bf16 autocast)."""
    from fastalex import AlexNet
    from fastalex.model import smallest_image_size

    for variant in ("torchvision",) if smoke else ("single", "paper", "torchvision"):
        size = smallest_image_size(variant) if smoke else (224 if variant == "torchvision" else 227)
        model = AlexNet(variant=variant, dropout=0.0, init="torch", image_size=size).to(dev)
        x = torch.randn(B, 3, size, size, device=dev)

        def step(precision):
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=precision != "fp32"):
                y = model(x)
            y.float().sum().backward()
            return y

        def run(backend, precision, tf32):
            model.zero_grad(set_to_none=True)
            saved = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = tf32
            try:
                with fastalex.backend(backend):
                    y = step(precision)
            finally:
                torch.backends.cudnn.allow_tf32 = saved
            return [y.detach().float()] + [p.grad.detach().float() for p in model.parameters()]

        # The reference: torch in true fp32 (no tf32). tf32 makes two implementations drift apart
        # through ReLU sign flips, so fp32 is compared without it (to 1e-3), and bf16 autocast
        # (~1e-1 from fp32 in early layers' gradients) must be no farther from fp32 than torch's own bf16.
        ref = run("torch", "fp32", tf32=False)
        for precision in ("fp32",) if smoke else ("fp32", "bf16-autocast"):
            ours = run("triton", precision, tf32=False)
            errs = [rel_err(a, r) for a, r in zip(ours, ref)]
            if precision == "fp32":
                worst, tol, ok = max(errs), 1e-3, max(errs) <= 1e-3
            else:
                theirs = [rel_err(a, r) for a, r in zip(run("torch", precision, tf32=False), ref)]
                excess = [e - (1.5 * t + 1e-2) for e, t in zip(errs, theirs)]
                worst, tol, ok = max(errs), 1.5 * max(theirs) + 1e-2, max(excess) <= 0
            checks.append(dict(op="alexnet", layer=variant, dtype=precision, layout="nchw", tensor="logits+grads",
                               rel_err=worst, tol=tol, ok=ok))
            times = {}
            for backend in ("triton", "torch"):
                with fastalex.backend(backend):
                    times[backend] = bench(lambda: step(precision), quick)
            rows.append(dict(op="alexnet step", layer=variant, dtype=precision, layout="nchw", **{"pass": "fwd+bwd"},
                             fastalex_ms=times["triton"], torch_ms=times["torch"],
                             speedup=times["torch"] / times["triton"], flops=0, bytes=0, fastalex_tflops=None,
                             fastalex_gbps=0.0))
        del model, x
        if dev == "cuda":
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--out", default=os.environ.get("OUT") or "perf/results/local")
    p.add_argument("--quick", action="store_true", help="shorter timing runs")
    p.add_argument("--smoke", action="store_true",
                   help="no GPU needed: tiny shapes in Triton's CPU interpreter, to test this script itself")
    args = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not (args.smoke and os.environ.get("TRITON_INTERPRET") == "1"):
        print("gpu_check needs a CUDA device (or --smoke with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    B = args.batch
    # (torch's own CPU LRN has no bf16 kernel: the smoke run stays in fp32)
    dtypes = [torch.float32] if args.smoke else [getattr(torch, d) for d in args.dtypes.split(",")]
    rows, checks = [], []
    conv_shapes = [tiny(s) for s in CONV] if args.smoke else CONV
    lrn_shapes = [(n, min(c, 8), min(s, 7)) for n, c, s in LRN] if args.smoke else LRN
    pool_shapes = [(n, min(c, 8), min(s, 9)) for n, c, s in POOL] if args.smoke else POOL

    # Memory bandwidth of this card (read + write of a 1 GiB copy), for the memory-bound kernels.
    src = torch.empty(2**16 if args.smoke else 2**28, device=dev)
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src), args.quick)
    bandwidth = 2 * src.numel() * 4 / copy_ms / 1e6  # GB/s
    del src, dst

    for dtype in dtypes:
        esize = torch.empty((), dtype=dtype).element_size()
        for s in conv_shapes:
            def make(dtype, layout, s=s):
                x = to_layout(torch.randn(B, s.c_in, s.size, s.size, device=dev, dtype=dtype), layout)
                w = to_layout(torch.randn(s.c_out, s.c_in // s.groups, s.kernel, s.kernel, device=dev, dtype=dtype)
                              * (2.0 / (s.c_in // s.groups * s.kernel**2)) ** 0.5, layout)
                b = torch.randn(s.c_out, device=dev, dtype=dtype) * 0.1
                return [x.requires_grad_(s.input_needs_grad), w.requires_grad_(), b.requires_grad_()]

            conv_kw = dict(stride=s.stride, padding=s.padding, groups=s.groups)
            nbytes = esize * (B * s.c_in * s.size**2 + B * s.c_out * s.out_size**2
                              + s.c_out * s.c_in // s.groups * s.kernel**2)
            def conv_ref(x, w, b, conv_kw=conv_kw):
                return torch.relu(TF.conv2d(x, w, b, **conv_kw))

            conv_ref.pre = lambda x, w, b, conv_kw=conv_kw: TF.conv2d(x, w, b, **conv_kw)
            for layout in ("nchw", "nhwc"):
                run_case("conv2d_relu", s.name, dtype, layout, make,
                         lambda x, w, b, conv_kw=conv_kw: F.conv2d_relu(x, w, b, **conv_kw), conv_ref,
                         2 * s.macs(B), nbytes, args.quick, rows, checks)
        for name, c, size in lrn_shapes:
            def make(dtype, layout, c=c, size=size):
                return [to_layout(torch.randn(B, c, size, size, device=dev, dtype=dtype) * 3, layout).requires_grad_()]

            for layout in ("nchw", "nhwc"):
                run_case("local_response_norm", name, dtype, layout, make,
                         lambda x: F.local_response_norm(x, **LRN_ARGS),
                         lambda x: TF.local_response_norm(x, **LRN_ARGS),
                         0, 2 * esize * B * c * size * size, args.quick, rows, checks)
        for name, c, size in lrn_shapes:  # relu -> lrn1 -> pool1 and lrn2 -> pool2 fused, vs torch's ops
            out = (size - 3) // 2 + 1

            def make(dtype, layout, c=c, size=size):
                return [to_layout(torch.randn(B, c, size, size, device=dev, dtype=dtype) * 3, layout).requires_grad_()]

            for layout in ("nchw", "nhwc"):
                run_case("lrn_max_pool2d", name.replace("lrn", "relu+lrn+pool"), dtype, layout, make,
                         lambda x: F.lrn_max_pool2d(x, **LRN_ARGS, relu=True), _lrn_pool_ref,
                         0, esize * B * c * (size * size + out * out), args.quick, rows, checks)
        for name, c, size in pool_shapes:
            out = (size - 3) // 2 + 1

            def make(dtype, layout, c=c, size=size):
                return [to_layout(torch.randn(B, c, size, size, device=dev, dtype=dtype), layout).requires_grad_()]

            for layout in ("nchw", "nhwc"):
                run_case("max_pool2d", name, dtype, layout, make,
                         lambda x: F.max_pool2d(x, 3, 2), lambda x: TF.max_pool2d(x, 3, 2),
                         0, esize * B * c * (size * size + out * out), args.quick, rows, checks)
        if dev == "cuda":
            torch.cuda.empty_cache()
    try:
        check_models(B, args.quick, rows, checks, dev, args.smoke)
    except Exception as e:  # noqa: BLE001
        checks.append(dict(op="alexnet", layer="all", dtype="", layout="", tensor="error", rel_err=float("inf"),
                           tol=0.0, ok=False, error=f"{type(e).__name__}: {str(e)[:800]}"))
        print(f"ERROR alexnet: {type(e).__name__}: {e}", flush=True)

    for r in rows:
        r["fraction_of_bandwidth"] = r["fastalex_gbps"] / bandwidth
    env = environment(dev)
    env["measured_copy_gbps"] = bandwidth
    result = dict(environment=env, batch=B, checks=checks, timings=rows,
                  all_checks_pass=all(c["ok"] for c in checks))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    print_summary(result)
    return 0 if result["all_checks_pass"] else 1


def print_summary(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    env = result["environment"]
    t = Table(title=f"fastalex vs torch, batch {result['batch']}: {env['card']}, torch {env['torch']}, "
                    f"triton {env['triton']}, {env['date'][:10]}")
    for col in ("op", "layer", "dtype", "layout", "pass", "fastalex ms", "torch ms", "speed-up", "TFLOP/s", "% BW"):
        t.add_column(col, justify="right" if "ms" in col or col in ("speed-up", "TFLOP/s", "% BW") else "left")
    for r in result["timings"]:
        t.add_row(r["op"], r["layer"], r["dtype"], r["layout"], r["pass"], f"{r['fastalex_ms']:.3f}",
                  f"{r['torch_ms']:.3f}", f"{r['speedup']:.2f}x",
                  f"{r['fastalex_tflops']:.1f}" if r["fastalex_tflops"] else "",
                  f"{100 * r['fraction_of_bandwidth']:.0f}" if r["bytes"] and not r["flops"] else "")
    console = Console(width=140)
    console.print(t)
    bad = [c for c in result["checks"] if not c["ok"]]
    for c in bad:
        console.print(f"[red]FAIL[/red] {c['op']} {c['layer']} {c['dtype']} {c['layout']} {c['tensor']}: "
                      f"rel err {c['rel_err']:.2e} > {c['tol']:.0e} {c.get('error') or ''}")
    console.print(f"{len(result['checks']) - len(bad)}/{len(result['checks'])} correctness checks pass; "
                  f"copy bandwidth {env['measured_copy_gbps']:.0f} GB/s")


if __name__ == "__main__":
    sys.exit(main())
