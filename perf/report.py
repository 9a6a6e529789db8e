"""Compute breakdown of one AlexNet forward pass: parameters, FLOPs and measured time per layer.

    python -m perf.report [--variant single] [--image-size 227] [--batch-size N] [--device cuda|cpu]
                          [--backend torch|triton|both] [--dtype float32] [--warmup W] [--repeats R]
                          [--json PATH] [--markdown PATH] [--plot PATH]

Counts come from fastalex.flops.count (MACs of conv and FC layers; FLOPs = 2 x MACs). Times: one
forward pass (torch backend, eval mode, no grad) captures every layer's real input; then each layer
alone runs on that input, `warmup` times untimed and `repeats` times timed, and the median counts
(CUDA events around each call on a GPU, with cudnn.benchmark on; wall clock on the CPU). The
whole forward pass is timed the same way for comparison with the sum of the layers. On the Triton
backend, each LRN and the max-pool after it run as one fused op (fastalex.nn.LRNMaxPool2d), timed as
one on the LRN's row (the pool's row shows 0; both rows carry "fused": "lrn1+pool1"). GFLOP/s =
2 x MACs / time. With two backends the speed-up is torch time / triton time (> 1: Triton faster).
Defaults: batch 128 on a GPU, 8 on the CPU; backend "both" where Triton can run (CUDA, or the CPU
with TRITON_INTERPRET=1), else "torch". Prints a table; --json, --markdown, --plot write files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import fastalex
from fastalex import flops
from fastalex._backend import interpreter_enabled
from fastalex.model import VARIANTS, AlexNet, smallest_image_size
from perf._args import non_negative_int, positive_int

DTYPES = ("float32", "bfloat16", "float16")
GROUPS = ("conv", "fc", "other")  # the summary's rows; "other": every layer without MACs (LRN, pools, ...)




def triton_can_run(device: torch.device) -> bool:
    """True where fastalex's Triton kernels run for `device`: CUDA, or the CPU in the interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked; defaults that depend on the device filled in."""
    p = argparse.ArgumentParser(prog="python -m perf.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=VARIANTS, default="single")
    p.add_argument("--image-size", type=positive_int, help="input height = width (default 227; 224 for torchvision)")
    p.add_argument("--batch-size", type=positive_int, help="images per forward pass (default 128 on cuda, 8 on cpu)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default cuda if available, else cpu)")
    p.add_argument("--backend", choices=("torch", "triton", "both"),
                   help="whose ops run (default both where Triton can run, else torch)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="half types on cuda only")
    p.add_argument("--warmup", type=non_negative_int, help="untimed calls first (default 5 on cuda, 1 on cpu)")
    p.add_argument("--repeats", type=positive_int, help="timed calls; the median counts (default 20 on cuda, 3 on cpu)")
    p.add_argument("--json", type=Path, help="write the result as JSON here")
    p.add_argument("--markdown", type=Path, help="write the tables as Markdown here")
    p.add_argument("--plot", type=Path, help="write a PNG bar chart of FLOP share vs time share per layer here")
    args = p.parse_args(argv)

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        p.error(f"--device: {e}")
    if device.type not in ("cuda", "cpu"):
        p.error(f"--device must be cuda or cpu, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        p.error(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    args.device = device
    gpu = device.type == "cuda"
    args.backend = args.backend or ("both" if triton_can_run(device) else "torch")
    if args.backend != "torch" and not triton_can_run(device):
        p.error(f"--backend {args.backend}: fastalex's Triton kernels cannot run on {device} here "
                "(they need CUDA, or TRITON_INTERPRET=1 set before starting for the CPU interpreter, and triton)")
    args.backends = ["torch", "triton"] if args.backend == "both" else [args.backend]
    if not gpu and args.dtype != "float32":  # torch's CPU LRN has no bfloat16/float16 kernels
        p.error(f"--dtype {args.dtype} needs --device cuda; on the CPU the report runs float32")
    args.image_size = args.image_size or (224 if args.variant == "torchvision" else 227)
    smallest = smallest_image_size(args.variant)
    if args.image_size < smallest:
        p.error(f"--image-size {args.image_size} is too small for the {args.variant} variant (at least {smallest})")
    args.batch_size = args.batch_size or (128 if gpu else 8)
    args.warmup = (5 if gpu else 1) if args.warmup is None else args.warmup
    args.repeats = args.repeats or (20 if gpu else 3)
    return args


def _fused_pairs(model: torch.nn.Module, calls: list) -> dict:
    """Index of each traced call made inside a fastalex.nn.LRNMaxPool2d -> (is it the pair's first, the
    LRNMaxPool2d). On torch's ops the module runs its two children; on the Triton kernels, one fused op."""
    out = {}
    for i, c in enumerate(calls):
        parent = model.get_submodule(c.qualname.rpartition(".")[0])
        if isinstance(parent, fastalex.nn.LRNMaxPool2d):
            out[i] = (c.module is parent.lrn, parent)
    return out


def time_ms(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of `fn()` over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def environment(device: torch.device) -> dict:
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
        except OSError:
            pass
    return {"torch": torch.__version__, "triton": triton_version, "device_name": name,
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "cpu_threads": torch.get_num_threads(), "triton_interpret": interpreter_enabled(),
            "python": platform.python_version(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def _share(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def measure(args: argparse.Namespace) -> dict:
    """Count, run and time every layer; the result as the JSON document (see README, Compute breakdown)."""
    device, dtype = args.device, getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    counts = flops.count(args.variant, image_size=args.image_size, batch_size=args.batch_size, dtype=dtype)
    with torch.device(device):
        model = AlexNet(variant=args.variant, image_size=args.image_size).to(dtype).eval()
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, dtype=dtype)
    with torch.no_grad():
        with fastalex.backend("torch"):
            calls = flops.trace(model, x, keep_inputs=True)
        names = [c.name for c in calls]
        if names != [l.name for l in counts.layers]:  # the counted and the timed net must be the same
            raise RuntimeError(f"layers differ: counted {[l.name for l in counts.layers]}, ran {names}")
        fused = _fused_pairs(model, calls)
        times = {b: [] for b in args.backends}
        forward_ms, outputs = {}, {}
        for b in args.backends:
            with fastalex.backend(b):
                for i, c in enumerate(calls):
                    fn = lambda c=c: c.module(*c.args)  # noqa: E731
                    if b == "triton" and i in fused:  # what the model runs: the pair in one module
                        first, parent = fused[i]
                        if not first:
                            times[b].append(0.0)  # timed with the layer before it
                            continue
                        fn = lambda c=c, parent=parent: parent(*c.args)  # noqa: E731
                    times[b].append(time_ms(fn, device, args.warmup, args.repeats))
                forward_ms[b] = time_ms(lambda: model(x), device, args.warmup, args.repeats)
                if len(args.backends) == 2:
                    outputs[b] = model(x).double()
    del calls

    total_ms = {b: sum(t) for b, t in times.items()}
    layers = []
    for i, l in enumerate(counts.layers):
        t = {b: times[b][i] for b in args.backends}
        row = dict(name=l.name, module=l.module, kind=l.kind, output_shape=list(l.output_shape), params=l.params,
                   macs=l.macs, flops=l.flops, activation_bytes=l.activation_bytes,
                   param_share=_share(l.params, counts.params_total), mac_share=_share(l.macs, counts.macs_total),
                   time_ms=t, time_share={b: _share(t[b], total_ms[b]) for b in t},
                   gflops={b: (l.flops / t[b] / 1e6 if l.macs and t[b] > 0 else None) for b in t})
        if len(args.backends) == 2:
            row["speedup"] = _share(t["torch"], t["triton"]) or None
        # On the Triton kernels, "lrn1+pool1": one fused pass, timed on the pair's first row.
        row["fused"] = "+".join(counts.layers[j].name for j in sorted(fused) if fused[j][1] is fused[i][1]) \
            if i in fused else None
        layers.append(row)

    def time_share(kind: str) -> dict:
        return {b: _share(sum(r["time_ms"][b] for r in layers if r["kind"] == kind), total_ms[b])
                for b in args.backends}

    result = dict(
        variant=args.variant, image_size=args.image_size, batch_size=args.batch_size, device=str(device),
        backend=args.backend, backends=list(args.backends), dtype=args.dtype, warmup=args.warmup,
        repeats=args.repeats, params_total=counts.params_total, macs_total=counts.macs_total,
        flops_total=counts.flops_total, conv_param_share=counts.conv_param_share,
        fc_param_share=counts.fc_param_share, conv_mac_share=counts.conv_mac_share,
        fc_mac_share=counts.fc_mac_share, conv_time_share=time_share("conv"), fc_time_share=time_share("fc"),
        total_time_ms=total_ms, forward_time_ms=forward_ms,
        gflops={b: _share(counts.flops_total, total_ms[b]) / 1e6 for b in args.backends}, layers=layers)
    if len(args.backends) == 2:
        result["speedup"] = _share(total_ms["torch"], total_ms["triton"])
        ref = outputs["torch"]
        result["triton_vs_torch_rel_err"] = ((outputs["triton"] - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    result["environment"] = environment(device)
    return result


# ----------------------------------------------------------------------------------------------- output


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.1f}"


def _speedup(v: float | None) -> str:
    return f"{v:.2f}x" if v else ""


def _gflops(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}" if v >= 1 else f"{v:.3f}"


def layer_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Headers and rows (the last one the total) of the per-layer table, as strings."""
    bs = result["backends"]
    two = len(bs) == 2
    headers = ["layer", "kind", "output", "params", "MACs", "% params", "% MACs"]
    headers += [f"{b} ms" for b in bs] + (["speed-up"] if two else [])
    headers += [f"{b} % time" if two else "% time" for b in bs] + [f"{b} GFLOP/s" if two else "GFLOP/s" for b in bs]
    rows = []
    for r in result["layers"]:
        row = [r["name"], r["kind"], "x".join(map(str, r["output_shape"])), f"{r['params']:,}", f"{r['macs']:,}",
               _pct(r["param_share"]), _pct(r["mac_share"])]
        row += [f"{r['time_ms'][b]:.3f}" for b in bs] + ([_speedup(r["speedup"])] if two else [])
        row += [_pct(r["time_share"][b]) for b in bs] + [_gflops(r["gflops"][b]) for b in bs]
        rows.append(row)
    total = ["total", "", "", f"{result['params_total']:,}", f"{result['macs_total']:,}", "100.0", "100.0"]
    total += [f"{result['total_time_ms'][b]:.3f}" for b in bs] + ([_speedup(result["speedup"])] if two else [])
    total += ["100.0" for _ in bs] + [_gflops(result["gflops"][b]) for b in bs]
    rows.append(total)
    return headers, rows


def summary_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Conv vs FC vs the rest: share of parameters, of FLOPs and of time (per backend)."""
    bs = result["backends"]
    headers = ["group", "layers", "% params", "% FLOPs"] + [f"{b} % time" for b in bs] + [f"{b} ms" for b in bs]
    rows = []
    for group in GROUPS:
        sel = [r for r in result["layers"] if r["kind"] == group or group == "other" and r["kind"] not in GROUPS]
        if not sel:
            continue
        ms = {b: sum(r["time_ms"][b] for r in sel) for b in bs}
        rows.append([group, ", ".join(r["name"] for r in sel) if group != "other" else f"{len(sel)} layers",
                     _pct(sum(r["param_share"] for r in sel)), _pct(sum(r["mac_share"] for r in sel))]
                    + [_pct(_share(ms[b], result["total_time_ms"][b])) for b in bs] + [f"{ms[b]:.3f}" for b in bs])
    return headers, rows


def title(result: dict) -> str:
    env = result["environment"]
    return (f"AlexNet {result['variant']} forward, {result['image_size']}x{result['image_size']}, batch "
            f"{result['batch_size']}, {result['dtype']}, {result['device']} ({env['device_name']}), "
            f"backend {result['backend']}; torch {env['torch']}, triton {env['triton']}, {env['date'][:10]}")


def footer(result: dict) -> list[str]:
    lines = []
    for b in result["backends"]:
        lines.append(f"{b}: sum of layer medians {result['total_time_ms'][b]:.3f} ms, whole forward pass "
                     f"{result['forward_time_ms'][b]:.3f} ms ({result['warmup']} warm-up, median of "
                     f"{result['repeats']}); {result['flops_total'] / 1e9:.2f} GFLOPs at "
                     f"{_gflops(result['gflops'][b])} GFLOP/s")
    if "triton_vs_torch_rel_err" in result:
        lines.append(f"triton vs torch logits: relative error {result['triton_vs_torch_rel_err']:.2e}")
    return lines


def print_report(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=200 if len(result["backends"]) == 2 else 150)
    for (headers, rows), name in ((layer_table(result), title(result)), (summary_table(result), "conv vs FC")):
        t = Table(title=name)
        for h in headers:
            t.add_column(h, justify="left" if h in ("layer", "kind", "output", "group", "layers") else "right")
        for i, row in enumerate(rows):
            t.add_row(*row, end_section=(headers[0] == "layer" and i == len(rows) - 2))
        console.print(t)
    for line in footer(result):
        console.print(line)


def to_markdown(result: dict) -> str:
    def md(headers, rows):
        left = ("layer", "kind", "output", "group", "layers")
        out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if h in left else "---:" for h in headers) + "|"]
        out += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(out)

    headers, rows = layer_table(result)
    rows[-1] = [f"**{c}**" if c else c for c in rows[-1]]
    return "\n\n".join([f"**{title(result)}**", md(headers, rows), md(*summary_table(result)),
                        "\n".join(f"- {line}" for line in footer(result))]) + "\n"


def plot(result: dict, path: Path) -> None:
    """A PNG bar chart: per layer, its share of the FLOPs next to its share of the time (per backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    names = [r["name"] for r in layers]
    series = [("FLOPs", [100 * r["mac_share"] for r in layers])]
    series += [(f"time ({b})", [100 * r["time_share"][b] for r in layers]) for b in result["backends"]]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.55 * len(names)), 4.5), dpi=100)
    for i, (label, values) in enumerate(series):
        ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(names))], values, width, label=label)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("% of the forward pass")
    ax.set_title(f"AlexNet {result['variant']}, batch {result['batch_size']}, {result['device']}: "
                 f"share of FLOPs vs share of time", fontsize=10)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = measure(args)
    print_report(result)
    for path in (args.json, args.markdown, args.plot):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(to_markdown(result))
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
