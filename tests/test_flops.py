"""fastalex.flops: parameters and MACs per layer against values worked out by hand from the layer table;
FlopCounterMode on fastalex's custom ops against torch's ops."""

import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastalex
import fastalex.functional as F
from fastalex import flops
from fastalex.model import AlexNet, smallest_image_size

# Per variant, the five convs at the default image size (227; 224 for torchvision):
# (C_in, C_out, kernel, groups, output height = width). From ALEXNET.md's table, not from the code.
CONVS = {
    "single": [(3, 96, 11, 1, 55), (96, 256, 5, 1, 27), (256, 384, 3, 1, 13), (384, 384, 3, 1, 13),
               (384, 256, 3, 1, 13)],
    "paper": [(3, 96, 11, 1, 55), (96, 256, 5, 2, 27), (256, 384, 3, 1, 13), (384, 384, 3, 2, 13),
              (384, 256, 3, 2, 13)],
    "torchvision": [(3, 64, 11, 1, 55), (64, 192, 5, 1, 27), (192, 384, 3, 1, 13), (384, 256, 3, 1, 13),
                    (256, 256, 3, 1, 13)],
}
FCS = [(256 * 6 * 6, 4096), (4096, 4096), (4096, 1000)]  # (in, out) of fc6, fc7, fc8

LRN_NET = ["conv1", "lrn1", "pool1", "conv2", "lrn2", "pool2", "conv3", "conv4", "conv5", "pool5",
           "drop6", "fc6", "act6", "drop7", "fc7", "act7", "fc8"]
NAMES = {"single": LRN_NET, "paper": LRN_NET,
         "torchvision": ["conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5", "avgpool",
                         "drop6", "fc6", "act6", "drop7", "fc7", "act7", "fc8"]}
KIND = {"conv": "conv", "lrn": "lrn", "pool": "pool", "avgpool": "avgpool", "drop": "dropout", "fc": "fc",
        "act": "relu"}

# ALEXNET.md's totals (one image): params, MACs, conv share of params and of MACs in percent.
TOTALS = {"single": (62_378_344, 1_135_256_096, 6.0, 94.8), "paper": (60_965_224, 724_406_816, 3.8, 91.9),
          "torchvision": (61_100_840, 714_188_480, 4.0, 91.8)}


def hand_counts(variant, batch=1, convs=None, fcs=FCS):
    """{layer: (params, MACs)} for the conv and FC layers, by the textbook formulas."""
    out = {}
    for i, (ci, co, k, g, size) in enumerate(convs or CONVS[variant], 1):
        out[f"conv{i}"] = (co * (ci // g) * k * k + co, batch * co * size * size * (ci // g) * k * k)
    for i, (fi, fo) in enumerate(fcs, 6):
        out[f"fc{i}"] = (fi * fo + fo, batch * fi * fo)
    return out


@pytest.mark.parametrize("variant", list(CONVS))
def test_per_layer_params_and_macs(variant):
    b = flops.count(variant)
    assert [l.name for l in b.layers] == NAMES[variant]
    assert [l.kind for l in b.layers] == [KIND[l.name.rstrip("0123456789")] for l in b.layers]
    hand = hand_counts(variant)
    for l in b.layers:
        params, macs = hand.get(l.name, (0, 0))
        assert (l.params, l.macs) == (params, macs), l.name
        assert l.flops == 2 * macs
        assert l.activation_bytes == 4 * torch.Size(l.output_shape).numel()  # float32
    assert b.params_total == sum(p for p, _ in hand.values())
    assert b.macs_total == sum(m for _, m in hand.values())


def test_literal_values():
    b = flops.count("single")
    assert b.layer("conv1").macs == 105_415_200 and b.layer("conv1").params == 34_944
    assert b.layer("conv2").macs == 447_897_600 and flops.count("paper").layer("conv2").macs == 223_948_800
    assert b.layer("fc6").params == 37_752_832 and b.layer("fc6").macs == 37_748_736
    assert b.layer("pool1").output_shape == (1, 96, 27, 27)
    assert b.layer("pool5").output_shape == (1, 256, 6, 6)
    assert b.layer("drop6").output_shape == (1, 9216)
    assert b.layer("fc8").output_shape == (1, 1000)
    with pytest.raises(KeyError, match="lrn3"):
        b.layer("lrn3")


@pytest.mark.parametrize("variant", list(TOTALS))
def test_totals_and_shares(variant):
    params, macs, conv_params_pct, conv_macs_pct = TOTALS[variant]
    b = flops.count(variant)
    assert (b.params_total, b.macs_total, b.flops_total) == (params, macs, 2 * macs)
    assert round(100 * b.conv_param_share, 1) == conv_params_pct
    assert round(100 * b.conv_mac_share, 1) == conv_macs_pct
    conv = [l for l in b.layers if l.kind == "conv"]
    assert b.conv_param_share == sum(l.params for l in conv) / params
    assert b.conv_param_share + b.fc_param_share == pytest.approx(1.0)  # nothing else has parameters
    assert b.conv_mac_share + b.fc_mac_share == pytest.approx(1.0)
    d = b.to_dict()
    assert (d["params_total"], d["macs_total"], d["image_size"]) == (params, macs, list(b.image_size))
    assert [l["name"] for l in d["layers"]] == NAMES[variant]


@pytest.mark.parametrize("variant", ["single", "paper"])
def test_names_are_the_module_names(variant):
    """A layer's name is its module's, except for the parts of a fused LRN + max-pool module, named
    after the module (lrn1) and their kind: features.lrn1.lrn is lrn1, features.lrn1.pool is pool1."""
    for l in flops.count(variant).layers:
        parent, _, leaf = l.module.rpartition(".")
        if leaf in ("lrn", "pool"):
            assert parent.rsplit(".", 1)[-1] == "lrn" + l.name[-1] and l.name == leaf + l.name[-1]
        else:
            assert leaf == l.name


def test_torchvision_names_map_to_its_indices():
    modules = {l.name: l.module for l in flops.count("torchvision").layers}
    assert modules["conv1"] == "features.0" and modules["conv5"] == "features.10"
    assert modules["pool5"] == "features.12" and modules["fc6"] == "classifier.1"
    assert modules["fc8"] == "classifier.6" and modules["avgpool"] == "avgpool"


def test_other_image_size():
    # 291: conv1 (291-11)/4+1 = 71, pool1 35, conv2 35, pool2 17, conv3-5 17, pool5 8 -> fc6 sees 256*8*8.
    convs = [(3, 96, 11, 1, 71), (96, 256, 5, 1, 35), (256, 384, 3, 1, 17), (384, 384, 3, 1, 17),
             (384, 256, 3, 1, 17)]
    fcs = [(256 * 8 * 8, 4096), (4096, 4096), (4096, 1000)]
    b = flops.count("single", image_size=291)
    assert b.image_size == (291, 291)
    for name, (params, macs) in hand_counts("single", convs=convs, fcs=fcs).items():
        assert (b.layer(name).params, b.layer(name).macs) == (params, macs), name
    assert b.layer("pool5").output_shape == (1, 256, 8, 8)
    # Non-square: only the width changes.
    b = flops.count("single", image_size=(227, 291))
    assert b.layer("conv1").output_shape == (1, 96, 55, 71)
    assert b.layer("pool5").output_shape == (1, 256, 6, 8)


def test_torchvision_other_image_size():
    # 320: conv1 (320+4-11)//4+1 = 79, pool1 39, pool2 19, pool5 9, then avgpool back to 6x6:
    # the same parameters, more conv work.
    convs = [(3, 64, 11, 1, 79), (64, 192, 5, 1, 39), (192, 384, 3, 1, 19), (384, 256, 3, 1, 19),
             (256, 256, 3, 1, 19)]
    b = flops.count("torchvision", image_size=320)
    assert b.params_total == TOTALS["torchvision"][0]
    hand = hand_counts("torchvision", convs=convs)
    assert b.macs_total == sum(m for _, m in hand.values())
    assert b.layer("pool5").output_shape == (1, 256, 9, 9)
    assert b.layer("avgpool").output_shape == (1, 256, 6, 6)


@pytest.mark.parametrize("variant", ["paper", "torchvision"])
def test_batch_scaling(variant):
    one, eight = flops.count(variant), flops.count(variant, batch_size=8)
    assert eight.batch_size == 8 and eight.params_total == one.params_total
    assert eight.macs_total == 8 * one.macs_total
    for a, b in zip(one.layers, eight.layers):
        assert (b.name, b.params, b.macs, b.activation_bytes) == (a.name, a.params, 8 * a.macs, 8 * a.activation_bytes)
        assert b.output_shape == (8,) + a.output_shape[1:]
    assert eight.conv_mac_share == pytest.approx(one.conv_mac_share)


def test_towers_count_as_the_grouped_net():
    towers = AlexNet(variant="paper", devices=("cpu", "cpu"), init="torch")
    assert flops.count(towers, batch_size=2) == flops.count("paper", batch_size=2)
    assert sum(p.numel() for p in towers.parameters()) == TOTALS["paper"][0]


def test_model_instance():
    model = AlexNet(num_classes=10, variant="single", image_size=131, init="torch")
    b = flops.count(model, batch_size=3)
    assert b == flops.count("single", image_size=131, batch_size=3, num_classes=10)
    assert b.params_total == sum(p.numel() for p in model.parameters())
    assert b.layer("fc8").macs == 3 * 4096 * 10
    with pytest.raises(ValueError, match="built for 131x131"):
        flops.count(model, image_size=227)
    with pytest.raises(ValueError, match="num_classes"):
        flops.count(model, num_classes=1000)
    with pytest.raises(TypeError, match="variant names"):
        flops.count(model, lrn=False)
    tv = AlexNet(variant="torchvision")  # pools adaptively: any image size is fine
    assert flops.count(tv, image_size=320).macs_total == flops.count("torchvision", image_size=320).macs_total


def test_model_options():
    tanh = flops.count("paper", activation="tanh")
    assert [l.name for l in tanh.layers][:3] == ["conv1", "act1", "lrn1"]
    assert [l.name for l in tanh.layers if l.kind == "tanh"] == ["act1", "act2", "act3", "act4", "act5", "act6",
                                                                 "act7"]
    assert tanh.macs_total == TOTALS["paper"][1]
    no_lrn = flops.count("single", lrn=False)
    assert "lrn1" not in [l.name for l in no_lrn.layers] and no_lrn.macs_total == TOTALS["single"][1]
    half = flops.count("single", dtype=torch.bfloat16)
    assert half.dtype == "bfloat16"
    assert half.activation_bytes_total * 2 == flops.count("single").activation_bytes_total


def test_trace_removes_its_hooks():
    model = AlexNet(variant="torchvision", init="torch").eval()
    x = torch.randn(1, 3, 63, 63)
    with torch.no_grad(), fastalex.backend("torch"):  # torch's ops: the interpreter is slow
        calls = flops.trace(model, x, keep_inputs=True)
    assert [c.name for c in calls] == NAMES["torchvision"]
    assert calls[0].args[0] is x and calls[1].args[0] is calls[0].output
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(model_or_variant="vgg"), ValueError, "variant"),
    (dict(model_or_variant=torch.nn.Linear(2, 2)), TypeError, "AlexNet"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size=True), ValueError, "batch_size"),
    (dict(image_size=50), ValueError, "too small"),
    (dict(image_size=(227,)), TypeError, "image_size"),
    (dict(dtype=torch.int32), TypeError, "dtype"),
])
def test_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        flops.count(**kwargs)


# ---------------------------------------------------------------------------------------------
# FlopCounterMode sees the conv custom ops (fastalex/ops/_flops.py)

FASTALEX_CONV_OPS = (torch.ops.fastalex.conv2d, torch.ops.fastalex.conv2d_input_grad,
                     torch.ops.fastalex.conv2d_weight_grad)


def _count(fn):
    """(total FLOPs, {op packet: FLOPs}, fn's result) of fn() under torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return counter.get_total_flops(), dict(counter.get_flop_counts()["Global"]), out


@pytest.mark.slow  # 20-40 s each in the interpreter
@pytest.mark.parametrize("variant", list(CONVS))
def test_flop_counter_same_on_kernels_and_torch(variant):
    # The smallest image and one image: the interpreter is slow.
    size = smallest_image_size(variant)
    model = AlexNet(num_classes=10, variant=variant, image_size=size, init="torch").eval()
    x = torch.randn(1, 3, size, size)
    counted = {}
    for name in ("torch", "triton"):
        with fastalex.backend(name):
            fwd, fwd_ops, loss = _count(lambda: model(x).square().sum())
            bwd, bwd_ops, _ = _count(loss.backward)
        counted[name] = fwd, bwd
        ran = set(fwd_ops) | set(bwd_ops)
        assert (set(FASTALEX_CONV_OPS) <= ran) == (name == "triton"), ran  # the kernels ran, and were counted
    assert counted["triton"] == counted["torch"]
    b = flops.count(model, batch_size=1)
    assert counted["triton"][0] == b.flops_total
    # The input gradient is counted as the transposed conv (the forward's work), except for conv1,
    # whose input (the image) needs none; the weight gradient likewise for every conv where groups=1
    # (for grouped convs torch's formula, which the ops follow, counts groups x that).
    conv = [l.flops for l in b.layers if l.kind == "conv"]
    assert bwd_ops[torch.ops.fastalex.conv2d_input_grad] == sum(conv[1:])
    if variant != "paper":
        assert bwd_ops[torch.ops.fastalex.conv2d_weight_grad] == sum(conv)


@pytest.mark.parametrize("x_shape, w_shape, kwargs", [
    ((2, 4, 23, 17), (6, 2, 5, 3), dict(stride=4, padding=(2, 1), groups=2)),  # conv1-like stride, grouped
    ((1, 3, 11, 14), (5, 3, 3, 4), dict(stride=(1, 2), padding=1, dilation=(2, 1))),
    ((2, 6, 9, 10), (4, 3, 3, 3), dict(padding="same", groups=2, activation="relu")),
])
@pytest.mark.parametrize("input_grad", [True, False])
def test_flop_counter_one_conv_as_torch(x_shape, w_shape, kwargs, input_grad):
    x = torch.randn(x_shape, requires_grad=input_grad)
    w = torch.randn(w_shape, requires_grad=True)
    bias = torch.randn(w_shape[0], requires_grad=True)
    counted = {}
    for name in ("torch", "triton"):
        with fastalex.backend(name):
            fwd, fwd_ops, y = _count(lambda: F.conv2d(x, w, bias, **kwargs))
            bwd, bwd_ops, _ = _count(lambda: y.backward(torch.randn_like(y)))
        counted[name] = fwd, bwd, y.shape
    assert set(fwd_ops) == {torch.ops.fastalex.conv2d}
    assert (torch.ops.fastalex.conv2d_input_grad in bwd_ops) == input_grad
    assert counted["triton"] == counted["torch"]
    # Against the textbook formula, and against torch's own op called directly.
    N, C_out, OH, OW = y.shape
    assert fwd == 2 * N * C_out * OH * OW * w_shape[1] * w_shape[2] * w_shape[3]
    torch_kwargs = {k: v for k, v in kwargs.items() if k != "activation"}
    assert fwd == _count(lambda: torch.nn.functional.conv2d(x, w, bias, **torch_kwargs))[0]


@pytest.mark.parametrize("first", ["fastalex", "torch.utils.flop_counter"])
def test_formulas_registered_in_either_import_order(first):
    # torch.utils.flop_counter imports triton, which `import fastalex` must not: the formulas are
    # registered when it is imported, before or after fastalex.
    code = f"""
import sys, torch
import {first}
print("triton" in sys.modules)
import fastalex, torch.utils.flop_counter as fc
from fastalex.ops import _flops
ops = (torch.ops.fastalex.conv2d, torch.ops.fastalex.conv2d_input_grad, torch.ops.fastalex.conv2d_weight_grad)
print(all(op in fc.flop_registry for op in ops), any(isinstance(f, _flops._AfterImport) for f in sys.meta_path))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(first != "fastalex"), "True", "False"]
