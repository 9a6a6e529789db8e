"""Comparison against float64 references, with one tolerance table for every op.

Tolerances are on the relative error norm ||actual - ref|| / ||ref|| and come from each dtype's
unit roundoff times headroom for accumulation: fp64 exact-ish; fp32 on CPU is exact fp32
(the interpreter's tl.dot), fp32 on GPU may run tf32 (10-bit mantissa) like cuDNN does by default;
fp16 has 11 bits, bf16 8 bits.
"""

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tolerance(dtype: torch.dtype, device: str) -> float:
    if dtype == torch.float64:
        return 1e-12
    if dtype == torch.float32:
        return 2e-3 if device == "cuda" else 2e-5
    if dtype == torch.float16:
        return 3e-3
    if dtype == torch.bfloat16:
        return 2e-2
    raise AssertionError(f"no tolerance for {dtype}")


def assert_close(actual: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, device: str, name: str = "output"):
    """actual (any dtype) vs a float64 reference: same shape, same NaN/inf pattern, small relative error."""
    assert actual.shape == ref.shape, f"{name}: shape {tuple(actual.shape)} != reference {tuple(ref.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    nan_a, nan_r = torch.isnan(a), torch.isnan(r)
    assert torch.equal(nan_a, nan_r), f"{name}: NaN at {int((nan_a != nan_r).sum())} positions that differ from the reference"
    inf_r = torch.isinf(r)
    assert torch.equal(a[inf_r], r[inf_r]), f"{name}: infinities differ from the reference"
    finite = ~(nan_r | inf_r)
    a, r = a[finite], r[finite]
    assert torch.isfinite(a).all(), f"{name}: non-finite values where the reference is finite"
    if r.numel() == 0:
        return
    tol = tolerance(dtype, device)
    scale = r.norm().clamp_min(1e-30)
    err = ((a - r).norm() / scale).item()
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g} ({dtype}, {device})"
    # Elementwise too, so one wrong element among many cannot hide in the norm.
    bound = 30 * tol * (r.abs() + r.abs().max() / 10)
    worst = ((a - r).abs() - bound).max().item()
    assert worst <= 0, f"{name}: an element is off by {worst:.3g} beyond its bound ({dtype}, {device})"


def make_input(shape, dtype, device, layout="contiguous", requires_grad=True, scale=1.0):
    """Fresh random input in a given memory layout: contiguous, channels_last or non-contiguous."""
    if layout == "contiguous":
        x = torch.randn(shape, dtype=torch.float64) * scale
        x = x.to(device=device, dtype=dtype)
    elif layout == "channels_last":
        x = (torch.randn(shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "noncontiguous":
        # Every other element of the last dimension of a larger tensor, with dims 0/1 swapped back.
        big = list(shape)
        big[-1] *= 2
        if len(big) >= 2:
            big[0], big[1] = big[1], big[0]
        x = (torch.randn(big, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
        x = x[..., ::2]
        if len(big) >= 2:
            x = x.transpose(0, 1)
        assert not x.is_contiguous() and tuple(x.shape) == tuple(shape)
    else:
        raise AssertionError(layout)
    return x.requires_grad_(requires_grad)


def ref_inputs(*tensors):
    """float64 CPU leaf copies of the inputs, with requires_grad as the originals."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        c = t.detach().to("cpu", torch.float64).clone()
        out.append(c.requires_grad_(t.requires_grad))
    return out
