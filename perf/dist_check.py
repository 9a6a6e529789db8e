"""The training strategies on a machine with one GPU (towers and DDP; see fastalex.Trainer).

    python -m perf.dist_check [--out DIR]

1. towers: the paper net's two towers on (cuda:0, cpu), trained a few steps with the Trainer,
   against the grouped net trained on cuda:0 alone (the same weights to float tolerance).
2. ddp: one process under torchrun with NCCL on cuda:0 (tests/dist_driver.py, Triton kernels),
   against the same training without torchrun.
Writes dist_check.json to --out and exits 1 if a check fails.
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


def towers(out: Path) -> dict:
    import fastalex
    import dist_driver

    torch.backends.cudnn.allow_tf32 = False  # compare in true fp32
    torch.manual_seed(0)
    base = fastalex.AlexNet(num_classes=4, variant="paper", image_size=67, dropout=0.0, init="kaiming")
    train = dist_driver.Blobs(64, 67)
    res, secs = {}, {}
    for strategy, devices in (("single", None), ("towers", ("cuda:0", "cpu"))):
        m = fastalex.AlexNet(num_classes=4, variant="paper", image_size=67, dropout=0.0)
        m.load_state_dict(base.state_dict())
        t = fastalex.Trainer(m, epochs=1, batch_size=16, lr=0.02, out_dir=out / strategy, progress=False, seed=1,
                             device="cuda:0", strategy=strategy, devices=devices)
        t0 = time.perf_counter()
        t.fit(train)
        secs[strategy] = time.perf_counter() - t0
        res[strategy] = t.module.state_dict()
    err = rel(res["towers"], res["single"])
    return dict(check="towers cuda:0+cpu vs single cuda:0", rel_err=err, ok=err < 1e-3, seconds=secs)


def ddp(out: Path) -> dict:
    import fastalex
    import dist_driver

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           str(ROOT / "tests" / "dist_driver.py"), str(out / "ddp"), "ddp", "alexnet", "8", "1", "0", "0"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), DRIVER_BACKEND="triton", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if p.returncode:
        return dict(check="ddp nccl 1 process", ok=False, error=p.stderr[-2000:])
    got = torch.load(out / "ddp" / "final.pt", weights_only=True)
    train, val = dist_driver.data("alexnet")
    with fastalex.backend("triton"):
        t = fastalex.Trainer(dist_driver.build("alexnet"), epochs=1, batch_size=8, lr=dist_driver.lr("alexnet"),
                             out_dir=out / "ref",
                             progress=False, seed=7)
        t.fit(train, val)
    err = rel(got["model"], t.module.state_dict())
    return dict(check="ddp nccl 1 process vs no torchrun", rel_err=err, ok=err < 1e-3,
                describe=got["describe"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "perf/results/local")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("perf.dist_check needs a CUDA device", file=sys.stderr)
        return 2
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="fastalex-dist-"))  # checkpoints: not results
    results = []
    for check in (towers, ddp):
        try:
            results.append(check(work))
        except Exception as e:  # noqa: BLE001 (recorded; the exit status says so)
            results.append(dict(check=check.__name__, ok=False, error=f"{type(e).__name__}: {e}"))
        print(json.dumps(results[-1], default=str), flush=True)
    (out / "dist_check.json").write_text(json.dumps(dict(card=torch.cuda.get_device_name(0), results=results),
                                                   indent=1, default=str))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
