"""Every kernel launch at AlexNet's real shapes compiles for Hopper (sm_90) with Triton's GPU compiler.

Runs without a GPU: the interpreter never lowers the kernels, so this is what catches configs the GPU
compiler rejects (tl.dot blocks, powers of two, shared memory) on machines that have none.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("hopper_compile.py")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the kernel tests compile for the real card")
def test_all_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1200)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in rows if r.get("ok") is False]
    assert not failed, "\n".join(json.dumps(r) for r in failed)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = rows[-1]
    kernels = {r["kernel"] for r in rows[:-1]}
    assert summary["failures"] == 0 and summary["compiled"] >= 8
    assert {"_conv2d_fwd_kernel", "_conv2d_dgrad_kernel", "_conv2d_wgrad_kernel", "_conv2d_wgrad_taps_kernel",
            "_sum_splits_to_weight_kernel", "_lrn_fwd_kernel",
            "_lrn_bwd_kernel", "_maxpool2d_fwd_kernel", "_maxpool2d_bwd_kernel",
            "_maxpool2d_bwd_cells_kernel"} <= kernels
    assert {"_lrn_maxpool2d_fwd_kernel", "_lrn_maxpool2d_bwd_kernel"} <= kernels
