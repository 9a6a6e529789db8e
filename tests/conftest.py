"""Test set-up: on machines without CUDA the kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here, at the top.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastalex.kernels import _common  # noqa: E402

# Every kernel output is filled with NaN (or a sentinel) before launch: unwritten elements fail.
_common.POISON = True


@pytest.fixture
def device() -> str:
    """Where kernel tests run: the GPU when there is one, else the CPU interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh random inputs per test, but reproducible from the test's name.
    torch.manual_seed(hash(request.node.nodeid) % 2**31)
    yield
