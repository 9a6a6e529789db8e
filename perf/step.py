"""Whole training step (forward, backward, SGD update) at batch 128: fastalex vs PyTorch eager vs torch.compile.

    python -m perf.step [--variants single,paper] [--precisions fp32,bf16] [--batch 128]
                        [--impls fastalex,fastalex-graph,eager,eager-cl,compile] [--compile-mode default]
                        [--steps 30] [--out DIR]

Every implementation trains the same AlexNet (same initial weights, same batch, dropout 0.5,
SGD momentum 0.9 and weight decay 5e-4, cross-entropy) and is timed over `steps` steps after
warm-up, each step between CUDA events; the median counts. Every implementation steps the same
optimizer, the Trainer's (fastalex.optim.sgd: torch's fused SGD), so the rows differ in the model only.

    fastalex          the Triton kernels (fastalex.backend("triton")), NCHW input
    fastalex-cl       the same, channels_last input
    fastalex-graph    the Triton step captured once in a CUDA graph and replayed (no launch gaps)
    eager / eager-cl  torch's ops (cuDNN, cudnn.benchmark=True), NCHW / channels_last
    compile           torch.compile(mode=--compile-mode) of the same model on torch's ops

fp32 lets cuDNN and cuBLAS use tf32 (torch's default for convolutions; set for matmuls here) and
so do the Triton kernels; bf16 is torch.autocast(bfloat16) with fp32 weights. Model FLOP
utilisation (MFU) = 3 x forward FLOPs (fastalex.flops) / step time / the card's measured bf16
matmul rate. Writes step.json to --out and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as TF

IMPLS = ("fastalex", "fastalex-cl", "fastalex-graph", "eager", "eager-cl", "compile")


def _parse_list(text: str, allowed) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list from {sorted(allowed)}, got {text!r}")
    return items


def matmul_rate(dtype=torch.bfloat16, n: int = 8192) -> float:
    """Measured dense matmul rate in TFLOP/s (random data, median of do_bench)."""
    import triton.testing

    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=200, return_mode="median")
    return 2 * n**3 / ms / 1e9


def _step_fn(model, opt, x, y, precision: str):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = TF.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def _graphed(model, opt, x, y, precision: str):
    """Capture one whole step (forward, backward, optimizer) in a CUDA graph; returns replay."""
    step = _step_fn(model, opt, x, y, precision)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        # autocast's weight-cast cache must be off while capturing (PyTorch's CUDA graphs notes)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=False):
            loss = TF.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return graph.replay


def time_steps(fn, steps: int, warmup: int = 3) -> list[float]:
    """Milliseconds of each of `steps` calls of fn, between CUDA events, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def run(variant: str, precision: str, impls: list[str], batch: int, steps: int, compile_mode: str) -> list[dict]:
    import fastalex
    from fastalex import AlexNet, flops, optim

    size = 224 if variant == "torchvision" else 227
    torch.manual_seed(0)
    base = AlexNet(variant=variant, init="torch", image_size=size).cuda()
    x = torch.randn(batch, 3, size, size, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    fwd_flops = flops.count(variant, image_size=size, batch_size=batch).flops_total
    rows = []
    for impl in impls:
        model = copy.deepcopy(base)
        xi = x.contiguous(memory_format=torch.channels_last) if impl.endswith("-cl") else x
        if impl.endswith("-cl"):
            model = model.to(memory_format=torch.channels_last)
        opt = optim.sgd(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        backend = "triton" if impl.startswith("fastalex") else "torch"
        row = dict(variant=variant, precision=precision, impl=impl, batch=batch, flops=3 * fwd_flops)
        try:
            with fastalex.backend(backend):
                if impl == "compile":
                    torch._dynamo.reset()
                    model = torch.compile(model, mode=None if compile_mode == "default" else compile_mode)
                if impl == "fastalex-graph":
                    fn = _graphed(model, opt, xi, y, precision)
                else:
                    fn = _step_fn(model, opt, xi, y, precision)
                times = time_steps(fn, steps, warmup=5 if impl == "compile" else 3)
            row.update(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times), error=None)
        except Exception as e:  # one failing implementation must not hide the others' numbers
            row.update(median_ms=None, error=f"{type(e).__name__}: {str(e)[:500]}")
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model, opt
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", type=lambda t: _parse_list(t, {"single", "paper", "torchvision"}),
                   default="single,paper")
    p.add_argument("--precisions", type=lambda t: _parse_list(t, {"fp32", "bf16"}), default="fp32,bf16")
    p.add_argument("--impls", type=lambda t: _parse_list(t, set(IMPLS)), default=",".join(IMPLS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--compile-mode", default="default", choices=("default", "max-autotune",
                                                                  "max-autotune-no-cudagraphs", "reduce-overhead"))
    p.add_argument("--out", default=os.environ.get("OUT") or "perf/results/local")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("perf.step needs a CUDA device", file=sys.stderr)
        return 2
    if args.batch < 1 or args.steps < 1:
        p.error("--batch and --steps must be positive")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 linear layers may use tf32, as the convs do

    rate = matmul_rate()
    rows = []
    for variant in args.variants:
        for precision in args.precisions:
            rows += run(variant, precision, args.impls, args.batch, args.steps, args.compile_mode)
    for r in rows:
        if r["median_ms"]:
            r["mfu_bf16"] = r["flops"] / r["median_ms"] / 1e9 / rate
            same = {o["impl"]: o["median_ms"] for o in rows
                    if (o["variant"], o["precision"]) == (r["variant"], r["precision"]) and o["median_ms"]}
            eager = [same[k] for k in ("eager", "eager-cl") if k in same]
            if eager:  # the faster of NCHW and channels_last
                r["speedup_vs_eager"] = min(eager) / r["median_ms"]
            if "compile" in same:
                r["speedup_vs_compile"] = same["compile"] / r["median_ms"]
    import triton

    env = dict(card=torch.cuda.get_device_name(0), torch=torch.__version__, cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version(), triton=triton.__version__,
               date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               bf16_matmul_tflops=rate, compile_mode=args.compile_mode)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step.json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
    print(f"\n{env['card']}, torch {env['torch']}, triton {env['triton']}, bf16 matmul {rate:.0f} TFLOP/s")
    print(f"{'variant':8} {'prec':5} {'impl':15} {'ms':>8} {'MFU':>6} {'vs eager':>9} {'vs compile':>10}")
    for r in rows:
        if r["median_ms"] is None:
            print(f"{r['variant']:8} {r['precision']:5} {r['impl']:15} FAILED {r['error'][:80]}")
            continue
        print(f"{r['variant']:8} {r['precision']:5} {r['impl']:15} {r['median_ms']:8.2f} {100 * r['mfu_bf16']:5.1f}%"
              f" {r.get('speedup_vs_eager', 0):8.2f}x {r.get('speedup_vs_compile', 0):9.2f}x")
    return 0 if all(r["median_ms"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
