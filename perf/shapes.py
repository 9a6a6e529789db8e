"""AlexNet's layer shapes (227x227 input), as the benchmarks and the GPU check use them.

Read off fastalex.model's layer table (feature_shapes), not written down again: CONV (ConvShape per
conv), LRN and POOL ((name, channels, input size) per layer), LRN_ARGS (torch's constants for the paper's).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastalex.model import LRN_ARGS, convs_relu_in_lrn, feature_shapes
from fastalex.ops._checks import output_length

__all__ = ["ConvShape", "CONV", "LRN", "LRN_ARGS", "POOL", "tiny"]


@dataclass(frozen=True)
class ConvShape:
    name: str
    c_in: int
    size: int  # input height = width
    c_out: int
    kernel: int
    stride: int
    padding: int
    groups: int  # 2 in the paper's two-tower net for conv2, conv4, conv5; 1 for the single tower
    relu: bool = True  # the ReLU in the conv's epilogue; False where the LRN + pool after it takes it (conv1, 2)

    @property
    def out_size(self) -> int:
        return output_length(self.size, self.kernel, self.stride, self.padding)

    def macs(self, batch: int) -> int:
        return batch * self.c_out * self.out_size**2 * (self.c_in // self.groups) * self.kernel**2

    @property
    def input_needs_grad(self) -> bool:
        return self.name != "conv1"  # the image needs no gradient


def _convs(variant: str, suffix: str = "") -> list[ConvShape]:
    in_lrn = convs_relu_in_lrn(variant)
    return [ConvShape(s.layer.name + suffix, s.c_in, s.size_in, s.c_out, s.layer.kernel, s.layer.stride,
                      s.layer.padding, s.groups, relu=s.layer.name not in in_lrn)
            for s in feature_shapes(variant, 227) if s.layer.kind == "conv" and (not suffix or s.groups > 1)]


# Single tower (the article's 62.3M-parameter net), then the paper's grouped layers (conv2-g2, conv4-g2, conv5-g2).
CONV = _convs("single") + _convs("paper", "-g2")


def tiny(s: ConvShape) -> ConvShape:
    """The same layer with few channels and a small image: for smoke runs in Triton's CPU interpreter."""
    return ConvShape(s.name, min(s.c_in, 4 * s.groups), min(s.size, s.kernel + 4), min(s.c_out, 4 * s.groups),
                     s.kernel, s.stride, s.padding, s.groups, s.relu)


# (name, channels, size): LRN follows ReLU after conv1 and conv2 (lrn1: 96 channels at 55x55, lrn2: 256 at 27x27).
LRN = [(s.layer.name, s.c_in, s.size_in) for s in feature_shapes("single", 227) if s.layer.kind == "lrn"]

# (name, channels, input size): overlapping 3x3 stride-2 pools (pool1 96 at 55, pool2 256 at 27, pool5 256 at 13).
POOL = [(s.layer.name, s.c_in, s.size_in) for s in feature_shapes("single", 227) if s.layer.kind == "pool"]
