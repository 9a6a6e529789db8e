"""AlexNet's layer shapes (227x227 input), as the benchmarks and the GPU check use them."""

from __future__ import annotations

from dataclasses import dataclass

from fastalex.ops._checks import output_length


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

    @property
    def out_size(self) -> int:
        return output_length(self.size, self.kernel, self.stride, self.padding)

    def macs(self, batch: int) -> int:
        return batch * self.c_out * self.out_size**2 * (self.c_in // self.groups) * self.kernel**2

    @property
    def input_needs_grad(self) -> bool:
        return self.name != "conv1"  # the image needs no gradient


# Single tower (the article's 62.3M-parameter net) and the paper's grouped layers.
CONV = [
    ConvShape("conv1", 3, 227, 96, 11, 4, 0, 1),
    ConvShape("conv2", 96, 27, 256, 5, 1, 2, 1),
    ConvShape("conv3", 256, 13, 384, 3, 1, 1, 1),
    ConvShape("conv4", 384, 13, 384, 3, 1, 1, 1),
    ConvShape("conv5", 384, 13, 256, 3, 1, 1, 1),
    ConvShape("conv2-g2", 96, 27, 256, 5, 1, 2, 2),
    ConvShape("conv4-g2", 384, 13, 384, 3, 1, 1, 2),
    ConvShape("conv5-g2", 384, 13, 256, 3, 1, 1, 2),
]

def tiny(s: ConvShape) -> ConvShape:
    """The same layer with few channels and a small image: for smoke runs in Triton's CPU interpreter."""
    return ConvShape(s.name, min(s.c_in, 4 * s.groups), min(s.size, s.kernel + 4), min(s.c_out, 4 * s.groups),
                     s.kernel, s.stride, s.padding, s.groups)


# (name, channels, size): LRN follows ReLU after conv1 and conv2; torch's constants for the paper's.
LRN = [("lrn1", 96, 55), ("lrn2", 256, 27)]
LRN_ARGS = dict(size=5, alpha=5e-4, beta=0.75, k=2.0)

# (name, channels, size): overlapping 3x3 stride-2 pools.
POOL = [("pool1", 96, 55), ("pool2", 256, 27), ("pool5", 256, 13)]
