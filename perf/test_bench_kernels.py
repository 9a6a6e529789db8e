"""Each fastalex kernel at each AlexNet layer shape, forward and backward, vs torch (cuDNN).

Group by layer to compare: `pytest perf --benchmark-only --benchmark-group-by=group`.
Each benchmark's extra_info carries flops and bytes, so TFLOP/s and GB/s follow from the JSON.
On a CPU (no CUDA) the shapes shrink to a smoke test in Triton's interpreter.
"""

import pytest
import torch
import torch.nn.functional as TF

import fastalex
import fastalex.functional as F
ON_GPU = torch.cuda.is_available()
from perf.shapes import CONV, LRN, LRN_ARGS, POOL, ConvShape, tiny

DEVICE = "cuda" if ON_GPU else "cpu"
BATCH = 128 if ON_GPU else 1
DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]
IMPLS = ["fastalex", "torch"]


def _shrink(s: ConvShape) -> ConvShape:
    """On CPU: the same layer with few channels and a small image."""
    return s if ON_GPU else tiny(s)


def _timed(fn):
    """Make a GPU call synchronous so pytest-benchmark's wall clock times the kernels."""
    if not ON_GPU:
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _run(benchmark, impl, fwd, inputs, pas, flops, nbytes, group):
    benchmark.group = group
    benchmark.extra_info.update(flops=flops, bytes=nbytes, impl=impl, device=torch.cuda.get_device_name(0)
                                if ON_GPU else "cpu (interpreter)")
    with fastalex.backend("triton" if impl.startswith("fastalex") else "torch"):
        if pas == "fwd":
            benchmark(_timed(lambda: fwd(*inputs)))
        else:
            out = fwd(*inputs)
            g = torch.randn_like(out)
            wrt = [t for t in inputs if t.requires_grad]
            benchmark(_timed(lambda: torch.autograd.grad(out, wrt, g, retain_graph=True)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pas", ["fwd", "bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", CONV, ids=lambda s: s.name)
def test_conv2d_relu(benchmark, shape, dtype, pas, impl):
    s = _shrink(shape)
    x = torch.randn(BATCH, s.c_in, s.size, s.size, device=DEVICE, dtype=dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_(s.input_needs_grad)
    w = (torch.randn(s.c_out, s.c_in // s.groups, s.kernel, s.kernel, device=DEVICE, dtype=dtype) * 0.05)
    w = w.contiguous(memory_format=torch.channels_last).requires_grad_()
    b = torch.randn(s.c_out, device=DEVICE, dtype=dtype, requires_grad=True)
    kw = dict(stride=s.stride, padding=s.padding, groups=s.groups)
    fwd = (lambda x, w, b: F.conv2d_relu(x, w, b, **kw)) if impl == "fastalex" else \
        (lambda x, w, b: torch.relu(TF.conv2d(x, w, b, **kw)))
    passes = 1 if pas == "fwd" else (2 if s.input_needs_grad else 1)
    esize = x.element_size()
    nbytes = esize * (x.numel() + w.numel() + BATCH * s.c_out * s.out_size**2)
    _run(benchmark, impl, fwd, [x, w, b], pas, 2 * s.macs(BATCH) * passes, nbytes,
         f"conv {shape.name} {str(dtype)[6:]} {pas}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pas", ["fwd", "bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", LRN, ids=lambda s: s[0])
def test_local_response_norm(benchmark, shape, dtype, pas, impl):
    name, c, size = shape
    c, size = (c, size) if ON_GPU else (min(c, 16), min(size, 9))
    x = torch.randn(BATCH, c, size, size, device=DEVICE, dtype=dtype, requires_grad=True)
    fwd = (lambda x: F.local_response_norm(x, **LRN_ARGS)) if impl == "fastalex" else \
        (lambda x: TF.local_response_norm(x, **LRN_ARGS))
    nbytes = x.numel() * x.element_size() * (2 if pas == "fwd" else 3)
    _run(benchmark, impl, fwd, [x], pas, 0, nbytes, f"lrn {name} {str(dtype)[6:]} {pas}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pas", ["fwd", "bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", POOL, ids=lambda s: s[0])
def test_max_pool2d(benchmark, shape, dtype, pas, impl):
    name, c, size = shape
    c, size = (c, size) if ON_GPU else (min(c, 16), min(size, 13))
    x = torch.randn(BATCH, c, size, size, device=DEVICE, dtype=dtype, requires_grad=True)
    fwd = (lambda x: F.max_pool2d(x, 3, 2)) if impl == "fastalex" else (lambda x: TF.max_pool2d(x, 3, 2))
    out = ((size - 3) // 2 + 1) ** 2 * BATCH * c
    nbytes = x.element_size() * (x.numel() + out)
    _run(benchmark, impl, fwd, [x], pas, 0, nbytes, f"pool {name} {str(dtype)[6:]} {pas}")


@pytest.mark.parametrize("impl", ["fastalex", "fastalex-unfused", "torch"])
@pytest.mark.parametrize("pas", ["fwd", "bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", LRN, ids=lambda s: s[0])
def test_lrn_max_pool2d(benchmark, shape, dtype, pas, impl):
    """relu -> lrn1 -> pool1 and lrn2 -> pool2 (the conv's ReLU first, as the model runs them), channels_last:
    fused, fastalex's two kernels after torch's relu, torch's ops."""
    name, c, size = shape
    c, size = (c, size) if ON_GPU else (min(c, 16), min(size, 13))
    x = torch.randn(BATCH, c, size, size, device=DEVICE, dtype=dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    if impl == "fastalex":
        fwd = lambda x: F.lrn_max_pool2d(x, **LRN_ARGS, relu=True)  # noqa: E731
    elif impl == "fastalex-unfused":
        fwd = lambda x: F.max_pool2d(F.local_response_norm(torch.relu(x), **LRN_ARGS), 3, 2)  # noqa: E731
    else:
        fwd = lambda x: TF.max_pool2d(TF.local_response_norm(torch.relu(x), **LRN_ARGS), 3, 2)  # noqa: E731
    out = ((size - 3) // 2 + 1) ** 2 * BATCH * c
    # The fused op's own traffic: x in, y out (forward); dy, x in, dx out (backward; argmax not counted).
    nbytes = x.element_size() * (x.numel() + out if pas == "fwd" else 2 * x.numel() + out)
    _run(benchmark, impl, fwd, [x], pas, 0, nbytes, f"relu+lrn+pool {name} {str(dtype)[6:]} {pas}")
