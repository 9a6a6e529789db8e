"""The training strategies on a machine with one GPU (towers and DDP; see fastalex.Trainer).

    python -m perf.dist_check [--out DIR] [--device cuda:0]

1. towers: the paper net's two towers on (DEVICE, cpu), trained a few steps with the Trainer,
   against the grouped net trained on DEVICE alone (the same weights to float tolerance).
2. ddp: one process under torchrun (NCCL on a GPU, gloo on the CPU; tests/dist_driver.py with
   the "auto" backend: Triton kernels on a GPU), against the same training without torchrun.
Writes dist_check.json to --out and exits 1 if a check fails. `--device cpu` runs the same checks
on CPUs only (torch's ops): the test suite's smoke test of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def rel(a: dict, b: dict) -> float:
    return max(((a[k].double().cpu() - b[k].double().cpu()).norm() / b[k].double().cpu().norm().clamp_min(1e-12)).item()
               for k in b)


def towers(out: Path, device: str) -> dict:
    import fastalex
    import dist_driver

    torch.backends.cudnn.allow_tf32 = False  # compare in true fp32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    base = fastalex.AlexNet(num_classes=4, variant="paper", image_size=67, dropout=0.0, init="kaiming")
    train = dist_driver.Blobs(64, 67)
    res, secs = {}, {}
    for strategy, devices in (("single", None), ("towers", (device, "cpu"))):
        m = fastalex.AlexNet(num_classes=4, variant="paper", image_size=67, dropout=0.0)
        m.load_state_dict(base.state_dict())
        t = fastalex.Trainer(m, epochs=1, batch_size=16, lr=0.02, out_dir=out / strategy, progress=False, seed=1,
                             device=device, strategy=strategy, devices=devices)
        t0 = time.perf_counter()
        t.fit(train)
        secs[strategy] = time.perf_counter() - t0
        res[strategy] = t.module.state_dict()
    err = rel(res["towers"], res["single"])
    return dict(check=f"towers {device}+cpu vs single {device}", rel_err=err, ok=err < 1e-3, seconds=secs)


def ddp(out: Path, device: str) -> dict:
    import fastalex
    import dist_driver

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           str(ROOT / "tests" / "dist_driver.py"), str(out / "ddp"), "ddp", "alexnet", "8", "1", "0", "0"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), DRIVER_BACKEND="auto")  # nothing needed for restarts
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the Trainer picks gloo on the CPU
    name = f"ddp {'nccl' if device != 'cpu' else 'gloo'} 1 process"
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if p.returncode:
        return dict(check=name, ok=False, error=p.stderr[-2000:])
    got = torch.load(out / "ddp" / "final.pt", weights_only=True)
    train, val = dist_driver.data("alexnet")
    with fastalex.backend("auto"):
        t = fastalex.Trainer(dist_driver.build("alexnet"), epochs=1, batch_size=8, lr=dist_driver.lr("alexnet"),
                             out_dir=out / "ref", progress=False, seed=7, device=device)
        t.fit(train, val)
    err = rel(got["model"], t.module.state_dict())
    return dict(check=f"{name} vs no torchrun", rel_err=err, ok=err < 1e-3, describe=got["describe"],
                reference_device=str(t.device))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "perf/results/local")
    p.add_argument("--device", default="cuda:0", help="the GPU (default cuda:0), or cpu for a smoke run")
    args = p.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        print(f"perf.dist_check --device {args.device} needs a CUDA device (--device cpu runs on CPUs)",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    results = []
    with tempfile.TemporaryDirectory(prefix="fastalex-dist-") as work:  # checkpoints (1 GB): not results
        for check in (towers, ddp):
            try:
                results.append(check(Path(work), args.device))
            except Exception as e:  # noqa: BLE001 (recorded; the exit status says so)
                results.append(dict(check=check.__name__, ok=False, error=f"{type(e).__name__}: {e}"))
            print(json.dumps(results[-1], default=str), flush=True)
    card = torch.cuda.get_device_name(args.device) if args.device != "cpu" else "cpu"
    out.mkdir(parents=True, exist_ok=True)
    (out / "dist_check.json").write_text(json.dumps(dict(card=card, torch=torch.__version__, results=results),
                                                   indent=1, default=str))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
