"""Functional API mirroring torch.nn.functional: the fused ops of fastalex.

Each function has torch's signature (plus `activation` for conv2d; lrn_max_pool2d is
local_response_norm then max_pool2d fused, with both ops' arguments), validates its arguments,
then runs fastalex's Triton kernels or torch's own op as `fastalex.backend` decides.
"""

from fastalex.ops.conv2d import conv2d, conv2d_relu
from fastalex.ops.lrn import local_response_norm
from fastalex.ops.lrn_maxpool2d import lrn_max_pool2d
from fastalex.ops.maxpool2d import max_pool2d

__all__ = ["conv2d", "conv2d_relu", "local_response_norm", "lrn_max_pool2d", "max_pool2d"]
