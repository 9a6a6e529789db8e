"""FLOP accounting for AlexNet: parameters, multiply-accumulates and activation sizes per layer.

    from fastalex import flops
    b = flops.count("single")                     # one 227x227 image through the single-tower net
    b.params_total, b.macs_total                  # 62378344, 1135256096
    b.conv_param_share, b.conv_mac_share          # 0.060..., 0.948...
    flops.count("torchvision", image_size=256, batch_size=128)
    flops.count(model)                            # an AlexNet instance: its variant, sizes and classes
    b.layer("conv2").macs                         # one layer

Counting builds the net on the meta device and runs a meta input through it (torch backend) with
forward hooks on the leaf modules, so it needs no memory and works for any image and batch size.

Per layer, in forward order:
- name: conv1..conv5, lrn1, lrn2, pool1, pool2, pool5, drop6, fc6, act6, drop7, fc7, act7, fc8 (and
  act1..act5 when the activation is tanh, avgpool in the torchvision net). Names come from the
  layer's position: the i-th conv is conv{i}; LRN, max-pool and activation after conv i are lrn{i},
  pool{i}, act{i}; the j-th linear layer is fc{5+j}, the dropout before it drop{5+j}, the activation
  after it act{5+j}. They equal the module names of the "paper" and "single" nets, and give the
  torchvision net (whose modules are features.0, classifier.1, ...) the same names; `module` keeps
  the qualified module name (features.lrn1.pool for pool1: AlexNet fuses each LRN and the pool after
  it into one module, whose children are the two layers). A ReLU fused into the convolution is not a
  layer of its own (the torchvision net's nn.Identity placeholders are skipped): its work is part of
  the conv.
- kind: conv, fc, lrn, pool, avgpool, relu, tanh, dropout.
- macs: conv N*C_out*H_out*W_out*(C_in/groups)*K_h*K_w; fc N*in*out; 0 for every other kind
  (bias adds, ReLU, LRN and pooling are not counted, as in the paper's "computation units").
  flops = 2 * macs.
- activation_bytes: the layer output's element count times its element size.

The two-device tower net (AlexNet(devices=...)) is counted as the grouped one-device paper net it
equals (same parameters, same arithmetic).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from fastalex._backend import backend
from fastalex.model import VARIANTS, AlexNet

__all__ = ["Breakdown", "Call", "Layer", "count", "trace", "KINDS"]

KINDS = ("conv", "fc", "lrn", "pool", "avgpool", "relu", "tanh", "dropout")
_KIND_OF = (  # isinstance order matters: fastalex.nn modules subclass torch's
    (nn.Conv2d, "conv"), (nn.Linear, "fc"), (nn.LocalResponseNorm, "lrn"), (nn.MaxPool2d, "pool"),
    (nn.AdaptiveAvgPool2d, "avgpool"), (nn.AvgPool2d, "avgpool"), (nn.ReLU, "relu"), (nn.Tanh, "tanh"),
    (nn.Dropout, "dropout"), (nn.Identity, None),
)


def _kind(module: nn.Module) -> str | None:
    """The layer kind of a leaf module; None for placeholders (nn.Identity) that are no layer."""
    for cls, kind in _KIND_OF:
        if isinstance(module, cls):
            return kind
    return type(module).__name__.lower()


@dataclass(frozen=True)
class Layer:
    """One layer of the forward pass (see the module docstring for the names and the counting rules)."""

    name: str                      # conv1, lrn1, pool1, ..., fc8
    module: str                    # qualified module name in the model: "features.conv1", "features.0"
    kind: str                      # conv, fc, lrn, pool, avgpool, relu, tanh, dropout
    output_shape: tuple[int, ...]  # (N, C, H, W) or (N, features)
    params: int                    # weights + biases
    macs: int                      # multiply-accumulates for the whole batch
    activation_bytes: int          # output elements * element size

    @property
    def flops(self) -> int:
        return 2 * self.macs


@dataclass(frozen=True)
class Breakdown:
    """Per-layer counts of one forward pass of `batch_size` images of `image_size` (height, width)."""

    variant: str
    image_size: tuple[int, int]
    batch_size: int
    num_classes: int
    dtype: str
    layers: tuple[Layer, ...]

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r}; layers: {[l.name for l in self.layers]}")

    def _sum(self, field: str, kind: str | None = None) -> int:
        return sum(getattr(l, field) for l in self.layers if kind is None or l.kind == kind)

    @property
    def params_total(self) -> int:
        return self._sum("params")

    @property
    def macs_total(self) -> int:
        return self._sum("macs")

    @property
    def flops_total(self) -> int:
        return 2 * self.macs_total

    @property
    def activation_bytes_total(self) -> int:
        return self._sum("activation_bytes")

    @property
    def conv_param_share(self) -> float:
        """Fraction of all parameters that sit in the conv layers."""
        return self._sum("params", "conv") / self.params_total

    @property
    def fc_param_share(self) -> float:
        return self._sum("params", "fc") / self.params_total

    @property
    def conv_mac_share(self) -> float:
        """Fraction of all multiply-accumulates (= of all counted FLOPs) done by the conv layers."""
        return self._sum("macs", "conv") / self.macs_total

    @property
    def fc_mac_share(self) -> float:
        return self._sum("macs", "fc") / self.macs_total

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the configuration, totals, shares and every layer (with its flops)."""
        return dict(
            variant=self.variant, image_size=list(self.image_size), batch_size=self.batch_size,
            num_classes=self.num_classes, dtype=self.dtype, params_total=self.params_total,
            macs_total=self.macs_total, flops_total=self.flops_total,
            activation_bytes_total=self.activation_bytes_total, conv_param_share=self.conv_param_share,
            fc_param_share=self.fc_param_share, conv_mac_share=self.conv_mac_share, fc_mac_share=self.fc_mac_share,
            layers=[dict(name=l.name, module=l.module, kind=l.kind, output_shape=list(l.output_shape),
                         params=l.params, macs=l.macs, flops=l.flops, activation_bytes=l.activation_bytes)
                    for l in self.layers])


class Call(NamedTuple):
    """One leaf-module call seen by `trace`: the layer's name and kind, the module and what it got/gave."""

    name: str
    kind: str
    qualname: str
    module: nn.Module
    args: tuple
    output: Any


def trace(model: nn.Module, x: torch.Tensor, keep_inputs: bool = False) -> list[Call]:
    """Run `model(x)` once on torch's ops and return every leaf-module call in forward order, named as
    in `count`.

    On torch's ops a fused module runs its parts: AlexNet's LRNMaxPool2d (features.lrn1) is seen as
    its children, lrn1 (features.lrn1.lrn) and pool1 (features.lrn1.pool). nn.Identity placeholders
    are left out. keep_inputs: keep each call's positional inputs (else `args` is empty), e.g. to time
    each layer again on its real input.
    """
    seen: list[tuple[str, nn.Module, tuple, Any]] = []

    def hook(qualname: str) -> Callable:
        def record(module, args, output):
            seen.append((qualname, module, tuple(args) if keep_inputs else (), output))
        return record

    handles = [m.register_forward_hook(hook(q)) for q, m in model.named_modules()
               if not any(True for _ in m.children())]
    try:
        with backend("torch"):
            model(x)
    finally:
        for h in handles:
            h.remove()
    calls, conv, fc = [], 0, 5
    for qualname, module, args, output in seen:
        kind = _kind(module)
        if kind is None:
            continue
        if kind == "conv":
            conv += 1
            name = f"conv{conv}"
        elif kind == "fc":
            fc += 1
            name = f"fc{fc}"
        elif kind == "dropout":
            name = f"drop{fc + 1}"
        elif kind in ("lrn", "pool"):
            name = f"{kind}{conv}"
        elif kind in ("relu", "tanh"):
            name = f"act{fc if fc > 5 else conv}"
        else:
            name = kind if kind == "avgpool" else qualname
        calls.append(Call(name, kind, qualname, module, args, output))
    return calls


def _macs(module: nn.Module, kind: str, output: torch.Tensor) -> int:
    if kind == "conv":  # output N*C_out*H_out*W_out, each a dot product of (C_in/groups)*K_h*K_w
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    if kind == "fc":  # output N*out, each a dot product of `in` terms
        return output.numel() * module.in_features
    return 0


def _meta_twin(model: AlexNet, num_classes: int | None, image_size) -> tuple[AlexNet, tuple[int, int]]:
    """An AlexNet on the meta device with `model`'s configuration (the grouped net for towers)."""
    if num_classes is not None and num_classes != model.num_classes:
        raise ValueError(f"num_classes={num_classes} disagrees with the model's {model.num_classes}")
    size = model.image_size if image_size is None else _size(image_size)
    if model.variant != "torchvision" and size != model.image_size:
        raise ValueError(f"this {model.variant} AlexNet was built for {model.image_size[0]}x{model.image_size[1]} "
                         f"inputs, not {size[0]}x{size[1]}")
    with torch.device("meta"):
        twin = AlexNet(model.num_classes, model.variant, image_size=size, activation=model.activation,
                       lrn=model.lrn, pool=model.pool, init="torch")
    return twin, size


def _size(image_size) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        return image_size, image_size
    if (isinstance(image_size, (tuple, list)) and len(image_size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in image_size)):
        return int(image_size[0]), int(image_size[1])
    raise TypeError(f"image_size must be an int or a pair of ints, got {image_size!r}")


def count(model_or_variant: AlexNet | str = "paper", image_size=None, batch_size: int = 1,
          num_classes: int | None = None, dtype: torch.dtype = torch.float32, **model_kwargs) -> Breakdown:
    """Parameters, MACs and activation bytes per layer of one forward pass.

    model_or_variant: "paper", "single", "torchvision", or an AlexNet instance (its configuration is
    counted: variant, num_classes, image size, activation, LRN, pooling; a tower net counts as the
    grouped paper net). image_size: int or (height, width); default 227 (224 for torchvision), or
    the model's own. batch_size: images per forward pass (every count but params scales with it).
    num_classes: default 1000, or the model's own. dtype: element type for activation_bytes.
    model_kwargs (variant names only): more AlexNet arguments, e.g. lrn=False, activation="tanh", pool=(2, 2).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if isinstance(model_or_variant, AlexNet):
        if model_kwargs:
            raise TypeError(f"model arguments {sorted(model_kwargs)} apply to variant names, not to a model")
        model, size = _meta_twin(model_or_variant, num_classes, image_size)
    elif isinstance(model_or_variant, str):
        if model_or_variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {model_or_variant!r}")
        size = _size(image_size if image_size is not None else (224 if model_or_variant == "torchvision" else 227))
        with torch.device("meta"):
            model = AlexNet(1000 if num_classes is None else num_classes, model_or_variant, image_size=size,
                            init="torch", **model_kwargs)
    else:
        raise TypeError(f"count() takes a variant name {VARIANTS} or an AlexNet, got {type(model_or_variant).__name__}")
    model = model.to(dtype).eval()
    x = torch.empty(batch_size, 3, *size, device="meta", dtype=dtype)
    with torch.no_grad(), backend("torch"):
        calls = trace(model, x)
    layers = tuple(
        Layer(name=c.name, module=c.qualname, kind=c.kind, output_shape=tuple(c.output.shape),
              params=sum(p.numel() for p in c.module.parameters()), macs=_macs(c.module, c.kind, c.output),
              activation_bytes=c.output.numel() * c.output.element_size())
        for c in calls)
    return Breakdown(variant=model.variant, image_size=size, batch_size=batch_size, num_classes=model.num_classes,
                     dtype=str(dtype).removeprefix("torch."), layers=layers)
