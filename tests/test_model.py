"""fastalex.AlexNet: the three variants' shapes and parameters, the paper's init, two-device towers,
torchvision state_dict compatibility, and a whole forward/backward through the Triton kernels."""

import pytest
import torch
import torch.nn.functional as TF

import fastalex
from fastalex import AlexNet
from reference import assert_close


def _conv(c_in, c_out, k, groups=1):
    return c_out * (c_in // groups) * k * k + c_out


def _fc(n_in, n_out):
    return n_in * n_out + n_out


# Parameter counts from the layer tables in ALEXNET.md, by hand.
HAND_PARAMS = {
    "paper": _conv(3, 96, 11) + _conv(96, 256, 5, 2) + _conv(256, 384, 3) + _conv(384, 384, 3, 2)
    + _conv(384, 256, 3, 2) + _fc(9216, 4096) + _fc(4096, 4096) + _fc(4096, 1000),
    "single": _conv(3, 96, 11) + _conv(96, 256, 5) + _conv(256, 384, 3) + _conv(384, 384, 3) + _conv(384, 256, 3)
    + _fc(9216, 4096) + _fc(4096, 4096) + _fc(4096, 1000),
    "torchvision": _conv(3, 64, 11) + _conv(64, 192, 5) + _conv(192, 384, 3) + _conv(384, 256, 3)
    + _conv(256, 256, 3) + _fc(9216, 4096) + _fc(4096, 4096) + _fc(4096, 1000),
}
TORCHVISION_SHAPES = {
    "features.0.weight": (64, 3, 11, 11), "features.0.bias": (64,), "features.3.weight": (192, 64, 5, 5),
    "features.3.bias": (192,), "features.6.weight": (384, 192, 3, 3), "features.6.bias": (384,),
    "features.8.weight": (256, 384, 3, 3), "features.8.bias": (256,), "features.10.weight": (256, 256, 3, 3),
    "features.10.bias": (256,), "classifier.1.weight": (4096, 9216), "classifier.1.bias": (4096,),
    "classifier.4.weight": (4096, 4096), "classifier.4.bias": (4096,), "classifier.6.weight": (1000, 4096),
    "classifier.6.bias": (1000,),
}


@pytest.mark.parametrize("variant", ["paper", "single", "torchvision"])
def test_parameter_counts(variant):
    n = sum(p.numel() for p in AlexNet(variant=variant).parameters())
    assert n == HAND_PARAMS[variant]
    assert n == {"paper": 60_965_224, "single": 62_378_344, "torchvision": 61_100_840}[variant]


@pytest.mark.parametrize("variant,size", [("paper", 227), ("single", 227), ("torchvision", 224)])
def test_output_shape_torch_backend(variant, size):
    with fastalex.backend("torch"):
        y = AlexNet(num_classes=10, variant=variant).eval()(torch.randn(2, 3, size, size))
    assert y.shape == (2, 10)


def test_paper_initialisation():
    torch.manual_seed(0)
    model = AlexNet(variant="single")
    sd = model.state_dict()
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        key = f"features.{name}" if name.startswith("conv") else f"classifier.{name}"
        w, b = sd[f"{key}.weight"], sd[f"{key}.bias"]
        assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.01) < 1e-3, name
        expect = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.equal(b, torch.full_like(b, expect)), name
    # torch's default init differs visibly (kaiming-uniform: conv1's std is about 0.017)
    tv = AlexNet(variant="torchvision").state_dict()["features.0.weight"]
    assert abs(tv.std().item() - 0.01) > 2e-3


def test_torchvision_state_dict_and_outputs():
    """A torchvision-layout state_dict (names, shapes) loads strictly; outputs equal torchvision's net."""
    model = AlexNet(variant="torchvision").eval()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == TORCHVISION_SHAPES
    sd = {k: torch.randn(shape) * (0.05 if len(shape) > 1 else 0.1) for k, shape in TORCHVISION_SHAPES.items()}
    model.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 224, 224)

    def torchvision_alexnet(x):  # torchvision.models.alexnet's forward, written out
        h = TF.max_pool2d(TF.relu(TF.conv2d(x, sd["features.0.weight"], sd["features.0.bias"], 4, 2)), 3, 2)
        h = TF.max_pool2d(TF.relu(TF.conv2d(h, sd["features.3.weight"], sd["features.3.bias"], padding=2)), 3, 2)
        h = TF.relu(TF.conv2d(h, sd["features.6.weight"], sd["features.6.bias"], padding=1))
        h = TF.relu(TF.conv2d(h, sd["features.8.weight"], sd["features.8.bias"], padding=1))
        h = TF.max_pool2d(TF.relu(TF.conv2d(h, sd["features.10.weight"], sd["features.10.bias"], padding=1)), 3, 2)
        h = torch.flatten(TF.adaptive_avg_pool2d(h, 6), 1)
        h = TF.relu(TF.linear(h, sd["classifier.1.weight"], sd["classifier.1.bias"]))
        h = TF.relu(TF.linear(h, sd["classifier.4.weight"], sd["classifier.4.bias"]))
        return TF.linear(h, sd["classifier.6.weight"], sd["classifier.6.bias"])

    with fastalex.backend("torch"), torch.no_grad():
        assert torch.allclose(model(x), torchvision_alexnet(x), rtol=1e-5, atol=1e-5)


def _grads_by_grouped_name(model):
    """Gradients keyed like the single-device state_dict (towers' halves concatenated)."""
    if model.devices is None:
        return {k: p.grad for k, p in model.named_parameters()}
    out = {}
    for k, p in model.towers[0].named_parameters():
        layer, kind = k.split(".")[-2:]
        grouped = f"features.{layer}.{kind}" if layer.startswith("conv") else f"classifier.{layer}.{kind}"
        other = model.towers[1].get_parameter(k).grad
        out[grouped] = torch.cat([p.grad, other.to(p.device)])
    return out


def test_towers_equal_grouped_model_forward_and_backward():
    torch.manual_seed(1)
    towers = AlexNet(num_classes=11, variant="paper", dropout=0.0, image_size=67, devices=("cpu", "cpu"),
                     init="torch")
    grouped = AlexNet(num_classes=11, variant="paper", dropout=0.0, image_size=67)
    grouped.load_state_dict(towers.state_dict())
    assert towers.state_dict().keys() == grouped.state_dict().keys()
    x = torch.randn(3, 3, 67, 67)
    with fastalex.backend("torch"):
        yt, yg = towers(x), grouped(x)
        assert yt.shape == (3, 11)
        torch.testing.assert_close(yt, yg, rtol=1e-5, atol=1e-6)
        dy = torch.randn_like(yt)
        yt.backward(dy)
        yg.backward(dy)
    gt, gg = _grads_by_grouped_name(towers), _grads_by_grouped_name(grouped)
    assert gt.keys() == gg.keys()
    for k in gg:
        torch.testing.assert_close(gt[k], gg[k], rtol=1e-4, atol=1e-6, msg=k)
    # and back: the grouped state_dict loads into the towers
    towers2 = AlexNet(num_classes=11, variant="paper", image_size=67, devices=("cpu", "cpu"))
    towers2.load_state_dict(grouped.state_dict())
    for k, v in towers2.state_dict().items():
        assert torch.equal(v, grouped.state_dict()[k]), k


def test_towers_reject_mismatched_state_dict():
    towers = AlexNet(num_classes=10, variant="paper", image_size=67, devices=("cpu", "cpu"))
    sd = AlexNet(num_classes=12, variant="paper", image_size=67).state_dict()
    with pytest.raises(RuntimeError, match="classifier.fc8"):
        towers.load_state_dict(sd)


@pytest.mark.slow
def test_whole_model_through_kernels_matches_torch():
    """Forward and backward of the paper net at its smallest input, Triton kernels vs torch's ops."""
    torch.manual_seed(2)
    model = AlexNet(num_classes=10, variant="paper", dropout=0.0, image_size=67, init="torch")
    x = torch.randn(2, 3, 67, 67)
    outs, grads = {}, {}
    for backend in ("torch", "triton"):
        model.zero_grad(set_to_none=True)
        with fastalex.backend(backend):
            y = model(x)
            y.backward(torch.ones_like(y))
        outs[backend] = y.detach()
        grads[backend] = {k: p.grad.clone() for k, p in model.named_parameters()}
    device = "cpu"
    assert_close(outs["triton"], outs["torch"].double(), torch.float32, device, "logits")
    for k, g in grads["torch"].items():
        assert_close(grads["triton"][k], g.double(), torch.float32, device, f"grad {k}")


def test_bf16_autocast_forward_backward_both_backends():
    """Mixed precision (fp32 weights, bf16 activations) runs through both backends, with output and
    gradients as close to the fp32 result as torch's own bf16 run is (bf16 is far from fp32 here:
    ~20% on conv1's gradient at batch 2)."""
    torch.manual_seed(3)
    model = AlexNet(num_classes=10, variant="paper", dropout=0.0, image_size=67, init="torch")
    x = torch.randn(2, 3, 67, 67)
    res = {}
    for backend, bf16 in (("torch", False), ("torch", True), ("triton", True)):
        model.zero_grad(set_to_none=True)
        with fastalex.backend(backend), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = model(x)
            y.float().sum().backward()
        assert y.dtype == (torch.bfloat16 if bf16 else torch.float32)
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        res[backend, bf16] = [y.detach().float()] + [p.grad.clone() for p in model.parameters()]
    names = ["logits"] + [n for n, _ in model.named_parameters()]
    for name, ref, theirs, ours in zip(names, res["torch", False], res["torch", True], res["triton", True]):
        err_torch = (theirs - ref).norm() / ref.norm().clamp_min(1e-12)
        err_ours = (ours - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err_ours <= 1.5 * err_torch + 1e-2, (name, err_ours.item(), err_torch.item())


@pytest.mark.parametrize("kwargs,msg", [
    (dict(variant="vgg"), "variant must be one of"),
    (dict(image_size=50), "at least 67x67"),
    (dict(variant="torchvision", lrn=True), "no LRN"),
    (dict(pool=(3, 3)), "pool must be"),
    (dict(activation="gelu"), "activation must be"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(num_classes=0), "num_classes"),
    (dict(variant="single", devices=("cpu", "cpu")), "needs variant='paper'"),
    (dict(devices=("cpu",)), "two devices"),
    (dict(init="xavier"), "init must be"),
])
def test_constructor_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        AlexNet(**kwargs)


def test_input_errors():
    model = AlexNet(num_classes=10, variant="single", image_size=67)
    with pytest.raises(ValueError, match="built for 67x67 inputs"):
        model(torch.randn(1, 3, 70, 70))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(3, 67, 67))
    with pytest.raises(ValueError, match="at least 63x63"):
        AlexNet(variant="torchvision")(torch.randn(1, 3, 60, 60))


def test_ablation_options_change_the_net_as_asked():
    tanh = AlexNet(variant="single", activation="tanh", lrn=False, pool=(2, 2), image_size=67)
    names = [n for n, _ in tanh.features.named_children()]
    assert "lrn1" not in names and "act1" in names
    assert isinstance(tanh.features.act1, torch.nn.Tanh) and tanh.features.conv1.activation is None
    assert tanh.features.pool1.kernel_size == 2 and tanh.features.pool1.stride == 2
    with fastalex.backend("torch"):
        assert tanh.eval()(torch.randn(1, 3, 67, 67)).shape == (1, 1000)


@pytest.mark.parametrize("pool", [(3, 2), (2, 2)])
def test_lrn_and_pool_are_one_fused_module(pool):
    """lrn1 -> pool1 and lrn2 -> pool2 are LRNMaxPool2d modules under the LRN's name: the paper's
    constants, the towers' groups, the net's pool; no parameters, so the state_dict is the unfused net's."""
    model = AlexNet(variant="paper", image_size=67, pool=pool, activation="tanh")
    for name in ("lrn1", "lrn2"):
        m = model.features.get_submodule(name)
        assert isinstance(m, fastalex.nn.LRNMaxPool2d)
        assert (m.lrn.size, m.lrn.alpha, m.lrn.beta, m.lrn.k, m.lrn.groups) == (5, 5e-4, 0.75, 2.0, 2)
        assert (m.pool.kernel_size, m.pool.stride) == pool
    assert not hasattr(model.features, "pool1") and isinstance(model.features.pool5, fastalex.nn.MaxPool2d)
    assert isinstance(model.features.act1, torch.nn.Tanh)  # conv -> tanh -> (LRN + pool)
    assert not any(k.startswith(("features.lrn", "features.pool")) for k in model.state_dict())
    towers = model.to_towers(("cpu", "cpu"))
    assert towers.towers[1].features.lrn2.lrn.groups == 1  # a tower normalises its own channels only


def test_the_model_runs_the_fused_kernel_and_equals_the_unfused_ops(monkeypatch):
    """On the Triton kernels the model calls fastalex::lrn_max_pool2d (not local_response_norm and
    max_pool2d) for lrn1/pool1 and lrn2/pool2, and gives the unfused layers' output and gradients."""
    torch.manual_seed(0)
    model = AlexNet(num_classes=5, variant="paper", image_size=67, dropout=0.0, init="kaiming", seed=3)
    x = torch.randn(2, 3, 67, 67)
    calls = []
    for op in ("lrn_max_pool2d", "local_response_norm", "max_pool2d"):
        real = getattr(torch.ops.fastalex, op)
        monkeypatch.setattr(torch.ops.fastalex, op, lambda *a, _op=op, _real=real, **k: calls.append(_op) or _real(*a, **k))
    with fastalex.backend("triton"):
        y = model(x)
        y.square().sum().backward()
    assert calls == ["lrn_max_pool2d", "lrn_max_pool2d", "max_pool2d"]  # pool5 stays a plain max-pool
    fused_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    # conv1's and conv2's ReLU runs in the fused module (relu=True), not in the conv's epilogue
    assert [model.features.lrn1.relu, model.features.lrn2.relu] == [True, True]
    assert model.features.conv1.activation is None and model.features.conv2.activation is None
    assert model.features.conv3.activation == "relu"

    def unfused(m, inp, out):  # torch's relu, then the same two layers as separate ops (fastalex's kernels)
        return m.pool(m.lrn(torch.relu(inp[0]) if m.relu else inp[0]))

    hooks = [m.register_forward_hook(unfused) for m in model.modules() if isinstance(m, fastalex.nn.LRNMaxPool2d)]
    with fastalex.backend("triton"):
        y2 = model(x)
        y2.square().sum().backward()
    for h in hooks:
        h.remove()
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-6)
    for a, p in zip(fused_grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


# -- the layer table builds every variant, the towers and perf/shapes.py ----------------------------

@pytest.mark.parametrize("variant", ["paper", "single", "torchvision"])
def test_forward_features_and_hidden_are_the_forwards_parts(variant):
    """forward = classifier(flatten(forward_features)); hidden = every classifier layer but fc8."""
    size = 67 if variant != "torchvision" else 63
    model = AlexNet(num_classes=7, variant=variant, image_size=size, dropout=0.0, init="kaiming", seed=0).eval()
    x = torch.randn(2, 3, size, size)
    with fastalex.backend("torch"), torch.no_grad():
        f = model.forward_features(x)
        assert f.shape == ((2, 256, 6, 6) if variant == "torchvision" else (2, 256, 1, 1))
        h = model.hidden(x)
        assert h.shape == (2, 4096) and (h >= 0).all()  # act7: a ReLU
        fc8 = model.classifier[-1]
        assert torch.equal(model(x), fc8(h))
        assert torch.equal(h, model.classifier[:-1](torch.flatten(f, 1)))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model.hidden(torch.randn(3, size, size))


def test_towers_forward_features_and_hidden_equal_the_grouped_nets():
    grouped = AlexNet(num_classes=5, variant="paper", image_size=67, dropout=0.0, seed=4).eval()
    towers = grouped.to_towers(("cpu", "cpu"))
    x = torch.randn(2, 3, 67, 67)
    with fastalex.backend("torch"), torch.no_grad():
        for fn in ("forward_features", "hidden", "forward"):
            torch.testing.assert_close(getattr(towers, fn)(x), getattr(grouped, fn)(x), rtol=1e-5, atol=1e-6,
                                       msg=fn)


def test_towers_hold_the_row_halves_of_the_grouped_net():
    """Each tower: half of every conv's kernels and fc's neurons (tower 0 the first rows; fc8's odd class
    to tower 0), in the grouped net's parameter order; the state_dict's keys in the grouped net's order."""
    grouped = AlexNet(num_classes=11, variant="paper", image_size=67, seed=2)
    towers = grouped.to_towers(("cpu", "cpu"))
    assert list(towers.state_dict()) == list(grouped.state_dict())
    full = grouped.state_dict()
    for t, tower in enumerate(towers.towers):
        names = [n for n, _ in tower.named_parameters()]
        assert names == list(full)
        for name, p in tower.named_parameters():
            rows = full[name].shape[0]
            first = rows - rows // 2
            want = full[name][:first] if t == 0 else full[name][first:]
            assert torch.equal(p, want), (t, name)
    assert towers.towers[0].classifier.fc8.out_features == 6 and towers.towers[1].classifier.fc8.out_features == 5


@pytest.mark.parametrize("variant,activation,lrn", [("paper", "relu", True), ("single", "tanh", False),
                                                    ("torchvision", "relu", False), ("torchvision", "tanh", False)])
def test_modules_follow_the_layer_table(variant, activation, lrn):
    """Every module is a row of the table, in the table's order, at the path `layers` names."""
    from fastalex.model import table

    model = AlexNet(variant=variant, activation=activation, lrn=lrn, image_size=67)
    rows = [layer for layer, _ in model.layers]
    order = [layer.name for layer in table(variant)]
    assert [r.name for r in rows] == [n for n in order if n in {r.name for r in rows}]
    fused = [m for m in model.modules() if isinstance(m, fastalex.nn.LRNMaxPool2d)]
    parts = {id(c) for m in fused for c in m.children()}  # an LRNMaxPool2d's lrn and pool
    modules = [m for m in model.modules() if not isinstance(m, (AlexNet, torch.nn.Sequential)) and id(m) not in parts]
    assert [model.get_submodule(p) for _, p in model.layers] == modules
    assert len(fused) == (2 if lrn else 0)  # each LRN with the pool after it: one fused module
    kinds = {"conv": torch.nn.Conv2d, "lrn": fastalex.nn.LRNMaxPool2d, "pool": torch.nn.MaxPool2d,
             "avgpool": torch.nn.AdaptiveAvgPool2d, "dropout": torch.nn.Dropout, "fc": torch.nn.Linear,
             "act": (torch.nn.ReLU, torch.nn.Tanh, torch.nn.Identity)}
    for layer, path in model.layers:
        m = model.get_submodule(path)
        assert isinstance(m, kinds[layer.kind]), path
        if layer.kind == "conv":
            assert (m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0]) == (
                layer.out, layer.kernel, layer.stride, layer.padding)
            assert m.groups == (2 if variant == "paper" and layer.grouped else 1)
        if variant != "torchvision":
            assert path.split(".")[-1] == layer.name
    assert ("lrn1" in [r.name for r in rows]) == lrn
    assert ("pool1" in [r.name for r in rows]) != lrn  # fused into lrn1: no module of its own
    conv_acts = [p for layer, p in model.layers if layer.kind == "act" and p.startswith("features.")]
    assert len(conv_acts) == (0 if activation == "relu" and variant != "torchvision" else 5)  # fused, or a module


@pytest.mark.parametrize("variant", ["single", "paper"])
def test_convs_relu_in_lrn_is_what_the_model_builds(variant):
    """perf (ConvShape.relu: tune, static) times the convs' epilogue ReLU where the model has it: not
    conv1's and conv2's, which the fused LRN + max-pool after them apply."""
    from fastalex.model import convs_relu_in_lrn

    model = AlexNet(variant=variant, num_classes=10)
    acts = {layer.name: model.get_submodule(p).activation for layer, p in model.layers if layer.kind == "conv"}
    assert convs_relu_in_lrn(variant) == {"conv1", "conv2"}
    assert acts == {n: None if n in ("conv1", "conv2") else "relu" for n in acts} and len(acts) == 5


def test_perf_shapes_come_from_the_table():
    """perf/shapes.py's layers, as written out by hand before they were read off the table."""
    from perf.shapes import CONV, LRN, LRN_ARGS, POOL, ConvShape

    assert CONV == [
        ConvShape("conv1", 3, 227, 96, 11, 4, 0, 1, relu=False),
        ConvShape("conv2", 96, 27, 256, 5, 1, 2, 1, relu=False),
        ConvShape("conv3", 256, 13, 384, 3, 1, 1, 1), ConvShape("conv4", 384, 13, 384, 3, 1, 1, 1),
        ConvShape("conv5", 384, 13, 256, 3, 1, 1, 1), ConvShape("conv2-g2", 96, 27, 256, 5, 1, 2, 2, relu=False),
        ConvShape("conv4-g2", 384, 13, 384, 3, 1, 1, 2), ConvShape("conv5-g2", 384, 13, 256, 3, 1, 1, 2)]
    assert [s.out_size for s in CONV] == [55, 27, 13, 13, 13, 27, 13, 13]
    assert LRN == [("lrn1", 96, 55), ("lrn2", 256, 27)]
    assert POOL == [("pool1", 96, 55), ("pool2", 256, 27), ("pool5", 256, 13)]
    assert LRN_ARGS == dict(size=5, alpha=5e-4, beta=0.75, k=2.0)


@pytest.mark.parametrize("variant,pool,smallest", [("paper", (3, 2), 67), ("single", (2, 2), 39),
                                                   ("torchvision", (3, 2), 63)])
def test_smallest_image_size_from_the_table(variant, pool, smallest):
    from fastalex.model import feature_size, smallest_image_size

    assert smallest_image_size(variant, pool) == smallest
    assert feature_size(variant, smallest, pool) == 1 and feature_size(variant, smallest - 1, pool) == 0
    assert feature_size(variant, 227 if variant != "torchvision" else 224) == 6
