"""AlexNet built from fastalex's fused ops, from one table of layers.

    AlexNet(num_classes=1000, variant="paper")        # the 2012 net: two towers, groups=2, LRN, 227x227
    AlexNet(variant="single")                         # the same net as one tower (the article's 62.3M)
    AlexNet(variant="torchvision")                    # torchvision.models.alexnet, same state_dict names
    AlexNet(variant="paper", devices=("cuda:0", "cuda:1"))   # each tower on its own GPU, as in the paper

The tables PAPER and TORCHVISION below are the only place the architecture is written down. Built
from them: the three variants, the paper net's two towers, the hybrid net (fastalex.hybrid),
explore's hidden features (AlexNet.hidden) and perf/shapes.py (feature_shapes). Layer order in the
first two stages is conv -> ReLU -> LRN -> max-pool; with activation="relu" the ReLU after a conv is
fused into the op after it, so it gets no module of its own: each LRN and the max-pool after it are
one fastalex.nn.LRNMaxPool2d named after the LRN (features.lrn1, whose children `lrn` and `pool` are
the two layers, so the pool gets no module of its own either) that applies conv1's and conv2's ReLU
first (relu=True), and conv3-5 take theirs in the conv's epilogue.
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import torch
from torch import nn

from fastalex import nn as fnn
from fastalex._backend import use_triton
from fastalex.ops._checks import output_length, pair

__all__ = ["AlexNet", "VARIANTS", "Layer", "PAPER", "TORCHVISION", "table", "feature_shapes"]

VARIANTS = ("paper", "single", "torchvision")
INITS = ("paper", "torch", "kaiming")
LRN_ARGS = dict(size=5, alpha=5e-4, beta=0.75, k=2.0)  # the paper's k=2, n=5, alpha=1e-4, beta=0.75 in torch's terms


@dataclass(frozen=True)
class Layer:
    """One row of a layer table: one layer of the whole (one-device) net.

    name: conv1, act1, lrn1, pool1, ..., fc8: the module names of the paper and single nets (the
          torchvision net names its modules by position instead, as torchvision does).
    kind: conv, act (ReLU or tanh), lrn, pool (the net's max-pool), avgpool, dropout, fc.
    out: output channels (conv), output features (fc; None: num_classes) or output height = width (avgpool).
    kernel, stride, padding: of the conv (a pool's come from AlexNet(pool=...)).
    grouped: the paper net runs it per tower, as groups=2 (conv, LRN): it sees its own tower's channels only.
    exchange: the towers swap activations before it, so each tower's half of it sees both towers' output.
    bias_one: init="paper" sets its bias to 1 (so its ReLU starts in the positive region), else 0.
    """

    name: str
    kind: str
    out: int | None = None
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    grouped: bool = False
    exchange: bool = False
    bias_one: bool = False


# The paper's net (ALEXNET.md's table); "single" is the same rows without the groups. In the towers
# every conv and fc is split by its outputs: each tower holds half of the kernels or neurons.
PAPER = (
    Layer("conv1", "conv", 96, 11, stride=4),
    Layer("act1", "act"),
    Layer("lrn1", "lrn", grouped=True),
    Layer("pool1", "pool"),
    Layer("conv2", "conv", 256, 5, padding=2, grouped=True, bias_one=True),
    Layer("act2", "act"),
    Layer("lrn2", "lrn", grouped=True),
    Layer("pool2", "pool"),
    Layer("conv3", "conv", 384, 3, padding=1, exchange=True),
    Layer("act3", "act"),
    Layer("conv4", "conv", 384, 3, padding=1, grouped=True, bias_one=True),
    Layer("act4", "act"),
    Layer("conv5", "conv", 256, 3, padding=1, grouped=True, bias_one=True),
    Layer("act5", "act"),
    Layer("pool5", "pool"),
    Layer("drop6", "dropout", exchange=True),  # the exchange comes before the dropout: each tower
    Layer("fc6", "fc", 4096, bias_one=True),   # drops its own mask over all of fc6's inputs
    Layer("act6", "act"),
    Layer("drop7", "dropout", exchange=True),
    Layer("fc7", "fc", 4096, bias_one=True),
    Layer("act7", "act"),
    Layer("fc8", "fc", exchange=True),
)

# torchvision.models.alexnet ("one weird trick" channels, 224 input): no LRN, no groups, avgpool to 6x6.
# Not the paper's net, so init="paper" gives it N(0, 0.01^2) weights and zero biases.
TORCHVISION = (
    Layer("conv1", "conv", 64, 11, stride=4, padding=2), Layer("act1", "act"), Layer("pool1", "pool"),
    Layer("conv2", "conv", 192, 5, padding=2), Layer("act2", "act"), Layer("pool2", "pool"),
    Layer("conv3", "conv", 384, 3, padding=1), Layer("act3", "act"),
    Layer("conv4", "conv", 256, 3, padding=1), Layer("act4", "act"),
    Layer("conv5", "conv", 256, 3, padding=1), Layer("act5", "act"), Layer("pool5", "pool"),
    Layer("avgpool", "avgpool", 6),
    Layer("drop6", "dropout"), Layer("fc6", "fc", 4096), Layer("act6", "act"),
    Layer("drop7", "dropout"), Layer("fc7", "fc", 4096), Layer("act7", "act"), Layer("fc8", "fc"),
)

_STAGE = dict(conv="features", lrn="features", pool="features", avgpool="avgpool", dropout="classifier",
              fc="classifier")  # act: the stage of the layer before it


def table(variant: str) -> tuple[Layer, ...]:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return TORCHVISION if variant == "torchvision" else PAPER


class Shape(NamedTuple):
    """A feature layer of the whole net for a square input: channels and height = width, in and out."""

    layer: Layer
    c_in: int
    size_in: int
    c_out: int
    size_out: int  # <= 0 when the input is too small for this layer
    groups: int    # 2 for the paper net's grouped layers, else 1


def feature_shapes(variant: str, size: int, pool: tuple[int, int] = (3, 2)) -> Iterator[Shape]:
    """The feature layers' shapes (conv, act, lrn, pool, avgpool; LRN rows whether or not the net
    has LRN) for a size x size input, in forward order; stops after a layer whose output is empty."""
    c = 3
    for layer in table(variant):
        if _STAGE.get(layer.kind) == "classifier":
            return
        c_out, out = c, size
        if layer.kind == "conv":
            c_out, out = layer.out, output_length(size, layer.kernel, layer.stride, layer.padding)
        elif layer.kind == "pool":
            out = output_length(size, *pool)
        elif layer.kind == "avgpool":
            out = layer.out
        yield Shape(layer, c, size, c_out, out, 2 if variant == "paper" and layer.grouped else 1)
        if out < 1:
            return
        c, size = c_out, out


def feature_size(variant: str, size: int, pool: tuple[int, int] = (3, 2)) -> int:
    """Spatial size after pool5 for a square input of `size` (0 if some layer gets nothing to work on)."""
    for s in feature_shapes(variant, size, pool):
        if s.layer.kind != "avgpool":  # torchvision's adaptive pool takes whatever pool5 gives
            size = max(s.size_out, 0)
    return size


def smallest_image_size(variant: str, pool: tuple[int, int] = (3, 2)) -> int:
    return _smallest_image_size(variant, tuple(pool))


@functools.lru_cache(maxsize=None)  # the torchvision net's input check asks on every forward
def _smallest_image_size(variant: str, pool: tuple[int, int]) -> int:
    return next(s for s in range(1, 1024) if feature_size(variant, s, pool) >= 1)


def convs_relu_in_lrn(variant: str) -> set[str]:
    """The convs whose ReLU runs in the fused LRN + max-pool after them rather than in their own
    epilogue, as _build makes them (activation "relu", LRN on): conv1 and conv2."""
    rows = table(variant)
    return {r.name for i, r in enumerate(rows) if r.kind == "conv" and _relu_to_lrn(rows, i, True)}


def _relu_to_lrn(rows: Sequence[Layer], i: int, lrn: bool) -> bool:
    """Whether the ReLU after the conv in rows[i] runs in the LRNMaxPool2d after it (conv -> act -> lrn ->
    pool with LRN on) rather than in the conv's epilogue: the fused LRN + pool then returns the conv
    output's gradient itself, and the conv's backward makes no ReLU mask pass over its output."""
    kinds = tuple(r.kind for r in rows[i:i + 4])
    return lrn and kinds == ("conv", "act", "lrn", "pool")


def _build(variant: str, num_classes: int, dropout: float, activation: str, lrn: bool, pool, fc_in: int,
           tower: int | None = None) -> list[tuple[Layer, str, nn.Module]]:
    """(layer, stage, module) for each table row that gets a module, in forward order; stage is
    features, avgpool or classifier. tower 0 or 1: that tower's half of the paper net instead."""
    groups = 2 if variant == "paper" and tower is None else 1

    def part(n: int) -> int:  # a tower's share of n outputs (the first tower takes the odd one)
        return n if tower is None else (n - n // 2, n // 2)[tower]

    rows = table(variant)
    built, c, stage, pooled = [], 3, "features", False  # c: the whole net's channels (then features) so far
    relu_to_lrn = False  # the last conv's ReLU is the next LRNMaxPool2d's (_relu_to_lrn)
    for i, layer in enumerate(rows):
        if _STAGE.get(layer.kind, stage) != stage:
            stage = _STAGE[layer.kind]
            c = fc_in if stage == "classifier" else c  # the classifier reads the flattened features
        m = None
        if layer.kind == "conv":
            c_in = c // 2 if tower is not None and layer.grouped else c  # a tower sees its own half only
            relu_to_lrn = activation == "relu" and _relu_to_lrn(rows, i, lrn)
            m = fnn.Conv2d(c_in, part(layer.out), layer.kernel, stride=layer.stride, padding=layer.padding,
                           groups=groups if layer.grouped else 1,
                           activation="relu" if activation == "relu" and not relu_to_lrn else None)
            c = layer.out
        elif layer.kind == "act":
            if stage == "classifier":
                m = nn.ReLU(inplace=False) if activation == "relu" else nn.Tanh()
            elif activation != "relu":
                m = nn.Tanh()
            elif variant == "torchvision":
                m = nn.Identity()  # the ReLU is fused into the conv; the placeholder keeps torchvision's positions
        elif layer.kind == "lrn" and lrn:
            g = groups if layer.grouped else 1
            pooled = i + 1 < len(rows) and rows[i + 1].kind == "pool"
            # LRN then the max-pool: one fused module (one pass over the conv's output each way) under
            # the LRN's name; neither has parameters, so the state_dict is the unfused net's.
            m = (fnn.LRNMaxPool2d(**LRN_ARGS, kernel_size=pool[0], stride=pool[1], groups=g, relu=relu_to_lrn)
                 if pooled
                 else fnn.LocalResponseNorm(**LRN_ARGS, groups=g))
        elif layer.kind == "pool" and pooled:
            pooled = False  # done by the LRNMaxPool2d before it
        elif layer.kind == "pool":
            m = fnn.MaxPool2d(*pool)
        elif layer.kind == "avgpool":
            m = nn.AdaptiveAvgPool2d((layer.out, layer.out))
        elif layer.kind == "dropout":
            m = nn.Dropout(dropout)
        elif layer.kind == "fc":
            m = nn.Linear(c, part(layer.out or num_classes))
            c = layer.out or num_classes
        if m is not None:
            built.append((layer, stage, m))
    return built


def _assemble(net: nn.Module, built, positional: bool) -> tuple[tuple[Layer, str], ...]:
    """Register _build's modules on net as `features`, `avgpool`, `classifier` (torchvision's names),
    in that order; modules are named after their layers, or by their position in the Sequential
    (torchvision's state_dict names). Returns (layer, module path) for each module, in forward order."""
    stages, paths = OrderedDict(), []
    for layer, stage, m in built:
        modules = stages.setdefault(stage, OrderedDict())
        name = str(len(modules)) if positional else layer.name
        modules[name] = m
        paths.append((layer, "avgpool" if stage == "avgpool" else f"{stage}.{name}"))
    for stage, modules in stages.items():
        setattr(net, stage, next(iter(modules.values())) if stage == "avgpool" else nn.Sequential(modules))
    return tuple(paths)


class _Tower(nn.Module):
    """One of the paper's two towers when they live on separate devices: features and classifier as
    in the one-device net, with half of every conv's kernels and every fc's neurons."""

    def __init__(self, built):
        super().__init__()
        self.layers = _assemble(self, built, positional=False)


class AlexNet(nn.Module):
    """AlexNet (Krizhevsky, Sutskever, Hinton 2012) on fastalex's fused Triton ops.

    input (N, 3, H, W) with H, W = image_size (any size for "torchvision", which pools adaptively to
    6x6, at least the smallest size the layers allow); output (N, num_classes) logits.

    variant: "paper" (two towers as groups=2 in conv2/4/5 and per-tower LRN; 60,965,224 parameters),
             "single" (one tower; 62,378,344), "torchvision" (torchvision's alexnet, same names).
    dropout: probability before fc6 and fc7. activation: "relu" (fused into the convs) or "tanh".
    lrn: LRN after conv1 and conv2 (default: on except for "torchvision"). pool: (kernel, stride)
    of the max-pools, (3, 2) overlapping or (2, 2). init: "paper" (N(0, 0.01^2) weights, biases 1
    in conv2/4/5, fc6, fc7, else 0), "torch" (torch's default) or "kaiming"; default "paper" except for
    "torchvision". devices: two devices for the paper net's towers (each tower's layers on its own
    device; activations cross at conv3 and the FC layers); the state_dict keeps the single-device
    layout's names and shapes, so checkpoints move between the two. seed: the initial weights are a
    function of the seed alone (drawn on the CPU from their own generator, whatever the device, the
    global RNG untouched; the towers get the grouped net's weights for the same seed); None draws
    from torch's global RNG, as torch's layers do.

    Modules: `features` (conv1 ... pool5), `avgpool` (torchvision only), `classifier` (drop6 ... fc8),
    named after the table's rows (torchvision: by position, as torchvision names them; lrn1 and lrn2
    are LRNMaxPool2d modules holding the pool after them as well, so pool1 and pool2 are not modules
    of their own but features.lrn1.pool and features.lrn2.pool); with devices,
    `towers` holds two such nets, each with half of every conv and fc. `layers`: (Layer, module path)
    for each module, in forward order (paths inside each tower for the towers).
    """

    def __init__(self, num_classes: int = 1000, variant: str = "paper", dropout: float = 0.5, *,
                 image_size=None, activation: str = "relu", lrn: bool | None = None, pool=(3, 2),
                 init: str | None = None, devices: Sequence | None = None, seed: int | None = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if activation not in ("relu", "tanh"):
            raise ValueError(f"activation must be 'relu' or 'tanh', got {activation!r}")
        pool = pair(pool, "pool", minimum=1)
        if pool not in ((3, 2), (2, 2)):
            raise ValueError(f"pool must be (3, 2) (overlapping, the paper's) or (2, 2), got {pool}")
        lrn = variant != "torchvision" if lrn is None else bool(lrn)
        if lrn and variant == "torchvision":
            raise ValueError("the torchvision variant has no LRN layers (lrn must be False)")
        init = init or ("torch" if variant == "torchvision" else "paper")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        _check_seed(seed)
        image_size = pair(image_size if image_size is not None else (224 if variant == "torchvision" else 227),
                          "image_size", minimum=1)
        smallest = smallest_image_size(variant, pool)
        if min(image_size) < smallest:
            raise ValueError(f"image_size {image_size} is too small for the {variant} variant: inputs must be at "
                             f"least {smallest}x{smallest}")
        if devices is not None:
            if variant != "paper":
                raise ValueError(f"devices (one per tower) needs variant='paper', got {variant!r}")
            if len(devices) != 2:
                raise ValueError(f"devices must name two devices, one per tower, got {devices!r}")
            devices = tuple(torch.device(d) for d in devices)

        # What rebuilds this net with other devices (to_towers); init is irrelevant once weights are copied.
        self.config = dict(num_classes=num_classes, variant=variant, dropout=float(dropout), image_size=image_size,
                           activation=activation, lrn=lrn, pool=pool)
        self.variant, self.num_classes, self.image_size = variant, num_classes, image_size
        self.activation, self.lrn, self.pool, self.devices = activation, lrn, pool, devices
        # fc6 reads the last conv's channels at pool5's size (torchvision: at avgpool's 6x6), flattened.
        shapes = [list(feature_shapes(variant, s, pool))[-1] for s in image_size]
        fc_in = shapes[0].c_out * shapes[0].size_out * shapes[1].size_out
        args = (variant, num_classes, dropout, activation, lrn, pool, fc_in)

        if devices is not None:
            self.towers = nn.ModuleList(_Tower(_build(*args, tower=t)).to(d) for t, d in enumerate(devices))
            self.layers = self.towers[0].layers  # both towers have the same layers and paths
            self.register_state_dict_post_hook(_merge_towers)
            self.register_load_state_dict_pre_hook(_split_towers)
        else:
            self.layers = _assemble(self, _build(*args), positional=variant == "torchvision")
        self.reset_parameters(init, seed=seed)

    @torch.no_grad()
    def reset_parameters(self, init: str = "paper", *, seed: int | None = None) -> None:
        """Re-initialise every layer: "paper" (section 5 of the paper), "torch" (torch's defaults) or
        "kaiming" (He et al. 2015: N(0, 2/fan_in) weights, zero biases; keeps the activations' scale
        through the ReLUs, so short runs start learning at once). seed: as in the constructor."""
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        _check_seed(seed)
        if seed is None:
            self._init(self, init)
        elif self.devices is not None:  # the towers: the grouped net's weights for this seed
            self.load_state_dict(AlexNet(**self.config, init=init, seed=seed).state_dict())
        else:
            # Drawn on the CPU (the same numbers on every device) from the seed alone; the caller's RNG is kept.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                device = next(self.parameters()).device
                cpu = self if device.type == "cpu" else copy.deepcopy(self).cpu()
                self._init(cpu, init)
                if cpu is not self:
                    for mine, drawn in zip(self.parameters(), cpu.parameters()):
                        mine.copy_(drawn)

    @staticmethod
    def _init(net: "AlexNet", init: str) -> None:
        """Every conv and fc in module order (the order the random numbers are drawn in)."""
        ones = {path for layer, path in net.layers if layer.bias_one}
        for name, m in net.named_modules():
            if not isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
            if init == "torch":
                m.reset_parameters()
                continue
            if init == "kaiming":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
                continue
            m.weight.normal_(0.0, 0.01)
            if m.bias is not None:
                path = name.split(".", 2)[-1] if net.devices is not None else name  # towers.0.features.conv2
                m.bias.fill_(1.0 if path in ones else 0.0)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"input must be (N, 3, H, W) images, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if self.variant == "torchvision":
            smallest = smallest_image_size(self.variant, self.pool)
            if min(x.shape[-2:]) < smallest:
                raise ValueError(f"input {tuple(x.shape[-2:])} is too small: the torchvision variant needs at least "
                                 f"{smallest}x{smallest}")
        elif tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(f"this AlexNet was built for {self.image_size[0]}x{self.image_size[1]} inputs, got "
                             f"{x.shape[-2]}x{x.shape[-1]}: build it with AlexNet(image_size=...) for other sizes "
                             f"(at least {smallest_image_size(self.variant, self.pool)})")

    def to_towers(self, devices: Sequence) -> "AlexNet":
        """A copy of this paper net with each tower on its own device (the paper's model parallelism),
        same weights; its state_dict is this net's, so checkpoints move between the two."""
        if self.variant != "paper":
            raise ValueError(f"towers need the paper variant (two towers as groups=2), got {self.variant!r}")
        towers = AlexNet(**self.config, devices=devices)
        towers.load_state_dict(self.state_dict())
        towers.train(self.training)
        return towers

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The conv stack, torchvision's `features` then (torchvision only) `avgpool`: images
        (N, 3, H, W) -> (N, 256, h, w), the classifier's input before flattening (h = w = 6 at 227x227,
        and always 6 for torchvision; 1 at the paper net's smallest input, 67). The towers' outputs
        come concatenated (tower 0's channels first) on devices[0]."""
        self._check_input(x)
        if self.devices is not None:
            return self._forward_towers(x, end=sum(not p.startswith("classifier.") for _, p in self.layers))
        x = self.features(_kernel_layout(x))
        return self.avgpool(x) if self.variant == "torchvision" else x

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer: images (N, 3, H, W) -> (N, 4096), fc7 after its activation (act7):
        every layer but fc8, in the net's current mode (call eval() first for no dropout)."""
        if self.devices is not None:
            self._check_input(x)
            return self._forward_towers(x, end=len(self.layers) - 1)
        x = torch.flatten(self.forward_features(x), 1)
        for layer in list(self.classifier)[:-1]:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) -> logits (N, num_classes) (on devices[0] for the towers)."""
        if self.devices is not None:
            self._check_input(x)
            return self._forward_towers(x, end=len(self.layers))
        return self.classifier(torch.flatten(self.forward_features(x), 1))

    def _forward_towers(self, x: torch.Tensor, end: int) -> torch.Tensor:
        """The first `end` of self.layers, each tower's half on its tower's device; the two halves'
        outputs concatenated along dim 1 on devices[0]."""
        devs = self.devices
        h = [_kernel_layout(x.to(d)) for d in devs]
        for layer, path in self.layers[:end]:
            if path.startswith("classifier.") and h[0].dim() == 4:
                h = [torch.flatten(a, 1) for a in h]  # the classifier's input
            if layer.exchange:  # every device gets the concatenation of both towers' activations
                h = [torch.cat([a.to(d) for a in h], dim=1) for d in devs]
            h = [t.get_submodule(path)(a) for t, a in zip(self.towers, h)]
        return torch.cat([h[0], h[1].to(devs[0])], dim=1)


def _check_seed(seed) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be None or an int in [0, 2**63), got {seed!r}")


def _kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """x in channels_last where fastalex's Triton kernels will run on a GPU; else as given.

    The kernels read activations with contiguous channels much faster (an H200, batch 128: the
    single net's training step took 25 ms in channels_last, 56 ms in NCHW); every layer keeps
    its input's memory format, so converting the image once is enough. torch's ops are left alone.
    """
    if x.dim() == 4 and x.device.type == "cuda" and use_triton(x.device):
        return x.contiguous(memory_format=torch.channels_last)
    return x


# The towers' state_dict is the one-device (grouped) net's: tower t's `towers.t.K` holds rows
# (output channels or neurons) of the grouped net's K, tower 0's first, for every parameter K.

def _merge_towers(module, state_dict, prefix, local_metadata):
    """state_dict hook: the towers' halves -> the single-device (grouped) names and shapes."""
    first = f"{prefix}towers.0."
    for key in [k for k in state_dict if k.startswith(first)]:
        name = key[len(first):]
        halves = [state_dict.pop(key), state_dict.pop(f"{prefix}towers.1.{name}")]
        state_dict[prefix + name] = torch.cat([halves[0], halves[1].to(halves[0].device)])


def _split_towers(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """load_state_dict pre-hook: the single-device (grouped) layout -> each tower's half."""
    own = [dict(t.named_parameters()) for t in module.towers]
    for name in own[0]:
        key = prefix + name
        if key not in state_dict:
            continue
        full = state_dict.pop(key)
        sizes = [o[name].shape[0] for o in own]
        if full.shape[0] != sum(sizes):
            error_msgs.append(f"{key}: expected {sum(sizes)} rows for the two towers, got {tuple(full.shape)}")
            continue
        for t, part in enumerate(torch.split(full, sizes)):
            state_dict[f"{prefix}towers.{t}.{name}"] = part
