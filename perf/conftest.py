"""pytest-benchmark set-up for perf/: real AlexNet shapes on a GPU; tiny shapes in the CPU interpreter.

    pytest perf --benchmark-only                 # on a GPU: fastalex vs torch (cuDNN) per kernel
    pytest perf --benchmark-disable              # anywhere: run each benchmark body once (smoke test)
"""

import os

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _cudnn_benchmark():
    torch.backends.cudnn.benchmark = True
    yield
