"""Arguments are checked once: the public ops raise clear errors naming the argument before any launch,
the launchers (kernels/) only assert and never import the ops layer, and the shape rules have one home
(fastalex.kernels._geometry)."""

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest
import torch

import fastalex
import fastalex.functional as F
from fastalex.kernels import _geometry
from fastalex.ops import _checks

ROOT = Path(__file__).resolve().parents[1]
KERNELS = sorted((ROOT / "kernels").glob("*.py"))
LAUNCHERS = {
    "conv2d": ("conv2d_forward", "conv2d_input_grad", "conv2d_weight_grad"),
    "lrn": ("lrn_forward", "lrn_backward"),
    "maxpool2d": ("maxpool2d_forward", "maxpool2d_backward"),
    "lrn_maxpool2d": ("lrn_maxpool2d_forward", "lrn_maxpool2d_backward"),
}


def _x(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, device=device).to(dtype)


def _conv(**over):
    args = dict(input=_x(2, 4, 8, 8), weight=_x(6, 2, 3, 3), bias=_x(6), groups=2)
    return {**args, **over}


def _lrn(**over):
    return {**dict(input=_x(2, 6, 5, 5), size=3), **over}


def _pool(**over):
    return {**dict(input=_x(2, 3, 7, 7), kernel_size=3, stride=2), **over}


def _lrn_pool(**over):
    return {**dict(input=_x(2, 6, 9, 9), size=5, kernel_size=3, stride=2, groups=2), **over}


# (op, arguments, exception, the argument the message must name)
BAD = [
    # wrong dtype
    (F.conv2d, _conv(input=_x(2, 4, 8, 8, dtype=torch.int32)), TypeError, "input"),
    (F.conv2d, _conv(weight=_x(6, 2, 3, 3, dtype=torch.float64)), TypeError, "weight"),
    (F.conv2d_relu, _conv(bias=_x(6, dtype=torch.float16)), TypeError, "bias"),
    (F.local_response_norm, _lrn(input=_x(2, 6, 5, 5, dtype=torch.int64)), TypeError, "input"),
    (F.max_pool2d, _pool(input=_x(2, 3, 7, 7, dtype=torch.bool)), TypeError, "input"),
    (F.lrn_max_pool2d, _lrn_pool(input=_x(2, 6, 9, 9, dtype=torch.complex64)), TypeError, "input"),
    # wrong rank
    (F.conv2d, _conv(input=_x(4, 8)), ValueError, "input"),
    (F.conv2d, _conv(weight=_x(6, 2, 3)), ValueError, "weight"),
    (F.conv2d, _conv(bias=_x(6, 1)), ValueError, "bias"),
    (F.local_response_norm, _lrn(input=_x(2, 6)), ValueError, "input"),
    (F.max_pool2d, _pool(input=_x(1, 2, 3, 7, 7)), ValueError, "input"),
    (F.lrn_max_pool2d, _lrn_pool(input=_x(6, 9, 9)), ValueError, "input"),
    # bad kernel, stride, padding, dilation, groups, size
    (F.conv2d, _conv(stride=0), ValueError, "stride"),
    (F.conv2d, _conv(stride=(1, 2, 3)), TypeError, "stride"),
    (F.conv2d, _conv(padding=-1), ValueError, "padding"),
    (F.conv2d, _conv(dilation=1.5), TypeError, "dilation"),
    (F.conv2d, _conv(groups=0), ValueError, "groups"),
    (F.conv2d, _conv(groups=3), ValueError, "groups"),
    (F.conv2d, _conv(weight=_x(6, 2, 9, 9)), ValueError, "kernel"),
    (F.local_response_norm, _lrn(size=0), ValueError, "size"),
    (F.local_response_norm, _lrn(groups=4), ValueError, "groups"),
    (F.local_response_norm, _lrn(alpha="big"), TypeError, "alpha"),
    (F.max_pool2d, _pool(kernel_size=0), ValueError, "kernel_size"),
    (F.max_pool2d, _pool(kernel_size=(3, 3, 3)), ValueError, "kernel_size"),
    (F.max_pool2d, _pool(stride=1.0), TypeError, "stride"),
    (F.max_pool2d, _pool(padding=2), ValueError, "padding"),
    (F.max_pool2d, _pool(dilation=0), ValueError, "dilation"),
    (F.lrn_max_pool2d, _lrn_pool(kernel_size=10), ValueError, "kernel_size"),
    (F.lrn_max_pool2d, _lrn_pool(stride=(0, 2)), ValueError, "stride"),
    (F.lrn_max_pool2d, _lrn_pool(groups=4), ValueError, "groups"),
    (F.lrn_max_pool2d, _lrn_pool(size=True), TypeError, "size"),
    # mismatched devices ("meta": a second device on any machine)
    (F.conv2d, _conv(weight=_x(6, 2, 3, 3, device="meta")), ValueError, "weight"),
    (F.conv2d, _conv(bias=_x(6, device="meta")), ValueError, "bias"),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("op, args, exc, name", BAD, ids=[f"{b[0].__name__}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_ops_reject_bad_arguments_before_any_launch(op, args, exc, name, backend, monkeypatch):
    """Each public op raises TypeError/ValueError naming the bad argument, on either backend, and no
    launcher (hence no kernel) is reached: the launchers have nothing left to check."""
    import importlib

    for module, names in LAUNCHERS.items():
        mod = importlib.import_module(f"fastalex.kernels.{module}")
        for launcher in names:
            monkeypatch.setattr(mod, launcher, lambda *a, **k: pytest.fail("a launcher was called for bad input"))
    with fastalex.backend(backend), pytest.raises(exc) as err:
        op(**args)
    assert re.search(rf"\b{name}\b", str(err.value)), f"{err.value!r} does not name {name!r}"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    return names


def test_kernels_do_not_import_the_pytorch_layer():
    """kernels/ sits below fastalex's PyTorch layer: it imports only fastalex.kernels among fastalex's
    modules, and _geometry (which the ops import) no triton at all."""
    assert {p.name for p in KERNELS} >= {"_common.py", "_geometry.py", "conv2d.py", "lrn.py", "maxpool2d.py"}
    for path in KERNELS:
        up = sorted(n for n in _imports(path) if n.startswith("fastalex") and not n.startswith("fastalex.kernels"))
        assert not up, f"kernels/{path.name} imports {up}"
    assert not {n for n in _imports(ROOT / "kernels" / "_geometry.py") if n.split(".")[0] in ("triton", "fastalex")}


def test_launchers_only_assert():
    """The launchers raise nothing a user's argument could cause (the ops check those): only the
    kernels' int32 limit (NotImplementedError, in _common.check_int32) and the tuning config's own
    checks (conv2d's config=, which the ops never pass)."""
    allowed = {("_common.py", "check_int32"): {"NotImplementedError"},
               ("conv2d.py", "_pick"): {"ValueError"}, ("conv2d.py", "check_config"): {"ValueError"}}
    for path in KERNELS:
        if path.name == "_geometry.py":  # the shared rules, raising for the ops (pair)
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Raise):
                    exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                    assert exc.id in allowed.get((path.name, fn.name), set()), \
                        f"kernels/{path.name}:{node.lineno} ({fn.name}) raises {exc.id}"


def _code(path: Path) -> str:
    """A file's code without its strings and comments (docstrings may state a formula)."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return " ".join(t.string for t in tokens if t.type not in (tokenize.STRING, tokenize.COMMENT))


def test_output_size_formula_written_once():
    """floor((size + 2p - d(k-1) - 1) / s) + 1 is written in _geometry.output_length only: everything else
    calls it (the ops, their fake implementations, the launchers, the model, perf)."""
    formula = re.compile(r"\)\s*//\s*[A-Za-z_][\w.\[\]]*\s*\+\s*1\b")
    files = [p for d in ("fastalex", "kernels", "perf", "tests") for p in (ROOT / d).rglob("*.py")]
    found = sorted(str(p.relative_to(ROOT)) for p in files if formula.search(_code(p)))
    assert found == ["kernels/_geometry.py"]


def test_shared_helpers_have_one_definition():
    """fastalex.ops._checks re-exports the shared rules (the model, FLOP counting and perf import them
    from there): the same objects, not copies."""
    for name in ("FLOAT_DTYPES", "pair", "output_length", "output_size", "argmax_dtype"):
        assert getattr(_checks, name) is getattr(_geometry, name), name
    from fastalex.kernels import _common, lrn_maxpool2d, maxpool2d

    assert _common.FLOAT_DTYPES is _geometry.FLOAT_DTYPES
    assert maxpool2d.output_size is lrn_maxpool2d.output_size is _geometry.output_size


@pytest.mark.parametrize("value, want", [(3, (3, 3)), ((2, 5), (2, 5)), ([4], (4, 4)), (torch.Size([1, 2]), (1, 2))])
def test_pair(value, want):
    assert _geometry.pair(value, "stride", minimum=1) == want


@pytest.mark.parametrize("value, exc", [(0, ValueError), ((1, -1), ValueError), ((1, 2, 3), TypeError), ((), TypeError),
                                        (True, TypeError), (1.0, TypeError), ("2", TypeError), ((1, None), TypeError)])
def test_pair_rejects(value, exc):
    with pytest.raises(exc, match="stride"):
        _geometry.pair(value, "stride", minimum=1)


def test_output_size_matches_torch_conv():
    for size, k, s, p, d in [(227, 11, 4, 0, 1), (27, 5, 1, 2, 1), (13, 3, 1, 1, 1), (9, 3, 2, 1, 2), (5, 5, 3, 0, 1)]:
        want = torch.nn.functional.conv2d(torch.zeros(1, 1, size, size), torch.zeros(1, 1, k, k), None, s, p, d).shape
        assert _geometry.output_size(size, size, (k, k), (s, s), (p, p), (d, d)) == tuple(want[-2:])


def test_host_integer_helpers_match_triton():
    """The launchers' cdiv and next_pow2 (plain integers: triton's are constexpr functions, slow on the
    host) agree with triton's."""
    import triton

    from fastalex.kernels import _common

    for a in range(0, 300, 7):
        for b in (1, 2, 3, 16, 64, 127, 128):
            assert _common.cdiv(a, b) == triton.cdiv(a, b), (a, b)
    for n in list(range(0, 70)) + [255, 256, 257, 4095, 4096, 4097]:
        assert _common.next_pow2(n) == triton.next_power_of_2(max(n, 1)), n


def test_launchers_call_no_triton_host_helpers():
    """triton.cdiv and triton.next_power_of_2 cost ~2 us a call on the host; the launchers use _common's."""
    found = [str(p.relative_to(ROOT)) for p in KERNELS
             if re.search(r"\btriton\s*\.\s*(cdiv|next_power_of_2)\s*\(", _code(p))]
    assert found == []
