"""Sweep the conv kernels' launch configs at AlexNet's real shapes on a GPU, against cuDNN per GEMM.

    python -m perf.tune [--batch 128] [--dtypes float32,bfloat16] [--layouts nhwc[,nchw]]
                        [--kinds fwd,dgrad,wgrad,wgrad_taps] [--layers conv1,...] [--compile-workers 8]
                        [--out DIR]

For each layer, kind (fwd: conv + bias, with the ReLU where the model has it in the conv's epilogue
(ConvShape.relu: not conv1's and conv2's, which the LRN + max-pool after them apply); dgrad: input
gradient, at stride 1 the forward kernel on the flipped weight as autograd runs it; all with dy
already under the ReLU mask; wgrad: weight and bias gradients with the flat kernel, wgrad_taps: with
the per-tap kernel), dtype and layout, every config in CONFIGS[kind] (and, for the weight gradients,
three split-K factors) is timed with triton.testing.do_bench (median) next to the heuristic's choice and
cuDNN's own kernel for the same GEMM (aten.convolution_backward for the gradients). The launches
take the flags fastalex.ops.conv2d gives them (memory format, tf32). Autograd runs one of the two
weight-gradient kernels per case (kernels.conv2d.default_taps); a row's `autograd` says whether it is
that one (the other is timed as the alternative; the per-tap kernel is not swept on NCHW inputs,
where its channel reads are strided and autograd never picks it; on a GPU no NCHW launch is
autograd's, since the op runs NCHW input channels_last, so --layouts defaults to nhwc). Compilation
runs first in --compile-workers processes (Triton's on-disk cache is shared), so the timing pass,
in one process, only times. Writes tune.json and prints the best config per case.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch

from perf.shapes import CONV, tiny

DEVICE = "cuda"  # "cpu" in --smoke runs (Triton's interpreter)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
CONFIGS = {
    "fwd": [(128, 128, 32, 8, 3), (128, 128, 32, 4, 3), (128, 128, 64, 8, 3), (128, 64, 32, 4, 4), (128, 64, 64, 4, 3),
            (64, 128, 32, 4, 4), (64, 64, 64, 4, 4), (256, 128, 32, 8, 3), (128, 256, 32, 8, 3)],
    "wgrad": [(64, 128, 32, 4, 4), (128, 128, 32, 8, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3),
              (64, 64, 64, 4, 4), (128, 256, 32, 8, 3)],
    # per tap: BLOCK_N spans one tap's input channels (AlexNet: 48 to 384)
    "wgrad_taps": [(128, 128, 32, 8, 3), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4), (128, 64, 64, 4, 3),
                   (64, 64, 64, 4, 4), (128, 32, 64, 4, 3),
                   # the wide tiles (one tap a program) both ways round, and 128 x 128 at three taps
                   (256, 128, 16, 8, 4), (128, 256, 16, 8, 4), (128, 128, 16, 8, 3)],
}
CONFIGS["dgrad"] = CONFIGS["fwd"]
KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


def _cfg(t) -> dict:
    return dict(zip(KEYS, t))


def _cases(args) -> list[tuple]:
    out = []
    for real in CONV:
        s = tiny(real) if args.smoke else real
        if args.layers and s.name not in args.layers:
            continue
        for kind in args.kinds:
            if kind == "dgrad" and not s.input_needs_grad:
                continue
            if kind == "wgrad_taps" and real.c_in // real.groups < 16:  # conv1's 3 channels: the flat kernel
                continue
            for dtype in args.dtypes:
                for layout in args.layouts:
                    if kind == "wgrad_taps" and layout == "nchw":
                        continue
                    out.append((s, kind, dtype, layout))
    return out


def _tensors(s, dtype: str, layout: str, batch: int):
    dt = getattr(torch, dtype)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(batch, s.c_in, s.size, s.size, device=DEVICE, dtype=dt).contiguous(memory_format=fmt)
    w = (torch.randn(s.c_out, s.c_in // s.groups, s.kernel, s.kernel, device=DEVICE, dtype=dt) * 0.05)
    w = w.contiguous(memory_format=fmt)
    b = torch.randn(s.c_out, device=DEVICE, dtype=dt)
    y = torch.relu(torch.nn.functional.conv2d(x, w, b, s.stride, s.padding, 1, s.groups))
    # The output gradient as autograd hands it to both gradient kernels: already under the ReLU's mask
    # (the conv's own, or for conv1 and conv2 the fused LRN + max-pool's).
    dy = torch.ops.aten.threshold_backward(torch.randn_like(y), y, 0)
    return x, w, b, y, dy


def _calls(s, kind, x, w, b, y, dy):
    """(fastalex(config, split) callable, cuDNN callable, whether autograd makes this launch) for one GEMM."""
    from fastalex.kernels import conv2d as K
    from fastalex.ops.conv2d import CHANNELS_LAST_DEVICES, _channels_last

    st, pad, dil = (s.stride,) * 2, (s.padding,) * 2, (1, 1)
    cl = _channels_last(x)  # the output's (and the input gradient's) memory format, as the op picks it
    tf32 = torch.backends.cudnn.allow_tf32
    autograd = not kind.startswith("wgrad") or (kind == "wgrad_taps") == K.default_taps(x, w.shape)
    # On a GPU the op runs NCHW input channels_last (CHANNELS_LAST_DEVICES): its NCHW launches are
    # only the alternative there, timed for comparison.
    autograd = autograd and (cl or torch.device(DEVICE).type not in CHANNELS_LAST_DEVICES)
    if kind == "fwd":
        def fast(cfg, split=None):
            return K.conv2d_forward(x, w, b, st, pad, dil, s.groups, y.shape[2:], s.relu, cl, tf32, config=cfg)

        def ref():
            z = torch.nn.functional.conv2d(x, w, b, s.stride, s.padding, 1, s.groups)
            return torch.relu(z) if s.relu else z
    elif kind == "dgrad":
        def fast(cfg, split=None):
            return K.conv2d_input_grad(dy, w, x.shape, st, pad, dil, s.groups, cl, tf32, config=cfg)

        def ref():
            return torch.ops.aten.convolution_backward(dy, x, w, None, st, pad, dil, False, [0, 0], s.groups,
                                                       [True, False, False])
    else:
        def fast(cfg, split=None):
            return K.conv2d_weight_grad(dy, x, w.shape, st, pad, dil, s.groups, tf32, split_k=split, config=cfg,
                                        taps=kind == "wgrad_taps")

        def ref():
            return torch.ops.aten.convolution_backward(dy, x, w, [s.c_out], st, pad, dil, False, [0, 0], s.groups,
                                                       [False, True, True])
    return fast, ref, autograd


def _splits(s, cfg, batch, kind="wgrad", rows=False) -> list[int | None]:
    """Split-K factors to time a weight-gradient config at: the launcher's own for it (from the tiles
    the launch makes: taps a program and a kernel row a tap included), half and twice that."""
    from fastalex.kernels import conv2d as K
    import triton

    shape = (s.c_out // s.groups, s.c_in // s.groups, s.kernel, s.kernel)
    tiles = K.wgrad_tiles(shape, cfg, kind == "wgrad_taps", rows) * s.groups
    k_blocks = triton.cdiv(batch * s.out_size**2, cfg["BLOCK_K"])
    auto = K._split_k(tiles, k_blocks, torch.device(DEVICE))
    return sorted({max(1, auto // 2), auto, min(2 * auto, k_blocks)})


def _compile_worker(args, shard: int, nshards: int) -> None:
    torch.backends.cudnn.benchmark = True
    for i, (s, kind, dtype, layout) in enumerate(_cases(args)):
        if i % nshards != shard:
            continue
        x, w, b, y, dy = _tensors(s, dtype, layout, args.batch)
        fast, _, _ = _calls(s, kind, x, w, b, y, dy)
        for t in CONFIGS[kind]:
            try:
                fast(_cfg(t))
            except Exception:  # noqa: BLE001 (the timing pass records the error)
                pass
        fast(None)
    torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtypes", type=lambda t: t.split(","), default="float32,bfloat16")
    p.add_argument("--layouts", type=lambda t: t.split(","), default="nhwc")  # nchw: what autograd no longer runs on a GPU
    p.add_argument("--kinds", type=lambda t: t.split(","), default="fwd,dgrad,wgrad,wgrad_taps")
    p.add_argument("--layers", type=lambda t: t.split(","), default=None)
    p.add_argument("--compile-workers", type=int, default=8)
    p.add_argument("--out", default=os.environ.get("OUT") or "perf/results/local")
    p.add_argument("--smoke", action="store_true",
                   help="no GPU needed: tiny shapes, two configs, in Triton's CPU interpreter (tests this script)")
    args = p.parse_args(argv)
    global DEVICE
    if args.smoke and os.environ.get("TRITON_INTERPRET") == "1":
        DEVICE, args.compile_workers = "cpu", 1
    elif not torch.cuda.is_available():
        print("perf.tune needs a CUDA device (or --smoke with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    import triton.testing

    from fastalex.kernels import conv2d as K

    if args.compile_workers > 1:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_compile_worker, args=(args, i, args.compile_workers))
                 for i in range(args.compile_workers)]
        for pr in procs:
            pr.start()
        for pr in procs:
            pr.join()
    torch.backends.cudnn.benchmark = True

    def bench(fn):
        if DEVICE == "cpu":
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")

    configs = {k: v[:2] for k, v in CONFIGS.items()} if args.smoke else CONFIGS
    rows = []
    for s, kind, dtype, layout in _cases(args):
        x, w, b, y, dy = _tensors(s, dtype, layout, args.batch)
        fast, ref, autograd = _calls(s, kind, x, w, b, y, dy)
        # (the per-tap kernel takes a kernel row a tap where the launcher would: its tiles differ)
        row_taps = kind == "wgrad_taps" and K.default_rows(x, w.shape, (1, 1))
        cudnn_ms = bench(ref)
        case = dict(layer=s.name, kind=kind, dtype=dtype, layout=layout, autograd=autograd, cudnn_ms=cudnn_ms)
        heur_ms = bench(lambda: fast(None))
        results = []
        for t in configs[kind]:
            cfg = _cfg(t)
            for split in (_splits(s, cfg, args.batch, kind, row_taps) if kind.startswith("wgrad") else [None]):
                try:
                    ms = bench(lambda: fast(cfg, split))
                    err = None
                except Exception as e:  # noqa: BLE001
                    ms, err = None, f"{type(e).__name__}: {str(e)[:200]}"
                results.append(dict(config=t, split=split, ms=ms, error=err))
        ok = [r for r in results if r["ms"]]
        top = min(ok, key=lambda r: r["ms"]) if ok else None
        row = dict(case, heuristic_ms=heur_ms, results=results, best=top,
                   best_vs_cudnn=cudnn_ms / top["ms"] if top else None, heuristic_vs_cudnn=cudnn_ms / heur_ms)
        rows.append(row)
        label = kind if autograd else f"{kind} (alternative)"
        print(f"{s.name:9} {label:5} {dtype:8} {layout}: cuDNN {cudnn_ms:.3f} ms, heuristic {heur_ms:.3f} "
              f"({cudnn_ms / heur_ms:.2f}x), best {top['ms'] if top else float('nan'):.3f} "
              f"({row['best_vs_cudnn'] or 0:.2f}x) {top['config'] if top else ''} split={top and top['split']}",
              flush=True)
        del x, w, b, y, dy
    import triton

    env = dict(card=torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (smoke, interpreter)", torch=torch.__version__, triton=triton.__version__,
               cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if DEVICE == "cuda" else None, batch=args.batch)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
