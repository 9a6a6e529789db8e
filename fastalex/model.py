"""AlexNet built from fastalex's fused ops.

    AlexNet(num_classes=1000, variant="paper")        # the 2012 net: two towers, groups=2, LRN, 227x227
    AlexNet(variant="single")                         # the same net as one tower (the article's 62.3M)
    AlexNet(variant="torchvision")                    # torchvision.models.alexnet, same state_dict names
    AlexNet(variant="paper", devices=("cuda:0", "cuda:1"))   # each tower on its own GPU, as in the paper

Layer order in the first two stages is conv -> ReLU -> LRN -> max-pool (ReLU fused into the conv).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from fastalex import nn as fnn
from fastalex._backend import use_triton
from fastalex.ops._checks import output_length, pair

__all__ = ["AlexNet", "VARIANTS"]

VARIANTS = ("paper", "single", "torchvision")
INITS = ("paper", "torch", "kaiming")
LRN_ARGS = dict(size=5, alpha=5e-4, beta=0.75, k=2.0)  # the paper's k=2, n=5, alpha=1e-4, beta=0.75 in torch's terms
CONVS = ("conv1", "conv2", "conv3", "conv4", "conv5")
FCS = ("fc6", "fc7", "fc8")
# Layers whose biases the paper initialises to 1 (so their ReLUs start in the positive region).
BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")


def _conv_plan(variant: str):
    """(name, in, out, kernel, stride, padding, grouped) per conv layer, for the whole (grouped) net."""
    if variant == "torchvision":
        return [("conv1", 3, 64, 11, 4, 2, False), ("conv2", 64, 192, 5, 1, 2, False),
                ("conv3", 192, 384, 3, 1, 1, False), ("conv4", 384, 256, 3, 1, 1, False),
                ("conv5", 256, 256, 3, 1, 1, False)]
    return [("conv1", 3, 96, 11, 4, 0, False), ("conv2", 96, 256, 5, 1, 2, True),
            ("conv3", 256, 384, 3, 1, 1, False), ("conv4", 384, 384, 3, 1, 1, True),
            ("conv5", 384, 256, 3, 1, 1, True)]


def feature_size(variant: str, size: int, pool: tuple[int, int] = (3, 2)) -> int:
    """Spatial size after pool5 for a square input of `size` (0 if some layer gets nothing to work on)."""
    k, s = pool
    for name, _, _, kernel, stride, pad, _ in _conv_plan(variant):
        size = max(output_length(size, kernel, stride, pad), 0)
        if name in ("conv1", "conv2", "conv5"):
            size = max(output_length(size, k, s), 0)
        if size < 1:
            return 0
    return size


def smallest_image_size(variant: str, pool: tuple[int, int] = (3, 2)) -> int:
    return next(s for s in range(1, 1024) if feature_size(variant, s, pool) >= 1)


class _Tower(nn.Module):
    """One of the paper's two towers when they live on separate devices: half of every layer."""

    def __init__(self, num_outputs: int, dropout: float, act: str, lrn: bool, pool: tuple[int, int], fc_in: int):
        super().__init__()
        fused = "relu" if act == "relu" else None
        k, s = pool
        self.features1 = nn.Sequential(OrderedDict(_stage_layers([
            ("conv1", fnn.Conv2d(3, 48, 11, stride=4, activation=fused)),
            ("lrn1", fnn.LocalResponseNorm(**LRN_ARGS) if lrn else None),
            ("pool1", fnn.MaxPool2d(k, s)),
            ("conv2", fnn.Conv2d(48, 128, 5, padding=2, activation=fused)),
            ("lrn2", fnn.LocalResponseNorm(**LRN_ARGS) if lrn else None),
            ("pool2", fnn.MaxPool2d(k, s)),
        ], act)))
        self.features2 = nn.Sequential(OrderedDict(_stage_layers([
            ("conv3", fnn.Conv2d(256, 192, 3, padding=1, activation=fused)),  # sees both towers
            ("conv4", fnn.Conv2d(192, 192, 3, padding=1, activation=fused)),
            ("conv5", fnn.Conv2d(192, 128, 3, padding=1, activation=fused)),
            ("pool5", fnn.MaxPool2d(k, s)),
        ], act)))
        self.drop6 = nn.Dropout(dropout)
        self.fc6 = nn.Linear(fc_in, 2048)
        self.drop7 = nn.Dropout(dropout)
        self.fc7 = nn.Linear(4096, 2048)
        self.fc8 = nn.Linear(4096, num_outputs)
        self.act = nn.ReLU() if act == "relu" else nn.Tanh()


def _stage_layers(layers, act: str):
    """Drop absent layers; after each conv add a Tanh when the activation is not fused (ReLU is)."""
    out = []
    for name, module in layers:
        if module is None:
            continue
        out.append((name, module))
        if name.startswith("conv") and act != "relu":
            out.append((name.replace("conv", "act"), nn.Tanh()))
    return out


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
        fused = "relu" if activation == "relu" else None
        k, s = pool
        fh, fw = (feature_size(variant, image_size[0], pool), feature_size(variant, image_size[1], pool))
        fc_in = 256 * 6 * 6 if variant == "torchvision" else 256 * fh * fw

        if devices is not None:
            outs = [num_classes - num_classes // 2, num_classes // 2]  # fc8's classes, split between towers
            self.towers = nn.ModuleList(_Tower(n, dropout, activation, lrn, pool, fc_in).to(d)
                                        for n, d in zip(outs, devices))
            self.register_state_dict_post_hook(_merge_towers)
            self.register_load_state_dict_pre_hook(_split_towers)
        elif variant == "torchvision":
            act = (lambda: nn.Identity()) if activation == "relu" else (lambda: nn.Tanh())  # Identity: fused
            convs = [fnn.Conv2d(ci, co, kk, stride=st, padding=p, activation=fused)
                     for _, ci, co, kk, st, p, _ in _conv_plan(variant)]
            self.features = nn.Sequential(
                convs[0], act(), fnn.MaxPool2d(k, s), convs[1], act(), fnn.MaxPool2d(k, s),
                convs[2], act(), convs[3], act(), convs[4], act(), fnn.MaxPool2d(k, s))
            self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
            self.classifier = nn.Sequential(
                nn.Dropout(dropout), nn.Linear(fc_in, 4096), _act(activation), nn.Dropout(dropout),
                nn.Linear(4096, 4096), _act(activation), nn.Linear(4096, num_classes))
        else:
            g = 2 if variant == "paper" else 1
            layers = []
            for name, ci, co, kk, st, p, grouped in _conv_plan(variant):
                layers.append((name, fnn.Conv2d(ci, co, kk, stride=st, padding=p, groups=g if grouped else 1,
                                                activation=fused)))
                if name in ("conv1", "conv2"):
                    layers.append((name.replace("conv", "lrn"), fnn.LocalResponseNorm(**LRN_ARGS, groups=g)
                                   if lrn else None))
                if name in ("conv1", "conv2", "conv5"):
                    layers.append((name.replace("conv", "pool"), fnn.MaxPool2d(k, s)))
            self.features = nn.Sequential(OrderedDict(_stage_layers(layers, activation)))
            self.classifier = nn.Sequential(OrderedDict([
                ("drop6", nn.Dropout(dropout)), ("fc6", nn.Linear(fc_in, 4096)), ("act6", _act(activation)),
                ("drop7", nn.Dropout(dropout)), ("fc7", nn.Linear(4096, 4096)), ("act7", _act(activation)),
                ("fc8", nn.Linear(4096, num_classes))]))
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
    def _init(net: nn.Module, init: str) -> None:
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
                m.bias.fill_(1.0 if name.rsplit(".", 1)[-1] in BIAS_ONE else 0.0)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.devices is not None:
            return self._forward_towers(x)
        x = self.features(_kernel_layout(x))
        if self.variant == "torchvision":
            x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))

    def _forward_towers(self, x: torch.Tensor) -> torch.Tensor:
        towers, devs = self.towers, self.devices

        def both(parts):  # every device gets the concatenation of both towers' activations
            return [torch.cat([p.to(d) for p in parts], dim=1) for d in devs]

        h = [t.features1(_kernel_layout(x.to(d))) for t, d in zip(towers, devs)]
        h = [t.features2(a) for t, a in zip(towers, both(h))]  # conv3 sees both towers
        h = [torch.flatten(a, 1) for a in h]
        h = [t.act(t.fc6(t.drop6(a))) for t, a in zip(towers, both(h))]
        h = [t.act(t.fc7(t.drop7(a))) for t, a in zip(towers, both(h))]
        h = [t.fc8(a) for t, a in zip(towers, both(h))]
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


def _act(activation: str) -> nn.Module:
    return nn.ReLU(inplace=False) if activation == "relu" else nn.Tanh()


def _tower_key(layer: str) -> str:
    return f"features1.{layer}" if layer in ("conv1", "conv2") else (
        f"features2.{layer}" if layer in ("conv3", "conv4", "conv5") else layer)


def _grouped_key(layer: str) -> str:
    return f"features.{layer}" if layer.startswith("conv") else f"classifier.{layer}"


def _merge_towers(module, state_dict, prefix, local_metadata):
    """state_dict hook: the towers' halves -> the single-device (grouped) names and shapes."""
    for layer in CONVS + FCS:
        for p in ("weight", "bias"):
            halves = [state_dict.pop(f"{prefix}towers.{t}.{_tower_key(layer)}.{p}") for t in (0, 1)]
            state_dict[f"{prefix}{_grouped_key(layer)}.{p}"] = torch.cat([halves[0], halves[1].to(halves[0].device)])


def _split_towers(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """load_state_dict pre-hook: the single-device (grouped) layout -> each tower's half."""
    for layer in CONVS + FCS:
        for p in ("weight", "bias"):
            key = f"{prefix}{_grouped_key(layer)}.{p}"
            if key not in state_dict:
                continue
            full = state_dict.pop(key)
            sizes = [getattr(t.get_submodule(_tower_key(layer)), p).shape[0] for t in module.towers]
            if full.shape[0] != sum(sizes):
                error_msgs.append(f"{key}: expected {sum(sizes)} rows for the two towers, got {tuple(full.shape)}")
                continue
            for t, part in enumerate(torch.split(full, sizes)):
                state_dict[f"{prefix}towers.{t}.{_tower_key(layer)}.{p}"] = part
