"""Local response normalization: argument checks, the custom ops with their autograd, the backend choice.

`local_response_norm` has torch.nn.functional.local_response_norm's signature and semantics; the
Triton path runs one kernel forward (fastalex::local_response_norm) and one backward
(fastalex::local_response_norm_backward), both torch.library custom ops, so torch.compile and
torch.export trace the forward and the backward without graph breaks.
"""

from __future__ import annotations

import torch

from fastalex._backend import use_triton
from fastalex.ops._checks import check_float_tensor, check_groups, check_positive_int, check_real

__all__ = ["local_response_norm"]

@torch.library.custom_op("fastalex::local_response_norm", mutates_args=())
def _lrn(input: torch.Tensor, size: int, alpha: float, beta: float, k: float, groups: int = 1) -> torch.Tensor:
    from fastalex.kernels import lrn as K  # lazy: importing fastalex must not import triton

    return K.lrn_forward(input, size, alpha, beta, k, groups)


@_lrn.register_fake
def _(input, size, alpha, beta, k, groups=1):
    # The kernels write into empty_like(input), which is also the layout torch's composite
    # returns (contiguous, channels_last(_3d) and other dense layouts kept; others contiguous).
    return torch.empty_like(input)


@torch.library.custom_op("fastalex::local_response_norm_backward", mutates_args=())
def _lrn_backward(grad_output: torch.Tensor, input: torch.Tensor, size: int, alpha: float, beta: float,
                  k: float, groups: int = 1) -> torch.Tensor:
    from fastalex.kernels import lrn as K

    return K.lrn_backward(grad_output, input, size, alpha, beta, k, groups)


@_lrn_backward.register_fake
def _(grad_output, input, size, alpha, beta, k, groups=1):
    return torch.empty_like(input)


def _setup_context(ctx, inputs, output):
    input, size, alpha, beta, k, groups = inputs
    # Only the input is kept: the backward kernel recomputes the window sums from it.
    ctx.save_for_backward(input)
    ctx.args = (size, alpha, beta, k, groups)


def _backward(ctx, grad_output):
    (input,) = ctx.saved_tensors
    return _lrn_backward(grad_output, input, *ctx.args), None, None, None, None, None


_lrn.register_autograd(_backward, setup_context=_setup_context)


def local_response_norm(input: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 1.0, *, groups: int = 1) -> torch.Tensor:
    """Local response normalization across channels, as torch.nn.functional.local_response_norm.

    input: (N, C, *) with at least 3 dims, float16/bfloat16/float32/float64. Returns a tensor of
    input's shape, dtype and layout with

        out_c = input_c * (k + alpha/size * sum_{j = c - size//2}^{c + (size-1)//2} input_j^2) ** -beta,

    channels outside [0, C) counting as 0. Any size >= 1 works, even sizes included. k > 0 is not
    required: as in torch, a non-positive base with a fractional beta gives NaN.

    The paper (Krizhevsky et al. 2012) writes k=2, n=5, alpha=1e-4, beta=0.75 with the window sum
    NOT divided by n; in torch's (and Caffe's) terms that is size=5, alpha=5e-4 (= 5 * 1e-4),
    beta=0.75, k=2. In the two-tower net LRN runs per tower, over each tower's own channels
    (48 after conv1, 128 after conv2), not across both: groups=2 (an addition to torch's signature)
    normalises each of `groups` equal channel blocks on its own, in one pass, keeping the input's
    layout (torch's ops: as the reshape (N, C, *) -> (N*groups, C/groups, *) does).

    Differences from torch: integer inputs raise TypeError (torch returns float32), and an empty
    input gives a new empty tensor on the Triton path (torch returns the input itself).
    """
    op = "local_response_norm"
    check_float_tensor(input, f"{op}: input", min_dim=3)
    size = check_positive_int(size, f"{op}: size")
    alpha, beta, k = check_real(alpha, f"{op}: alpha"), check_real(beta, f"{op}: beta"), check_real(k, f"{op}: k")
    groups = check_groups(groups, op, channels=input.shape[1])

    if not use_triton(input.device):
        if groups == 1:
            return torch.nn.functional.local_response_norm(input, size, alpha, beta, k)
        n, c = input.shape[:2]  # each group's channels become a sample of their own (a view if contiguous)
        y = torch.nn.functional.local_response_norm(input.reshape(n * groups, c // groups, *input.shape[2:]), size,
                                                    alpha, beta, k)
        return y.reshape(input.shape)
    return _lrn(input, size, alpha, beta, k, groups)
