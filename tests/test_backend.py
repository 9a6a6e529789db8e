"""Backend choice (FASTALEX_BACKEND, fastalex.backend, backend_info) and import hygiene."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastalex
import fastalex.functional as F
from fastalex.kernels import conv2d as K


def _run(code: str, **env) -> subprocess.CompletedProcess:
    """Run python code in a fresh interpreter with a controlled environment."""
    full = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTALEX_BACKEND")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True,
                          timeout=300)


def test_context_manager_nests_and_restores():
    assert fastalex.backend_info("cpu").requested in fastalex.BACKENDS
    with fastalex.backend("torch"):
        assert fastalex.backend_info("cpu").backend == "torch"
        with fastalex.backend("triton"):
            assert fastalex.backend_info("cpu").requested == "triton"
        assert fastalex.backend_info("cpu").requested == "torch"
    with pytest.raises(ValueError, match="backend name must be one of"):
        with fastalex.backend("cudnn"):
            pass


def test_auto_on_cuda_is_triton_and_torch_is_torch():
    with fastalex.backend("auto"):
        info = fastalex.backend_info("cuda")
        assert info.backend == "triton" and "GPU" in info.reason
    with fastalex.backend("torch"):
        assert fastalex.backend_info("cuda").backend == "torch"
    assert "requested" in str(fastalex.backend_info("cpu"))


def test_other_devices():
    with fastalex.backend("auto"):
        assert fastalex.backend_info("meta").backend == "torch"
    with fastalex.backend("triton"):
        assert fastalex.backend_info("meta").backend == "error"


def test_auto_runs_kernels_in_interpreter(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs where the test session uses the interpreter")
    calls = []
    real = K.conv2d_forward
    monkeypatch.setattr(K, "conv2d_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with fastalex.backend("auto"):
        F.conv2d(x, w)
    assert calls == [1]
    with fastalex.backend("torch"):
        F.conv2d(x, w)
    assert calls == [1]


def test_env_var_and_cpu_without_interpreter():
    code = """
        import torch, fastalex, fastalex.functional as F
        print(fastalex.backend_info("cpu").backend)
        try:
            F.max_pool2d(torch.randn(1, 1, 4, 4), 2)
        except RuntimeError as e:
            print("ERR", e)
    """
    out = _run(code, FASTALEX_BACKEND="triton")
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()[:2]
    assert first == "error"
    assert second.startswith("ERR") and "TRITON_INTERPRET=1" in second

    out = _run(code, FASTALEX_BACKEND="torch")
    assert out.returncode == 0 and out.stdout.splitlines() == ["torch"], out.stderr

    out = _run("import fastalex; fastalex.backend_info('cpu')", FASTALEX_BACKEND="bogus")
    assert out.returncode != 0 and "FASTALEX_BACKEND must be one of" in out.stderr


def test_import_does_not_touch_cuda_or_triton():
    out = _run("""
        import sys, torch, fastalex, fastalex.functional, fastalex.nn
        print(torch.cuda.is_initialized(), "triton" in sys.modules)
        fastalex.nn.Conv2d(3, 4, 3), fastalex.nn.MaxPool2d(3, 2), fastalex.nn.LocalResponseNorm(5)
        print(torch.cuda.is_initialized())
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "False"]


def test_kernels_import_without_cuda_initialization():
    out = _run("""
        import torch
        from fastalex.kernels import conv2d, lrn, maxpool2d
        print(torch.cuda.is_initialized())
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False"]
