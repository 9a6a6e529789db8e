"""FLOP formulas for the conv custom ops, so torch.utils.flop_counter.FlopCounterMode counts them.

Counted as torch counts its own ops, so a model gives the same total on either backend:
- fastalex::conv2d as aten.convolution: 2 * N * C_out * OH * OW * (C_in / groups) * KH * KW
  (torch's conv_flop_count; the weight's shape carries the groups).
- fastalex::conv2d_input_grad and ::conv2d_weight_grad by torch's own formula for
  aten.convolution_backward, one gradient each: the input gradient as the transposed conv of
  grad_output, the weight gradient as conv(input^T, grad_output^T). That formula leaves out the
  groups in the weight gradient (torch 2.13 counts groups x the MACs done, 2x for the paper net's
  conv2, conv4, conv5); it is called rather than copied, so the totals follow torch's if it changes.
- Not counted, as torch does not count them for its ops: bias, the fused ReLU and its mask, the
  bias gradient, LRN and max-pool (torch's counter counts only matmul- and conv-like ops, so
  fastalex::local_response_norm* and ::max_pool2d* have no formula).

torch.utils.flop_counter imports triton, and `import fastalex` must not: the formulas are registered
when that module is first imported (a one-shot import hook), or at once if it already is.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

import torch

_MODULE = "torch.utils.flop_counter"


def _register() -> None:
    from torch.utils.flop_counter import conv_backward_flop, conv_flop_count, register_flop_formula

    ops = torch.ops.fastalex

    # Formulas get shapes for tensors (out_shape: the output's), the other arguments as passed.
    @register_flop_formula(ops.conv2d)
    def conv2d_flop(input, weight, *args, out_shape=None, **kwargs) -> int:
        return conv_flop_count(input, weight, out_shape)

    @register_flop_formula(ops.conv2d_input_grad)
    def conv2d_input_grad_flop(grad_output, weight, input_shape, stride, padding, dilation, groups, *args,
                               out_shape=None, **kwargs) -> int:
        return conv_backward_flop(grad_output, input_shape, weight, None, stride, padding, dilation, False, [0, 0],
                                  groups, [True, False, False], out_val=(out_shape, None, None))

    @register_flop_formula(ops.conv2d_weight_grad)
    def conv2d_weight_grad_flop(grad_output, input, weight_shape, stride, padding, dilation, groups, *args,
                                out_shape=None, **kwargs) -> int:
        grad_weight, _grad_bias = out_shape
        return conv_backward_flop(grad_output, input, weight_shape, None, stride, padding, dilation, False, [0, 0],
                                  groups, [False, True, False], out_val=(None, grad_weight, None))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls `hook` right after module `name` is first imported (Python has no post-import hook)."""

    def __init__(self, name: str, hook) -> None:
        self.name, self.hook = name, hook

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_hook(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            self.hook()

        spec.loader.exec_module = exec_then_hook
        return spec


def register_when_loaded() -> None:
    """Register the formulas now if torch.utils.flop_counter is loaded, else as soon as it is."""
    if _MODULE in sys.modules:
        _register()
    else:
        sys.meta_path.insert(0, _AfterImport(_MODULE, _register))
