"""Test set-up: on machines without CUDA the kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here, at the top.
"""

import atexit
import os
import shutil
import tempfile
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A fresh torch.compile cache per test run: torch's on-disk caches (/tmp/torchinductor_<user>) were
# seen to replay a graph that called a custom op with its previous schema after the schema changed.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastalex-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

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
    # Fresh random inputs per test, reproducible from the test's name (crc32: Python's hash of a str is
    # salted per process, so it gave every run different inputs).
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def _write_idx(path, array) -> None:
    import gzip
    import struct

    import numpy as np

    magic = 0x0800 | array.ndim  # unsigned bytes
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def tiny_fashion(tmp_path_factory):
    """64 training and 32 test images of 4 easy classes (bright quadrant = class), in Fashion-MNIST's
    real file layout (gzipped IDX): for the command-line, explore and ablation tests."""
    import numpy as np

    d = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("t10k", 32)):
        labels = rng.integers(0, 4, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(labels):
            r, q = divmod(int(c), 2)
            images[i, r * 14:(r + 1) * 14, q * 14:(q + 1) * 14] += 180
        _write_idx(d / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(d / f"{split}-labels-idx1-ubyte.gz", labels)
    return d
