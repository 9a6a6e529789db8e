"""perf/gpu_check.py itself works (GPU sessions are rare): a smoke run on tiny shapes in the interpreter."""

import json
import os

import pytest
import torch


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the smoke run is for machines without a GPU")
def test_gpu_check_smoke_run_writes_results(tmp_path):
    from perf import gpu_check

    assert gpu_check.main(["--smoke", "--batch", "1", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["all_checks_pass"] is True
    assert {"card", "torch", "triton", "date"} <= result["environment"].keys()
    ops = {(c["op"], c["layer"]) for c in result["checks"]}
    assert ("conv2d_relu", "conv1") in ops and ("local_response_norm", "lrn2") in ops
    assert ("max_pool2d", "pool5") in ops and ("alexnet", "torchvision") in ops
    # each kernel case: forward and backward timed for both implementations, in both layouts
    timed = [r for r in result["timings"] if r["op"] == "conv2d_relu" and r["layer"] == "conv3"]
    assert {(r["layout"], r["pass"]) for r in timed} == {("nchw", "fwd"), ("nchw", "bwd"), ("nhwc", "fwd"),
                                                         ("nhwc", "bwd")}
    assert all(r["fastalex_ms"] > 0 and r["torch_ms"] > 0 and r["speedup"] > 0 for r in result["timings"])


def test_gpu_check_refuses_cpu_without_smoke(capsys):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    from perf import gpu_check

    assert gpu_check.main(["--out", "unused"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the smoke run is for machines without a GPU")
def test_tune_smoke_run_sweeps_both_weight_gradient_kernels(tmp_path):
    """perf.tune (the GPU session's config sweep) on tiny shapes: each kind, configs and splits timed."""
    from perf import tune

    assert tune.main(["--smoke", "--batch", "1", "--layers", "conv1,conv3", "--dtypes", "float32", "--layouts", "nhwc",
                      "--kinds", "wgrad,wgrad_taps", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "tune.json").read_text())["rows"]
    # conv1 (3 input channels) has no per-tap sweep; conv3 has both
    assert sorted((r["layer"], r["kind"]) for r in rows) == [("conv1", "wgrad"), ("conv3", "wgrad"),
                                                           ("conv3", "wgrad_taps")]
    for r in rows:
        assert r["heuristic_ms"] > 0 and r["best"] is not None
        assert all(x["error"] is None and x["ms"] > 0 for x in r["results"]), r["results"]
