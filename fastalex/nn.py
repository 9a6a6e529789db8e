"""Modules that subclass torch's, so construction, repr and state_dict are torch's own,
while forward runs fastalex's fused ops."""

from __future__ import annotations

import torch

from fastalex import functional as F
from fastalex._backend import use_triton

__all__ = ["Conv2d", "LRNMaxPool2d", "LocalResponseNorm", "MaxPool2d"]


class Conv2d(torch.nn.Conv2d):
    """torch.nn.Conv2d plus `activation` (None or "relu"), fused into the convolution's epilogue.

    Input (N, C_in, H, W) or (C_in, H, W); output (N, C_out, H_out, W_out) or (C_out, H_out, W_out).
    Only padding_mode="zeros" is supported.
    """

    def __init__(self, *args, activation: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros":
            raise NotImplementedError(f"fastalex.nn.Conv2d supports padding_mode='zeros' only, got {self.padding_mode!r}")
        if activation not in (None, "relu"):
            raise ValueError(f"activation must be None or 'relu', got {activation!r}")
        self.activation = activation

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", activation={self.activation!r}" if self.activation else "")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                        activation=self.activation)


class LocalResponseNorm(torch.nn.LocalResponseNorm):
    """torch.nn.LocalResponseNorm (across channels of (N, C, *) input), one fused pass each way.

    `groups` > 1 normalises each of `groups` equal channel blocks on its own, as the paper's two
    towers do (the window never reaches into the other tower's channels).
    """

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, *, groups: int = 1):
        super().__init__(size, alpha, beta, k)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        self.groups = groups

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", groups={self.groups}" if self.groups > 1 else "")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # (local_response_norm checks the shape and groups.) One pass over all groups on the Triton path: no reshape, so channels_last input stays channels_last.
        return F.local_response_norm(input, self.size, self.alpha, self.beta, self.k, groups=self.groups)


class MaxPool2d(torch.nn.MaxPool2d):
    """torch.nn.MaxPool2d on (N, C, H, W) or (C, H, W) input; deterministic backward."""

    def forward(self, input: torch.Tensor):
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class LRNMaxPool2d(torch.nn.Module):
    """LocalResponseNorm(size, alpha, beta, k, groups=groups) then MaxPool2d(kernel_size, stride), fused.

    Input (N, C, H, W); output (N, C, OH, OW), OH = (H - kernel_size) // stride + 1. No padding,
    dilation or ceil mode. No parameters, so a model can swap its lrn + pool pair for this module
    without changing its state_dict (AlexNet does: lrn1 -> pool1 and lrn2 -> pool2).

    The two layers are its children `lrn` and `pool`, so what inspects a model layer by layer
    (fastalex.flops, forward hooks on leaf modules) still sees both: on the Triton kernels forward is
    one fused pass each way (fastalex.functional.lrn_max_pool2d); on torch's ops it calls the children.
    relu=True applies a ReLU to the input first, in the same pass (AlexNet's conv -> ReLU -> LRN ->
    pool, with the conv's ReLU moved here: no ReLU mask pass over the conv's output in the backward).
    """

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, kernel_size=3,
                 stride=2, *, groups: int = 1, relu: bool = False):
        super().__init__()
        if not isinstance(relu, bool):
            raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
        self.relu = relu
        self.lrn = LocalResponseNorm(size, alpha, beta, k, groups=groups)
        self.pool = MaxPool2d(kernel_size, stride)

    def extra_repr(self) -> str:
        return "relu=True" if self.relu else ""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(input, torch.Tensor) or input.dim() != 4:  # (the fused kernel's rule on every backend)
            raise ValueError(f"LRNMaxPool2d: input must be 4-D (N, C, H, W), got "
                             f"{tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__}")
        if not use_triton(input.device):
            return self.pool(self.lrn(torch.relu(input) if self.relu else input))
        n, p = self.lrn, self.pool
        return F.lrn_max_pool2d(input, n.size, n.alpha, n.beta, n.k, p.kernel_size, p.stride, groups=n.groups,
                                relu=self.relu)
