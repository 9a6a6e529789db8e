"""The fused ops under torch.compile (no graph breaks, backward included) and torch.export."""

import pytest
import torch

import fastalex
import fastalex.nn as fnn
from reference import assert_close


class Tiny(torch.nn.Module):
    """AlexNet's first two stages in miniature: conv+ReLU, LRN, overlapping pool, grouped conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = fnn.Conv2d(3, 8, 5, stride=2, activation="relu")
        self.lrn = fnn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
        self.pool = fnn.MaxPool2d(3, 2)
        self.conv2 = fnn.Conv2d(8, 8, 3, padding=1, groups=2, activation="relu")

    def forward(self, x):
        return self.conv2(self.pool(self.lrn(self.conv1(x))))


def _eager_and_grads(model, x):
    y = model(x)
    y.backward(torch.ones_like(y))
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compile_fullgraph_matches_eager(device, backend):
    torch._dynamo.reset()  # the backend choice is fixed in a compiled graph
    model = Tiny().to(device)
    x = torch.randn(2, 3, 19, 19, device=device)
    with fastalex.backend(backend):
        y_ref, g_ref = _eager_and_grads(model, x)
        compiled = torch.compile(model, fullgraph=True)
        y, grads = _eager_and_grads(compiled, x)
    assert_close(y, y_ref.double(), torch.float32, device, "compiled output")
    for g, r in zip(grads, g_ref):
        assert_close(g, r.double(), torch.float32, device, "compiled gradient")


def test_compiled_graph_calls_fastalex_ops(device):
    torch._dynamo.reset()
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    model = Tiny().to(device)
    with fastalex.backend("triton"):
        torch.compile(model, backend=backend, fullgraph=True)(torch.randn(1, 3, 19, 19, device=device))
    for op in ("fastalex.conv2d", "fastalex.local_response_norm", "fastalex.max_pool2d"):
        assert any(op in s for s in seen), f"{op} missing from the compiled graph: {seen}"


def test_export(device):
    model = Tiny().to(device).eval()
    x = torch.randn(2, 3, 19, 19, device=device)
    with fastalex.backend("triton"):
        ep = torch.export.export(model, (x,))
        targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
        assert any("fastalex.conv2d" in t for t in targets), targets
        y = ep.module()(x)
        ref = model(x)
    assert_close(y, ref.double(), torch.float32, device, "exported output")
