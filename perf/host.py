"""Host time of the feature layers' training step: the Python around every kernel launch.

    python -m perf.host [--variant single] [--dtype fp32] [--batch N] [--steps 50] [--json host.json]

Each op call costs the host its argument checks, torch's custom-op dispatch and autograd, and the
launcher's choices (config, grid, flags) before Triton launches the kernel. Where that adds up to
more than the GPU's time for the step, the GPU waits (perf/NOTES.md: ~0.1 ms a call in run 1, ~20
calls a step). This times AlexNet's conv stack (`forward_features`, then its backward), channels_last,
with the model's weights channels_last:
- on a CPU (batch 1), in Triton's interpreter with every kernel launch stubbed out (set here, before
  the ops run): fastalex's host work and torch's, without Triton's launcher (on a GPU, ~10-30 us more
  a launch). The torch ops around the kernels (the dgrad's weight flip, the ReLU mask) do real memory
  work here, which on a GPU is a launch;
- on a GPU (batch 128: the kernels perf.gpu_check compiled), as it runs, launches included: the
  host's time from the step's start to the return of backward, before synchronizing (the launch
  queue holds a step's ~25 launches, so the host does not wait for the GPU inside a step).
Prints the step's host time (median over --steps after 5 untimed) and each launcher's share and calls
(the functions in fastalex.kernels the ops call: their Python and the launch). --json writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from perf._args import positive_int

# The launchers the ops call: (module, function).
LAUNCHERS = (("conv2d", "conv2d_forward"), ("conv2d", "conv2d_input_grad"), ("conv2d", "conv2d_weight_grad"),
             ("lrn_maxpool2d", "lrn_maxpool2d_forward"), ("lrn_maxpool2d", "lrn_maxpool2d_backward"),
             ("maxpool2d", "maxpool2d_forward"), ("maxpool2d", "maxpool2d_backward"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m perf.host", description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=("single", "paper"), default="single")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--batch", type=positive_int, default=None, help="default: 128 on a GPU, 1 on a CPU")
    p.add_argument("--steps", type=positive_int, default=50, help="timed steps (default 50), after 5 untimed")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def _stub_launches() -> None:
    """Make every interpreted kernel launch return at once (outputs are left as allocated)."""
    from triton.runtime import interpreter

    interpreter.InterpretedFunction.run = lambda self, *args, grid=None, **kwargs: None


def _timed_launchers(totals: dict, calls: dict) -> None:
    """Wrap the launchers (in their modules, where the ops look them up) to add their seconds to
    totals and count their calls: the outermost call's only (the stride-1 input gradient runs
    conv2d_forward inside)."""
    import importlib

    depth = [0]
    for mod_name, fn_name in LAUNCHERS:
        mod = importlib.import_module(f"fastalex.kernels.{mod_name}")
        fn = getattr(mod, fn_name)

        def timed(*args, _fn=fn, _name=fn_name, **kwargs):
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    totals[_name] = totals.get(_name, 0.0) + time.perf_counter() - t0
                    calls[_name] = calls.get(_name, 0) + 1

        setattr(mod, fn_name, timed)


def run(variant: str, dtype: str, steps: int, batch: int | None = None) -> dict:
    import torch

    import fastalex

    gpu = torch.cuda.is_available()
    if not gpu:
        _stub_launches()
    totals: dict[str, float] = {}
    calls: dict[str, int] = {}
    _timed_launchers(totals, calls)
    device = "cuda" if gpu else "cpu"
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = fastalex.AlexNet(num_classes=10, variant=variant, dropout=0.0, seed=0).to(device, dt)
    model = model.to(memory_format=torch.channels_last)
    batch = batch or (128 if gpu else 1)
    x = torch.randn(batch, 3, 227, 227, device=device, dtype=dt).contiguous(memory_format=torch.channels_last)

    def step() -> float:
        t0 = time.perf_counter()
        y = model.forward_features(x)
        y.backward(torch.ones_like(y))
        t = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        if gpu:
            torch.cuda.synchronize()
        return t

    with fastalex.backend("triton"):
        for _ in range(5):
            step()
        totals.clear()
        calls.clear()
        times = [step() for _ in range(steps)]
    return {"variant": variant, "dtype": dtype, "device": torch.cuda.get_device_name(0) if gpu else "cpu (interpreter, "
            "launches stubbed)", "batch": batch, "steps": steps, "step_host_us": statistics.median(times) * 1e6,
            "launchers_us_per_step": {k: v / steps * 1e6 for k, v in sorted(totals.items())},
            "launcher_calls_per_step": {k: v / steps for k, v in sorted(calls.items())},
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            raise SystemExit("perf.host: triton was imported before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (run imports it)
    res = run(args.variant, args.dtype, args.steps, args.batch)
    print(f"{res['variant']} {res['dtype']} on {res['device']}: {res['step_host_us']:.0f} us of host time a "
          f"step (conv stack forward + backward, batch {res['batch']})")
    for name, us in res["launchers_us_per_step"].items():
        n = res["launcher_calls_per_step"][name]
        print(f"  {name:24s} {us:8.0f} us a step, {n:g} calls ({us / n:.0f} us a call)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
