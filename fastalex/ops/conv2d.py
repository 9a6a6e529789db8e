"""conv2d with bias and fused ReLU: argument checks, the custom ops and their autograd.

    conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, activation=None)
    input (N, C_in, H, W) or (C_in, H, W); weight (C_out, C_in/groups, KH, KW); bias (C_out,)

The Triton path is three custom ops (fastalex::conv2d, ::conv2d_input_grad, ::conv2d_weight_grad),
so torch.compile and torch.export see them whole, backward included. fp32 products use tf32 on the
GPU exactly when torch.backends.cudnn.allow_tf32 lets cuDNN do so (True by default).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastalex._backend import use_triton
from fastalex.ops import _flops
from fastalex.ops._checks import check_float_tensor, check_groups, check_same, output_length, pair

__all__ = ["conv2d", "conv2d_relu"]

ACTIVATIONS = (None, "relu")


def _channels_last(x: Tensor) -> bool:
    # The output (and the input gradient) keep the input's memory format, as torch's conv does.
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


# Devices whose other layouts run on the channels_last kernels after one conversion of the input: on
# a GPU the kernels read channels-contiguous tiles with 16-byte copies, while NCHW strides spill
# registers and reach a fraction of the issue rate (perf/NOTES.md, "NCHW through channels_last").
CHANNELS_LAST_DEVICES = ("cuda",)


# ---------------------------------------------------------------------------------------------
# Custom ops


@torch.library.custom_op("fastalex::conv2d", mutates_args=())
def _conv2d_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
               padding: Sequence[int], dilation: Sequence[int], groups: int, output_size: Sequence[int],
               relu: bool) -> Tensor:
    from fastalex.kernels import conv2d as K

    return K.conv2d_forward(input, weight, bias, stride, padding, dilation, groups, output_size, relu,
                            channels_last=_channels_last(input), allow_tf32=torch.backends.cudnn.allow_tf32)


@_conv2d_op.register_fake
def _(input, weight, bias, stride, padding, dilation, groups, output_size, relu):
    fmt = torch.channels_last if _channels_last(input) else torch.contiguous_format
    shape = (input.shape[0], weight.shape[0], *output_size)
    return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=fmt)


@torch.library.custom_op("fastalex::conv2d_input_grad", mutates_args=())
def _conv2d_input_grad_op(grad_output: Tensor, weight: Tensor, input_shape: Sequence[int], stride: Sequence[int],
                          padding: Sequence[int], dilation: Sequence[int], groups: int, channels_last: bool) -> Tensor:
    from fastalex.kernels import conv2d as K

    return K.conv2d_input_grad(grad_output, weight, input_shape, stride, padding, dilation, groups,
                               channels_last=channels_last, allow_tf32=torch.backends.cudnn.allow_tf32)


@_conv2d_input_grad_op.register_fake
def _(grad_output, weight, input_shape, stride, padding, dilation, groups, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(tuple(input_shape), dtype=grad_output.dtype, device=grad_output.device, memory_format=fmt)


@torch.library.custom_op("fastalex::conv2d_weight_grad", mutates_args=())
def _conv2d_weight_grad_op(grad_output: Tensor, input: Tensor, weight_shape: Sequence[int], stride: Sequence[int],
                           padding: Sequence[int], dilation: Sequence[int], groups: int) -> tuple[Tensor, Tensor]:
    from fastalex.kernels import conv2d as K

    return K.conv2d_weight_grad(grad_output, input, weight_shape, stride, padding, dilation, groups,
                                allow_tf32=torch.backends.cudnn.allow_tf32)


@_conv2d_weight_grad_op.register_fake
def _(grad_output, input, weight_shape, stride, padding, dilation, groups):
    dw = grad_output.new_empty(tuple(weight_shape))
    return dw, grad_output.new_empty((weight_shape[0],))


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups, output_size, relu = inputs
    ctx.conf = (list(stride), list(padding), list(dilation), groups)
    ctx.input_shape = list(input.shape)
    ctx.weight_shape = list(weight.shape)
    ctx.channels_last = _channels_last(input)
    ctx.has_bias = bias is not None
    # The ReLU mask comes from the output itself: no extra tensor is kept.
    ctx.save_for_backward(input, weight, output if relu else None)


def _backward(ctx, grad_output):
    input, weight, output = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conf
    grad_input = grad_weight = grad_bias = None
    if output is not None:
        # The ReLU mask, applied once (torch's own relu backward: zero where output <= 0), rather than
        # inside both GEMMs, where dgrad would re-read the output once per kernel tap.
        grad_output = torch.ops.aten.threshold_backward(grad_output, output, 0)
    if ctx.needs_input_grad[0]:  # skipped for conv1, whose input is the image
        grad_input = _conv2d_input_grad_op(grad_output, weight, ctx.input_shape, stride, padding, dilation, groups,
                                           ctx.channels_last)
    if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
        grad_weight, grad_bias = _conv2d_weight_grad_op(grad_output, input, ctx.weight_shape, stride, padding,
                                                        dilation, groups)
        if not ctx.has_bias:
            grad_bias = None
    return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
# FlopCounterMode counts the three ops as torch counts its convolution (see _flops.py).
_flops.register_when_loaded()


# ---------------------------------------------------------------------------------------------
# Public API


def _padding(padding, kernel: tuple[int, int], dilation: tuple[int, int], stride: tuple[int, int]):
    """torch's padding argument -> ((top, left), (bottom, right))."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' is not supported for strided convolutions (stride={stride})")
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            front = tuple(t // 2 for t in total)
            # An odd total pads one more at the bottom/right, as torch does.
            return front, tuple(t - f for t, f in zip(total, front))
        raise ValueError(f"padding must be 'valid', 'same', an int or a pair of ints, got {padding!r}")
    p = pair(padding, "padding", minimum=0)
    return p, p


def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
           groups: int = 1, activation: Optional[str] = None) -> Tensor:
    """torch.nn.functional.conv2d, with `activation="relu"` fused into the epilogue.

    input (N, C_in, H, W) or unbatched (C_in, H, W); weight (C_out, C_in/groups, KH, KW); bias (C_out,).
    Returns (N, C_out, OH, OW) (or (C_out, OH, OW)), in input's memory format, except on a GPU with
    the Triton backend: there any input runs channels_last (one conversion of the input, none of the
    output), so the output is channels_last, as cuDNN's is for a channels_last input.
    """
    check_float_tensor(input, "input", dims=(3, 4))
    check_float_tensor(weight, "weight", dims=(4,))
    if bias is not None:
        check_float_tensor(bias, "bias", dims=(1,))
    kind = input.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):  # (not on "meta")
        # Under autocast torch runs convolutions in the autocast dtype (fp32 weights, bf16 input, ...);
        # so do both backends. float64 stays float64, as autocast leaves it.
        dt = torch.get_autocast_dtype(kind)
        input, weight, bias = (t if t is None or t.dtype == torch.float64 else t.to(dt) for t in (input, weight, bias))
    check_same("input", input, "weight", weight)
    if bias is not None:
        check_same("input", input, "bias", bias)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    groups = check_groups(groups)
    stride_ = pair(stride, "stride", minimum=1)
    dilation_ = pair(dilation, "dilation", minimum=1)

    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    N, C_in, H, W = x.shape
    C_out, Cig, KH, KW = weight.shape
    if C_in == 0 or C_out == 0 or H == 0 or W == 0 or KH == 0 or KW == 0:
        raise ValueError(f"conv2d needs non-empty channels, image and kernel: input {tuple(input.shape)}, "
                         f"weight {tuple(weight.shape)} (only the batch may be empty)")
    if C_in % groups or C_out % groups:
        raise ValueError(f"groups={groups} must divide input channels ({C_in}) and output channels ({C_out})")
    if Cig * groups != C_in:
        raise ValueError(f"weight {tuple(weight.shape)} expects {Cig * groups} input channels "
                         f"(weight.shape[1] * groups), but input has {C_in}")
    if bias is not None and bias.shape[0] != C_out:
        raise ValueError(f"bias must have shape ({C_out},) to match weight, got {tuple(bias.shape)}")
    front, back = _padding(padding, (KH, KW), dilation_, stride_)
    padded = [s + f + b for s, f, b in zip((H, W), front, back)]
    # (the padding may be asymmetric ('same'): the padded length with no further padding)
    output_size = [output_length(p, k, st, 0, d) for p, k, st, d in zip(padded, (KH, KW), stride_, dilation_)]
    if min(output_size) < 1:
        span = [d * (k - 1) + 1 for d, k in zip(dilation_, (KH, KW))]
        raise ValueError(f"input {H}x{W} padded to {padded[0]}x{padded[1]} is smaller than the dilated kernel "
                         f"{span[0]}x{span[1]}")

    if not use_triton(x.device):
        y = torch.nn.functional.conv2d(input, weight, bias, stride_, padding if isinstance(padding, str) else front,
                                       dilation_, groups)
        return torch.relu(y) if activation == "relu" else y

    if x.device.type in CHANNELS_LAST_DEVICES and not _channels_last(x):
        # One conversion here; the output (and so the next layer's input) is channels_last.
        x = x.contiguous(memory_format=torch.channels_last)
    y = _conv2d_op(x, weight, bias, list(stride_), list(front), list(dilation_), groups, output_size,
                   activation == "relu")
    return y.squeeze(0) if unbatched else y


def conv2d_relu(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
                groups: int = 1) -> Tensor:
    """relu(conv2d(input, weight, bias, ...)) in one kernel; shapes as in `conv2d`."""
    return conv2d(input, weight, bias, stride, padding, dilation, groups, activation="relu")
