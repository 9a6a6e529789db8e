"""perf.host (the host's time around every kernel launch of the conv stack's step): what it writes and
counts, never its timings. A subprocess: it stubs the interpreter's launches for its whole process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The launcher calls of one forward + backward of the conv stack (conv1's input needs no gradient).
CALLS = {"conv2d_forward": 5, "conv2d_input_grad": 4, "conv2d_weight_grad": 5, "lrn_maxpool2d_forward": 2,
         "lrn_maxpool2d_backward": 2, "maxpool2d_forward": 1, "maxpool2d_backward": 1}


@pytest.mark.parametrize("variant, dtype", [("single", "fp32"), ("paper", "bf16")])
def test_host_run_counts_every_launcher_call_once(tmp_path, variant, dtype):
    out = tmp_path / "host.json"
    proc = subprocess.run([sys.executable, "-m", "perf.host", "--variant", variant, "--dtype", dtype, "--steps", "2",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["variant"] == variant and res["dtype"] == dtype and res["steps"] == 2 and res["batch"] == 1
    assert res["device"].startswith("cpu (interpreter")
    # Each launcher counted once a call: the input gradient's inner conv2d_forward is its own.
    assert res["launcher_calls_per_step"] == CALLS
    assert res["launchers_us_per_step"].keys() == CALLS.keys()
    assert all(us > 0 for us in res["launchers_us_per_step"].values())
    assert "us of host time a step" in proc.stdout and "conv2d_weight_grad" in proc.stdout
