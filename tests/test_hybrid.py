"""HybridAlexNet (Krizhevsky's "one weird trick"): data-parallel convs, model-parallel FC layers.

Every multi-process test starts 2 or 3 CPU processes joined by gloo over loopback; the ranks write
their results with torch.save and the parent asserts. Nothing waits without a bound: the process
group times out after 60 s and the parent kills the ranks after TIMEOUT seconds.
"""

import math
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

import fastalex
from fastalex.hybrid import HybridAlexNet, bytes_per_step, split_sizes

TIMEOUT = 120  # seconds for a whole multi-process test (each takes a few seconds)
LR, MOMENTUM, WD = 0.01, 0.9, 5e-4


def _net(num_classes=10, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return fastalex.AlexNet(num_classes=num_classes, variant="single", image_size=67, dropout=dropout, init="kaiming")


def _batches(steps, n, num_classes):
    """The global batches (n images, labels) of each step, the same in every process."""
    g = torch.Generator().manual_seed(1234)
    return [(torch.randn(n, 3, 67, 67, generator=g), torch.randint(0, num_classes, (n,), generator=g))
            for _ in range(steps)]


def _sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_group(rank, world, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))


def _spawn(fn, world, *args, meanwhile=lambda: None):
    """Run fn(rank, world, port, *args) in `world` fresh processes; fail (never hang) after TIMEOUT s.
    Returns meanwhile(), run here while the ranks work.

    The processes come from multiprocessing's fork server (a clean process that imported torch and
    this module once, before any thread or op ran; every rank is forked from it): importing torch
    costs seconds of a small CPU, spawning would pay it in every rank of every test."""
    mp.set_forkserver_preload(["torch", "fastalex", "fastalex.hybrid", __name__])
    ctx = mp.start_processes(fn, args=(world, _free_port(), *args), nprocs=world, join=False,
                             start_method="forkserver")
    deadline = time.monotonic() + TIMEOUT
    try:
        result = meanwhile()
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world} ranks did not finish within {TIMEOUT}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    return result


# -- per-rank bodies (module level, so that they pickle into the ranks) ---------------------------


def _rank_train(rank, world, port, out, num_classes, steps, batch):
    _join_group(rank, world, port)
    try:
        with fastalex.backend("torch"):
            model = _net(num_classes)
            names = [n for n, _ in model.named_parameters()]
            hybrid = HybridAlexNet(model)
            opt = _sgd(hybrid.parameters())
            losses = []
            for x, y in _batches(steps, world * batch, num_classes):
                rows = slice(rank * batch, (rank + 1) * batch)
                loss = F.cross_entropy(hybrid(x[rows]), y[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                hybrid.finish_gradients()
                opt.step()
                losses.append(loss.item())
            res = {"names": [n for n, _ in hybrid.named_parameters()], "full_names": names, "losses": losses,
                   "local_shapes": {k: tuple(v.shape) for k, v in hybrid.state_dict().items()},
                   "replicated": {k: v for k, v in hybrid.state_dict().items() if k.startswith("features.")}}
            state, opt_state = hybrid.full_state_dict(), hybrid.gather_optimizer_state(opt)  # collective
            if rank == 0:  # the same on every rank by construction: one copy is enough
                res.update(state=state, optimizer=opt_state)
            torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _rank_roundtrip(rank, world, port, out):
    _join_group(rank, world, port)
    try:
        with fastalex.backend("torch"):
            hybrid = HybridAlexNet(_net(10, dropout=0.5))
            torch.manual_seed(100 + rank)  # each rank its own dropout stream
            opt = _sgd(hybrid.parameters())
            batch, losses = 2, []
            data = _batches(3, world * batch, 10)
            for x, y in data[:2]:
                rows = slice(rank * batch, (rank + 1) * batch)
                loss = F.cross_entropy(hybrid(x[rows]), y[rows])
                opt.zero_grad()
                loss.backward()
                hybrid.finish_gradients()
                opt.step()
                losses.append(loss.item())
            res = {"losses": losses}

            # A non-finite FC gradient on one rank makes every rank's FC gradients NaN (a GradScaler then
            # skips the step everywhere); the conv gradients stay as they are.
            x, y = data[2]
            rows = slice(rank * batch, (rank + 1) * batch)
            opt.zero_grad()
            F.cross_entropy(hybrid(x[rows]), y[rows]).backward()
            if rank == 1:
                hybrid.classifier.fc8.weight.grad[0, 0] = float("inf")
            hybrid.finish_gradients()
            res["fc_grads_nan"] = all(p.grad.isnan().all().item() for n, p in hybrid.named_parameters()
                                      if n.startswith("classifier."))
            res["conv_grads_finite"] = all(p.grad.isfinite().all().item() for n, p in hybrid.named_parameters()
                                           if n.startswith("features."))
            opt.zero_grad()

            local_before = {k: v.clone() for k, v in hybrid.state_dict().items()}
            full = hybrid.full_state_dict()
            hybrid.load_full_state_dict(full)
            res["same_local"] = all(torch.equal(v, local_before[k]) for k, v in hybrid.state_dict().items())
            res["same_full"] = all(torch.equal(v, full[k]) for k, v in hybrid.full_state_dict().items())
            other = _net(10, dropout=0.5, seed=7).state_dict()  # a different net's weights come in whole
            hybrid.load_full_state_dict(other)
            res["loads_other"] = all(torch.equal(v, other[k]) for k, v in hybrid.full_state_dict().items())
            hybrid.load_full_state_dict(full)
            res["full_shapes"] = {k: tuple(v.shape) for k, v in full.items()}

            full_opt = hybrid.gather_optimizer_state(opt)
            opt2 = _sgd(hybrid.parameters())
            hybrid.load_optimizer_state(opt2, full_opt)
            a, b = opt.state_dict(), opt2.state_dict()
            res["opt_same_local"] = a["state"].keys() == b["state"].keys() and all(
                torch.equal(a["state"][i]["momentum_buffer"], b["state"][i]["momentum_buffer"]) for i in a["state"])
            again = hybrid.gather_optimizer_state(opt2)
            res["opt_same_full"] = all(torch.equal(full_opt["state"][i]["momentum_buffer"],
                                                   again["state"][i]["momentum_buffer"]) for i in full_opt["state"])
            res["opt_full_shapes"] = {i: tuple(s["momentum_buffer"].shape) for i, s in full_opt["state"].items()}

            x, _ = data[2]
            rows = slice(rank * batch, (rank + 1) * batch)
            net = hybrid.full_model().eval()
            hybrid.eval()
            with torch.no_grad():
                res["hybrid_logits"] = hybrid(x[rows])
                res["full_logits"] = net(x)[rows]
            res["full_model_keys"] = list(net.state_dict())
            torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# -- tests ---------------------------------------------------------------------------------------


def _single_process(num_classes, steps, n):
    """The reference: the full net trained on the global batches in one process."""
    with fastalex.backend("torch"):
        model = _net(num_classes)
        opt = _sgd(model.parameters())
        losses = []
        for x, y in _batches(steps, n, num_classes):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return model.state_dict(), opt.state_dict(), losses


def _assert_rel_close(got, want, what):
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= 1e-5 * max(scale, 1e-12), f"{what}: max error {err:.3g} against max |value| {scale:.3g}"


@pytest.mark.parametrize("world, num_classes, steps, batch", [(2, 10, 3, 3), (3, 10, 2, 2)])
def test_hybrid_training_equals_single_process(tmp_path, world, num_classes, steps, batch):
    want_state, want_opt, want_losses = _spawn(_rank_train, world, str(tmp_path), num_classes, steps, batch,
                                               meanwhile=lambda: _single_process(num_classes, steps, world * batch))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    r0 = ranks[0]
    assert r0["names"] == r0["full_names"]  # the optimizer sees the full model's parameter order
    fc8 = split_sizes(num_classes, world)
    for r, res in enumerate(ranks):
        assert res["local_shapes"]["classifier.fc6.weight"] == (split_sizes(4096, world)[r], 256)
        assert res["local_shapes"]["classifier.fc8.bias"] == (fc8[r],)
        for k, v in res["replicated"].items():  # the conv replicas stay identical
            assert torch.equal(v, r0["replicated"][k]), f"rank {r} differs from rank 0 in {k}"
    assert list(r0["state"]) == list(want_state)
    for k, want in want_state.items():
        assert r0["state"][k].shape == want.shape, k
        _assert_rel_close(r0["state"][k], want, k)
    assert r0["optimizer"]["param_groups"][0]["params"] == want_opt["param_groups"][0]["params"]
    assert r0["optimizer"]["state"].keys() == want_opt["state"].keys()
    for i, s in want_opt["state"].items():
        _assert_rel_close(r0["optimizer"]["state"][i]["momentum_buffer"], s["momentum_buffer"], f"momentum {i}")
    # the global loss is the mean of the ranks' losses
    for step, want in enumerate(want_losses):
        assert math.isclose(sum(res["losses"][step] for res in ranks) / world, want, rel_tol=1e-5)


def test_dropout_state_roundtrips_and_full_model(tmp_path):
    world = 2
    want = _spawn(_rank_roundtrip, world, str(tmp_path), meanwhile=lambda: _net(10, dropout=0.5).state_dict())
    for r in range(world):
        res = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert all(math.isfinite(v) for v in res["losses"])
        assert res["fc_grads_nan"] and res["conv_grads_finite"]
        assert res["same_local"] and res["same_full"] and res["loads_other"]
        assert res["full_shapes"] == {k: tuple(v.shape) for k, v in want.items()}
        assert res["opt_same_local"] and res["opt_same_full"]
        shapes = [tuple(p.shape) for p in want.values()]  # every parameter is in the state dict, in order
        assert res["opt_full_shapes"] == dict(enumerate(shapes))
        assert res["full_model_keys"] == list(want)
        torch.testing.assert_close(res["hybrid_logits"], res["full_logits"], rtol=1e-5, atol=1e-5)


def test_bytes_per_step_by_hand():
    model = _net(10)  # single at 67: F = 256 * 1 * 1; fc 4096, 4096, 10
    conv = (96 * 3 * 121 + 96) + (256 * 96 * 25 + 256) + (384 * 256 * 9 + 384) + (384 * 384 * 9 + 384) + \
        (256 * 384 * 9 + 256)
    fc = (256 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == conv + fc
    got = bytes_per_step(model, batch_per_rank=2, world=3, dtype_bytes=4)
    want = {"features_forward": 2 * 2 * 256 * 4, "features_backward": 2 * 2 * 256 * 4,
            "fc6_forward": 2 * 6 * 1366 * 4, "fc6_backward": 2 * 6 * 1366 * 4,      # ceil(4096 / 3) = 1366
            "fc7_forward": 2 * 6 * 1366 * 4, "fc7_backward": 2 * 6 * 1366 * 4,
            "fc8_forward": 2 * 6 * 4 * 4, "fc8_backward": 2 * 6 * 4 * 4,            # ceil(10 / 3) = 4
            "conv_allreduce": 2 * 2 * 1249067 * 4}                                  # ceil(3747200 / 3)
    assert conv == 3747200
    want["total"] = sum(want.values())
    want["ddp_allreduce"] = 2 * 2 * math.ceil((conv + fc) / 3) * 4
    assert got == want
    one = bytes_per_step(model, batch_per_rank=2, world=1)
    assert all(v == 0 for v in one.values())  # one process exchanges nothing
    with pytest.raises(ValueError, match="world"):
        bytes_per_step(model, 2, 0)


def test_errors_without_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        HybridAlexNet(_net(10))
    with pytest.raises(ValueError, match="towers"):
        HybridAlexNet(fastalex.AlexNet(num_classes=10, variant="paper", image_size=67, devices=("cpu", "cpu")))
    with pytest.raises(TypeError, match="fastalex.AlexNet"):
        HybridAlexNet(torch.nn.Linear(2, 2))
    assert split_sizes(10, 3) == [4, 3, 3] and split_sizes(4096, 2) == [2048, 2048]
