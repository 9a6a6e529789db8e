"""fastalex.optim: torch's SGD in its fused form, against the update in float64; the form kept on resume."""

import pytest
import torch

import fastalex
from fastalex import optim

from test_trainer import Blobs, _trainer  # noqa: F401 (Blobs: the trainer tests' small problem)

LR, MOMENTUM, WD = 0.05, 0.9, 5e-4


def _fused_on_cpu() -> bool:
    return "cpu" in torch.utils._foreach_utils._get_fused_kernels_supported_devices()


def test_sgd_is_fused_where_torch_has_the_kernel():
    p = torch.nn.Parameter(torch.zeros(3))
    assert optim.sgd([p], lr=LR).param_groups[0]["fused"] is (True if _fused_on_cpu() else None)
    # No fused kernel for the meta device: torch's default form, no error.
    meta = torch.nn.Parameter(torch.empty(3, device="meta"))
    assert not optim.sgd([meta], lr=LR).param_groups[0]["fused"]


def test_sgd_equals_the_update_in_float64():
    """buf = m * buf + grad + wd * p (buf = that grad on the first step); p -= lr * buf, with an lr
    drop midway, over sizes with and without a vector tail."""
    g = torch.Generator().manual_seed(11)
    shapes = [(7,), (33, 5), (1001,), (4, 3, 5, 5), (64,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ref = [p.detach().double().clone() for p in params]
    bufs = [None] * len(params)
    opt = optim.sgd(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for step in range(12):
        lr = LR if step < 6 else LR / 10
        opt.param_groups[0]["lr"] = lr
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g) * 10.0 ** (step % 3 - 1)
            p.grad = grad
            d = grad.double() + WD * ref[i]
            bufs[i] = d if bufs[i] is None else MOMENTUM * bufs[i] + d
            ref[i] = ref[i] - lr * bufs[i]
        opt.step()
    for p, r, b in zip(params, ref, bufs):  # fp32 rounding, to the scale of each tensor
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-6, atol=2e-6 * r.abs().max().item())
        torch.testing.assert_close(opt.state[p]["momentum_buffer"].double(), b, rtol=1e-6,
                                   atol=2e-6 * b.abs().max().item())


@pytest.mark.skipif(not _fused_on_cpu(), reason="this torch has no fused SGD on the CPU")
def test_trainer_keeps_its_form_when_a_checkpoint_has_another(tmp_path):
    """torch's load_state_dict takes the saved groups' options: a checkpoint written by an unfused
    optimizer would turn the resumed run's off. The Trainer keeps its own; state and lr still load."""
    t = _trainer(tmp_path, epochs=1)
    assert t.optimizer.param_groups[0]["fused"] is True
    t.fit(Blobs(), Blobs(32, seed=1))  # noqa: F821
    state = t.state_dict()
    group = state["optimizer"]["param_groups"][0]
    group.update(fused=None, foreach=False, lr=0.0125)
    t2 = _trainer(tmp_path, epochs=2)
    t2.load_state_dict(state)
    assert t2.optimizer.param_groups[0]["fused"] is True and t2.optimizer.param_groups[0]["foreach"] is None
    assert t2.optimizer.param_groups[0]["lr"] == 0.0125
    for p, q in zip(t.model.parameters(), t2.model.parameters()):
        assert torch.equal(t2.optimizer.state[q]["momentum_buffer"], t.optimizer.state[p]["momentum_buffer"])


def test_optim_is_public():
    assert fastalex.optim.sgd is optim.sgd and "optim" in fastalex.__all__
