"""Static performance model of fastalex's Triton kernels on Hopper (sm_90): no GPU needed.

    python -m perf.static [--batch 128] [--dtype fp32,bf16] [--nets single,paper] [--layouts nhwc,nchw]
                          [--kinds conv-fwd,conv-dgrad,conv-wgrad,lrn_pool-fwd,lrn_pool-bwd,pool-fwd,pool-bwd]
                          [--layers conv2,lrn_pool1,...] [--limit N] [--json PATH] [--markdown PATH]

Emulates the training step of the single and paper nets (forward, input and weight gradients, the
fused LRN + max-pool of lrn1 -> pool1 and lrn2 -> pool2 and pool5's max-pool, both ways) by calling
fastalex's launchers on meta tensors with kernel launches intercepted, so every launch has the
arguments, grid and memory layouts a real step gives it (the layouts propagate: until 2026-12-03 the paper net's grouped LRN was a reshape, which turned
channels_last activations into NCHW; now it is one pass that keeps them). Each distinct launch is
compiled for sm_90 with Triton's real compiler, specialized exactly as JITFunction.run would
specialize it at that launch (specialize()), then:

  registers, spills  ptxas -v on the kernel's PTX (Triton's own ptxas for sm_90: in Triton 3.9 the
                     bundled `ptxas-blackwell`, CUDA 13.x; the bundled `ptxas` is CUDA 12.9 and rejects
                     Triton 3.9's PTX 9.x). Registers are cross-checked against the cubin Triton built.
  SASS               cuobjdump -sass on Triton's cubin: HGMMA/HMMA, LDGSTS (cp.async), UTMALDG/UBLKCP
                     (TMA) counts, and the innermost MMA loop (backward branches).
  model              occupancy, waves on 132 SMs, an issue-bound ceiling of the MMA loop, the bound its
                     wgmma operand reads from shared memory set ("operand") and a predicted time at
                     H100 SXM rates. See perf/NOTES.md, "The static model (perf.static)" and "... the
                     model's operand-read bound".

Predictions of a model, not measurements. Run without TRITON_INTERPRET (it compiles for a GPU).
Compiling takes 1-10 s a kernel on a small machine; Triton's cache (~/.triton/cache) makes reruns fast.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

# ----------------------------------------------------------------------------------------------
# The machine modelled: H100 SXM (the H200 has the same SMs and clocks, and 4.8 TB/s).

SMS = 132
CLOCK_HZ = 1.83e9  # the clock NVIDIA's dense tensor rates are quoted at (989.4 TFLOP/s bf16 = 132 x 4096 x 1.83e9)
REGS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024
SMEM_PER_CTA = 227 * 1024  # the most one CTA may ask for (the launch fails beyond)
SMEM_RESERVED_PER_CTA = 1024  # the CUDA runtime's per-CTA reservation on sm_80+
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
SCHEDULERS = 4  # warp schedulers per SM: one warp-instruction per clock each
DRAM_BYTES_PER_S = 3.35e12
# Dense tensor-core FMAs per clock per SM, by operand type (the SASS suffix of HGMMA/HMMA).
MMA_FMA_PER_CLK = {"TF32": 1024, "BF16": 2048, "F16": 2048, "E4M3": 4096, "E5M2": 4096}
MMA_OPERAND_BYTES = {"TF32": 4, "BF16": 2, "F16": 2, "E4M3": 1, "E5M2": 1}
# Shared-memory bytes per clock per SM that wgmma's operand reads are assumed to share (32 banks x 4 B:
# an assumption, not a published wgmma figure; it makes m64n64 at full rate read exactly this much, and
# narrower N more: the one GPU check NOTES lists for it).
SMEM_BYTES_PER_CLK = 128

KINDS = ("conv-fwd", "conv-dgrad", "conv-wgrad", "lrn_pool-fwd", "lrn_pool-bwd", "pool-fwd", "pool-bwd")
NETS = ("single", "paper")
LAYOUTS = ("nhwc", "nchw")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def require_compiler() -> None:
    """The GPU compiler path needs triton imported without the interpreter."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("perf.static compiles for a GPU: run it without TRITON_INTERPRET (env -u TRITON_INTERPRET)")


def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", 90, 32)


# ----------------------------------------------------------------------------------------------
# Intercepting launches


@dataclasses.dataclass
class Launch:
    """One intercepted `kernel[grid](*args, **kwargs)`, with where in the step it happened."""

    kernel: Any  # the JITFunction
    grid: Any  # a tuple, or a callable of the bound arguments (as Triton's launcher takes it)
    args: tuple
    kwargs: dict
    context: dict  # net, start layout, layer, op, dtype (empty outside collect())


_context: dict = {}


@contextlib.contextmanager
def _at(**ctx) -> Iterator[None]:
    """Tag the launches made inside with `ctx` (layer, op, ...), on top of the outer tags."""
    global _context
    outer = _context
    _context = {**outer, **ctx}
    try:
        yield
    finally:
        _context = outer


@contextlib.contextmanager
def intercept() -> Iterator[list[Launch]]:
    """Inside, `kernel[grid](...)` records a Launch instead of launching; yields the list."""
    from triton.runtime.jit import KernelInterface

    launches: list[Launch] = []
    original = KernelInterface.__getitem__

    def record(self, grid):
        def launch(*args, **kwargs):
            launches.append(Launch(self, grid, args, dict(kwargs), dict(_context)))

        return launch

    KernelInterface.__getitem__ = record
    try:
        yield launches
    finally:
        KernelInterface.__getitem__ = original


# ----------------------------------------------------------------------------------------------
# The JIT's specialization


@dataclasses.dataclass
class Spec:
    """What JITFunction.run hands the compiler for one launch."""

    signature: dict  # name -> "*fp32", "i32", "constexpr", ...
    constexprs: dict  # (index,) -> value: the constexpr parameters and the ints equal to 1
    attrs: dict  # (index,) -> [["tt.divisibility", 16]] for pointers/ints the JIT found 16-aligned
    options: Any  # the backend's options object (num_warps, num_stages, ...)
    bound: dict  # name -> argument value, defaults applied

    def key(self, kernel) -> tuple:
        """Identifies the compiled kernel (what Triton's cache key depends on)."""
        return (kernel.__name__, tuple(self.signature.items()),
                tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
                tuple(sorted((k, repr(v)) for k, v in self.attrs.items())),
                tuple(sorted((k, repr(v)) for k, v in vars(self.options).items())))

    def named_constexprs(self, kernel) -> dict:
        """The declared tl.constexpr parameters, by name."""
        return {kernel.arg_names[i]: _jsonable(v) for (i,), v in sorted(self.constexprs.items())
                if kernel.params[i].is_constexpr}

    def ones(self, kernel) -> list[str]:
        """The int parameters the JIT made compile-time constants (they were 1 at this launch)."""
        return [kernel.arg_names[i] for (i,) in sorted(self.constexprs) if not kernel.params[i].is_constexpr]

    def divisible(self, kernel) -> list[str]:
        """The pointer and int parameters the JIT marked tt.divisibility=16 at this launch."""
        return [kernel.arg_names[i] for (i,), a in sorted(self.attrs.items()) if ["tt.divisibility", 16] in a]


def specialize(kernel, args: tuple, kwargs: dict, target=None) -> Spec:
    """The signature, constants, attributes and options JITFunction.run would compile this launch with.

    Uses the JIT's own binder (triton.runtime.jit.create_function_from_signature with the target's
    backend), so ints equal to 1 become constants and ints divisible by 16 and 16-aligned pointers get
    tt.divisibility=16, exactly as at a real launch. Meta tensors report data_ptr() 0 (+ their offset):
    every allocation counts as 16-byte aligned, as torch's CUDA allocations are.

    Triton 3.9 packs the binder's output in JITFunction._pack_args; 3.6 (and 3.3-3.5) do the same steps
    inline in run(), without the guard that skips constexpr slots when collecting attrs: mirrored below.
    """
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target or _target())
    kwargs = dict(kwargs)
    # As JITFunction.run does before binding (the later two only exist in newer Triton).
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, binder_options = binder(*args, **kwargs)
    if hasattr(kernel, "_pack_args"):  # Triton >= 3.7
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization,
                                                                  binder_options)
    else:
        from triton._utils import find_paths_if, get_iterable_path

        options = backend.parse_options(kwargs)
        sigvals = [x[0] for x in specialization]
        signature = {p.name: v for p, v in zip(kernel.params, sigvals)}
        paths = find_paths_if(sigvals, lambda _, v: v == "constexpr")
        constexprs = {p: get_iterable_path(list(bound.values()), p) for p in paths}
        attrvals = [x[1] for x in specialization]
        paths = find_paths_if(attrvals, lambda _, v: isinstance(v, str))
        attrs = {p: backend.parse_attr(get_iterable_path(attrvals, p)) for p in paths}
    return Spec(signature, constexprs, attrs, options, dict(bound))


def compile_spec(kernel, spec: Spec, target=None):
    """triton.compile of one specialized launch, as JITFunction._do_compile calls it."""
    import triton
    from triton.compiler import ASTSource

    src = ASTSource(kernel, spec.signature, spec.constexprs, spec.attrs)
    return triton.compile(src, target=target or _target(), options=vars(spec.options))


def _grid(launch: Launch, bound: dict) -> tuple[int, int, int]:
    grid = launch.grid(bound) if callable(launch.grid) else launch.grid
    grid = tuple(int(g) for g in grid)
    return (grid + (1, 1))[:3]


def _jsonable(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)


# ----------------------------------------------------------------------------------------------
# The training step's launches


def _nets() -> dict:
    """Each net's feature layers in order: ("conv", ConvShape), ("lrn_pool", name) (AlexNet's fused
    LRNMaxPool2d: lrn1 -> pool1, lrn2 -> pool2) or ("pool", name)."""
    from perf.shapes import CONV

    by = {s.name: s for s in CONV}
    single = ["conv1", "lrn_pool1", "conv2", "lrn_pool2", "conv3", "conv4", "conv5", "pool5"]
    paper = ["conv1", "lrn_pool1", "conv2-g2", "lrn_pool2", "conv3", "conv4-g2", "conv5-g2", "pool5"]
    return {net: [("conv", by[n]) if n in by else (n.rstrip("0123456789"), n) for n in layers]
            for net, layers in (("single", single), ("paper", paper))}


def _is_channels_last(x: torch.Tensor) -> bool:
    from fastalex.ops.conv2d import _channels_last  # the test the op uses to pick the kernels' layout

    return _channels_last(x)


def _layout(x: torch.Tensor) -> str:
    return "nhwc" if _is_channels_last(x) else "nchw"


def _train_step(net: str, batch: int, dtype: torch.dtype, start: str) -> None:
    """One training step of `net`'s feature layers through fastalex's launchers, on meta tensors.

    Mirrors the ops' autograd (fastalex/ops/*.py) and the modules (fastalex/nn.py, fastalex/model.py):
    the fused conv+ReLU forward; its backward applies the ReLU mask with threshold_backward first, so
    the gradient kernels take the masked dy (no input gradient for conv1, whose input is the image);
    LRN and the max-pool after it fused (fastalex.nn.LRNMaxPool2d; groups=2 in the paper net, one pass
    over (N, C, H, W) keeping the layout) with the ReLU of the conv before it (relu=True: conv1 and
    conv2 run without theirs, and their backward has no mask to apply); pool5's max-pool without indices. The image starts in `start` layout (nhwc: what AlexNet feeds the kernels on a
    GPU); every later layout is whatever the launchers and torch's reshapes return. The conv op runs
    any input channels_last on a GPU, so an NCHW start converts the image once (a torch copy, not in
    the table: 2 x 79 MB at 3.35 TB/s, ~47 us in fp32 at batch 128) and then makes the nhwc launches. The classifier is
    torch's (cuBLAS), so pool5's output gradient arrives NCHW-contiguous (flatten's backward).
    """
    from fastalex.kernels import conv2d as conv
    from fastalex.kernels import lrn_maxpool2d, maxpool2d
    from perf.shapes import LRN_ARGS

    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(batch, 3, 227, 227, **meta)
    if start == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    pool_args = ((3, 3), (2, 2), (0, 0), (1, 1))
    saved = []
    layers = _nets()[net]
    for kind, layer in layers:
        name = layer.name if kind == "conv" else layer
        with _at(layer=name, layout=_layout(x)):
            if kind == "conv":
                s = layer
                w = torch.empty(s.c_out, s.c_in // s.groups, s.kernel, s.kernel, **meta)
                b = torch.empty(s.c_out, **meta)
                geometry = ((s.stride,) * 2, (s.padding,) * 2, (1, 1), s.groups)
                if not _is_channels_last(x):  # fastalex.ops.conv2d on a GPU (CHANNELS_LAST_DEVICES)
                    x = x.contiguous(memory_format=torch.channels_last)
                relu = s.relu  # conv1's and conv2's are the LRN + pool's (model.convs_relu_in_lrn)
                with _at(op="fwd", layout=_layout(x)):
                    y = conv.conv2d_forward(x, w, b, *geometry, (s.out_size,) * 2, relu=relu,
                                            channels_last=_is_channels_last(x), allow_tf32=True)
                saved.append((kind, name, (x, w, y if relu else None, geometry)))
            elif kind == "lrn_pool":
                g = 2 if net == "paper" else 1  # per-tower LRN in the two-tower net: one pass, groups=2
                with _at(op="fwd"):
                    y, arg = lrn_maxpool2d.lrn_maxpool2d_forward(x, **LRN_ARGS, groups=g, relu=True)
                saved.append((kind, name, (x, arg, g)))
            else:
                with _at(op="fwd"):
                    y, arg, _ = maxpool2d.maxpool2d_forward(x, *pool_args, ceil_mode=False, return_indices=False)
                saved.append((kind, name, (x, arg)))
        x = y
    dy = torch.empty(x.shape, **meta)  # flatten's backward: a view of fc6's (contiguous) input gradient
    for kind, name, t in reversed(saved):
        with _at(layer=name, op="bwd" if kind != "conv" else None):
            if kind == "pool":
                x, arg = t
                with _at(layout=_layout(x)):
                    dy = maxpool2d.maxpool2d_backward(dy, arg, x.shape, *pool_args, channels_last=_is_channels_last(x))
            elif kind == "lrn_pool":
                x, arg, g = t
                with _at(layout=_layout(x)):
                    dy = lrn_maxpool2d.lrn_maxpool2d_backward(dy, x, arg, **LRN_ARGS, groups=g, relu=True)
            else:
                x, w, y, geometry = t
                if y is not None:  # the conv's own ReLU (conv3-5)
                    dy = torch.ops.aten.threshold_backward(dy, y, 0)
                with _at(layout=_layout(x)):
                    if name != "conv1":
                        with _at(op="dgrad"):
                            dx = conv.conv2d_input_grad(dy, w, x.shape, *geometry,
                                                        channels_last=_is_channels_last(x), allow_tf32=True)
                    with _at(op="wgrad"):
                        conv.conv2d_weight_grad(dy, x, w.shape, *geometry, allow_tf32=True)
                dy = dx if name != "conv1" else None


def collect(batch: int = 128, dtypes=("fp32", "bf16"), nets=NETS, layouts=LAYOUTS) -> list[Launch]:
    """Every launch of the training steps asked for, in order, each tagged with its context."""
    from fastalex.kernels import conv2d as conv

    launches = []
    # The launchers size split-K from the GPU's SM count; meta tensors have none: the modelled GPU's.
    num_sms = conv._num_sms
    conv._num_sms = lambda device: SMS
    try:
        with intercept() as launches:
            for dtype in dtypes:
                for net in nets:
                    for start in layouts:
                        with _at(net=net, start=start, dtype=dtype):
                            _train_step(net, batch, DTYPES[dtype], start)
    finally:
        conv._num_sms = num_sms
    for launch in launches:
        c = launch.context
        c["kind"] = f"{re.match('[a-z_]+', c['layer']).group(0)}-{c['op']}"  # conv2-g2 wgrad -> conv-wgrad
    return launches


def _describe(v) -> Any:
    """An argument as it identifies a launch: tensors by dtype, shape and strides."""
    if isinstance(v, torch.Tensor):
        return ("tensor", str(v.dtype), tuple(v.shape), v.stride(), v.storage_offset())
    return repr(v)


@dataclasses.dataclass
class Row:
    """One distinct launch (identical launches from several places in the steps merged)."""

    launch: Launch
    counts: dict  # "net/start/dtype" -> how many times the steps make this launch
    labels: list  # "layer op" where it happens


def distinct(launches: list[Launch]) -> list[Row]:
    """Identical launches (same kernel, arguments, grid and options) merged, in first-seen order."""
    rows: dict = {}
    for launch in launches:
        key = (launch.kernel.__name__, repr(launch.grid) if not callable(launch.grid) else id(launch.grid),
               tuple(_describe(a) for a in launch.args),
               tuple(sorted((k, _describe(v)) for k, v in launch.kwargs.items())))
        row = rows.get(key)
        if row is None:
            row = rows[key] = Row(launch, {}, [])
        c = launch.context
        where = f"{c.get('net')}/{c.get('start')}/{c.get('dtype')}"
        row.counts[where] = row.counts.get(where, 0) + 1
        label = f"{c.get('layer')} {c.get('op')}"
        if label not in row.labels:
            row.labels.append(label)
    return list(rows.values())


# ----------------------------------------------------------------------------------------------
# Reading the compiled kernel: ptxas -v and SASS

def _bin_dir() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _ptxas_candidates() -> list[str]:
    """Triton's own choice for sm_90 first, then the bundled binaries."""
    paths = []
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            paths.append(get_ptxas(90).path)  # Triton 3.9: get_ptxas(arch), ptxas-blackwell for arch >= 90
        except TypeError:
            paths.append(get_ptxas().path)
    except Exception:  # noqa: BLE001 - the API moved between versions; the bundled binaries remain
        pass
    for name in ("ptxas-blackwell", "ptxas"):
        p = str(_bin_dir() / name)
        if os.path.exists(p) and p not in paths:
            paths.append(p)
    return paths


def _cuobjdump() -> str:
    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001
        return str(_bin_dir() / "cuobjdump")


def ptxas_info(ptx: str, fp_fusion: bool = True) -> dict:
    """Registers, spill stores/loads and stack from `ptxas -v` on the PTX, for the PTX's own target
    (sm_90a for Triton's Hopper PTX). Flags as Triton 3.9's make_cubin: -lineinfo and
    --regAllocOptLevel=2 (retried without it for a ptxas that does not know it)."""
    arch = re.search(r"^\s*\.target\s+(\w+)", ptx, re.MULTILINE).group(1)
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for ptxas in _ptxas_candidates():
            for extra in (["--regAllocOptLevel=2"], []):
                cmd = [ptxas, "-lineinfo", "-v", *([] if fp_fusion else ["--fmad=false"]), *extra,
                       f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode == 0:
                    return dict(_parse_ptxas(out.stderr), ptxas=os.path.basename(ptxas), arch=arch)
                errors.append(f"{os.path.basename(ptxas)} {' '.join(extra)}: {out.stderr.strip()[:300]}")
    raise RuntimeError("no ptxas compiled the PTX:\n" + "\n".join(errors))


def _parse_ptxas(log: str) -> dict:
    def num(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return dict(regs=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"), stack=num(r"(\d+) bytes stack frame"),
                static_smem=num(r"(\d+) bytes smem"))


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    """cuobjdump -sass text -> [(address, opcode, operands)]; the predicate (@P0) dropped."""
    out = []
    for line in text.splitlines():
        m = _SASS_LINE.match(line)
        if not m:
            continue
        ins = m.group(2)
        if ins.startswith("@"):
            ins = ins.split(None, 1)[1] if " " in ins else ""
        op, _, operands = ins.partition(" ")
        if op:
            out.append((int(m.group(1), 16), op, operands.strip()))
    return out


def _mma_shape(op: str) -> tuple[str, int, int, int] | None:
    """(operand type, m, n, k) of a tensor-core instruction, None for anything else.

    HGMMA.64x256x8.F32.TF32 (wgmma: one warpgroup of 4 warps), HMMA.16816.F32.BF16 (mma.sync: one warp).
    fp16 operands have no suffix (HGMMA.64x128x16.F32, HMMA.16816.F32): F16."""
    m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)\.\w+(?:\.(\w+))?", op)
    if m:
        return m.group(4) or "F16", int(m.group(1)), int(m.group(2)), int(m.group(3))
    m = re.match(r"HMMA\.(\d+)\.\w+(?:\.(\w+))?", op)
    if m:
        digits = m.group(1)  # 16816 -> 16x8x16, 1688 -> 16x8x8
        if digits.startswith("168"):
            return m.group(2) or "F16", 16, 8, int(digits[3:])
    return None


def loops(sass: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """(start, end) addresses of every loop: a BRA back to an earlier address (a branch to itself,
    the end-of-kernel trap, is no loop)."""
    found = []
    for addr, op, operands in sass:
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)\s*$", operands)
            if m and int(m.group(1), 16) < addr:
                found.append((int(m.group(1), 16), addr))
    return found


def _operand_bytes(op: str, operands: str) -> int:
    """Shared-memory bytes one HGMMA reads: B (k x n) always, A (m x k) when it comes from a descriptor
    ("HGMMA.64x128x8.F32.TF32 R24, gdesc[UR8], R24": A and B both in shared memory); 0 for HMMA (its
    operands are registers, loaded by separate instructions) and anything else."""
    shape = _mma_shape(op)
    if not shape or not op.startswith("HGMMA"):
        return 0
    kind, m, n, k = shape
    a_smem = operands.split(",")[1].strip().startswith("gdesc") if operands.count(",") >= 1 else True
    return (n * k + (m * k if a_smem else 0)) * MMA_OPERAND_BYTES[kind]


def sass_info(sass_text: str) -> dict:
    """Counts over the kernel and the innermost MMA loop (or the innermost loop when there is no MMA)."""
    sass = parse_sass(sass_text)
    ops = [op for _, op, _ in sass]
    mma_addrs = {a for a, op, _ in sass if _mma_shape(op)}
    info = dict(instructions=len(sass), hgmma=sum(op.startswith("HGMMA") for op in ops),
                hmma=sum(op.startswith("HMMA") for op in ops), ldgsts=sum(op.startswith("LDGSTS") for op in ops),
                tma=sum(op.startswith(("UTMALDG", "UBLKCP")) for op in ops), loops=0, loop_instrs=None,
                loop_mma=0, loop_mma_type=None, loop_warp_fmas=0, loop_local=0, loop_operand_bytes=0,
                loop_barriers=0, loop_mma_drains=0)
    found = loops(sass)
    info["loops"] = len(found)
    with_mma = [lp for lp in found if any(lp[0] <= a <= lp[1] for a in mma_addrs)]
    pool = with_mma or found
    if not pool:
        return info
    start, end = min(pool, key=lambda lp: lp[1] - lp[0])
    body = [(op, operands, _mma_shape(op)) for a, op, operands in sass if start <= a <= end]
    mmas = [shape for _, _, shape in body if shape]
    info.update(loop_instrs=len(body), loop_mma=len(mmas), loop_mma_type=mmas[0][0] if mmas else None,
                # Shared-memory bytes one warpgroup's wgmma read a trip: B always, A where its operand is a
                # descriptor (gdesc[...]: from shared memory; a register A reads none).
                loop_operand_bytes=sum(_operand_bytes(op, operands) for op, operands, _ in body),
                # Local-memory loads/stores (spill traffic, when ptxas reports spills) inside the loop.
                loop_local=sum(op.startswith(("LDL", "STL")) for op, _, _ in body),
                # What a throughput count cannot see: CTA barriers a trip (two in a plain pipelined GEMM:
                # the stage handover), and waits for every wgmma in flight (WARPGROUP.DEPBAR.LE gsb0,
                # 0x0: the tensor cores idle until the next is issued; a pipelined loop leaves 1-3 groups).
                loop_barriers=sum(op.startswith("BAR.SYNC") for op, _, _ in body),
                loop_mma_drains=sum(op.startswith("WARPGROUP.DEPBAR") and operands.replace(" ", "").endswith(",0x0")
                                    for op, operands, _ in body),
                # FMAs one warp's MMA instructions stand for in one trip (HGMMA: per warpgroup, issued by
                # each of its 4 warps, so a quarter each): for the cross-check against the block sizes.
                loop_warp_fmas=sum(m * n * k / (4 if op.startswith("HGMMA") else 1)
                                   for op, _, shape in body if shape for _, m, n, k in [shape]))
    return info


# ----------------------------------------------------------------------------------------------
# The model


def occupancy(regs: int, num_warps: int, smem: int) -> tuple[int, str]:
    """(CTAs per SM, what limits it). Registers: regs/thread rounded up to 8 (the allocation unit of
    256 per warp), times the CTA's threads, against 65536 (the per-warp allocation rounding is not
    modelled further); shared memory: the kernel's plus 1 KB reserved per CTA, against 228 KB; and the
    64-warp and 32-CTA limits. 0 if the CTA cannot launch at all."""
    if smem > SMEM_PER_CTA or regs > 255 or num_warps * 32 > 1024:
        return 0, "cannot launch"
    regs_cta = -(-max(regs, 1) // 8) * 8 * 32 * num_warps
    limits = {"regs": REGS_PER_SM // regs_cta, "smem": SMEM_PER_SM // (smem + SMEM_RESERVED_PER_CTA),
              "warps": MAX_WARPS_PER_SM // num_warps, "ctas": MAX_CTAS_PER_SM}
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def ceiling(fma_per_trip: float, mma_type: str, loop_instrs: int, num_warps: int, operand_bytes: float = 0) -> dict:
    """Issue-bound ceiling of one MMA loop trip of one CTA on one SM, and the operand-read bound beside it.

    tensor clocks = FMAs per trip / the SM's dense rate for the operand type (TF32 1024, BF16/F16 2048
    FMA/clock); issue clocks = loop instructions x warps / 4 schedulers (each warp runs the whole body
    once per trip). ceiling = tensor / max(tensor, issue): 1 when the tensor cores, not instruction
    issue, bound the loop. operand clocks = the shared-memory bytes the trip's wgmma read (every
    warpgroup's, `operand_bytes`) / SMEM_BYTES_PER_CLK; operand_ceiling = tensor / max(tensor, operand):
    below 1 where narrow MMA tiles read A again for few columns (N = 32: 1.5 x the bytes m64n64 reads a
    FMA). With k CTAs on an SM all scale by k, so occupancy does not enter."""
    tensor = fma_per_trip / MMA_FMA_PER_CLK[mma_type]
    issue = loop_instrs * num_warps / SCHEDULERS
    operand = operand_bytes / SMEM_BYTES_PER_CLK
    return dict(tensor_clocks=tensor, issue_clocks=issue, ceiling=tensor / max(tensor, issue),
                operand_clocks=operand, operand_ceiling=tensor / max(tensor, operand))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Per GEMM kernel: (M, N, K, groups, K-loop trips of a CTA) of the launch, from its bound arguments and grid.
GEMMS: dict[str, Callable[[dict, tuple], tuple[int, int, int, int, int]]] = {
    "_conv2d_fwd_kernel": lambda b, g: (b["M"], b["Cog"], b["KH"] * b["KW"] * b["Cig"], g[2],
                                        _cdiv(b["KH"] * b["KW"] * b["Cig"], b["BLOCK_K"])),
    "_conv2d_dgrad_kernel": lambda b, g: (b["M"], b["Cig"], b["KH"] * b["KW"] * b["Cog"], g[2],
                                          _cdiv(b["KH"] * b["KW"] * b["Cog"], b["BLOCK_K"])),
    "_conv2d_wgrad_kernel": lambda b, g: (b["Cog"], b["Cig"] * b["KH"] * b["KW"], b["K"], g[1],
                                          b["K_PER_SPLIT"] // b["BLOCK_K"]),
    "_conv2d_wgrad_taps_kernel": lambda b, g: (b["Cog"], b["Cig"] * b["KH"] * b["KW"], b["K"], g[1],
                                               b["K_PER_SPLIT"] // b["BLOCK_K"]),
}


def _bytes(args: tuple) -> int:
    """Every distinct tensor argument read or written once (a tensor passed twice counts once)."""
    seen = {}
    for a in args:
        if isinstance(a, torch.Tensor):
            seen[id(a)] = a.numel() * a.element_size()
    return sum(seen.values())


def model(launch: Launch, spec: Spec, compiled_info: dict) -> dict:
    """Grid, occupancy, waves, ceiling and predicted time of one launch (see the module docstring)."""
    k = compiled_info
    b = spec.bound
    grid = _grid(launch, b)
    ctas = grid[0] * grid[1] * grid[2]
    warps = k["num_warps"]
    cps, limiter = occupancy(k["regs"], warps, k["smem"])
    first = next((a for a in launch.args if isinstance(a, torch.Tensor)), None)
    out = dict(shape="x".join(map(str, first.shape)) if first is not None else "", grid=list(grid), ctas=ctas,
               ctas_per_sm=cps, occupancy_limit=limiter)
    if cps == 0:
        return out
    mma = bool(k["loop_mma"]) and all(x in b for x in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    # Waves of CTAs, every SM running cps at once. With an MMA loop the ceiling is one CTA's alone on
    # an SM, so an SM's time is the tiles it runs, one at a time or cps together: waves count tiles
    # per SM (a last wave of one CTA an SM takes a tile's time, not that of cps; 2026-12-05).
    waves = ctas / (SMS * (1 if mma else cps))
    eff = waves / math.ceil(waves)
    nbytes = _bytes(launch.args)
    t_mem = nbytes / DRAM_BYTES_PER_S
    out.update(waves=waves, wave_eff=eff, bytes=nbytes, t_memory_us=t_mem * 1e6)
    name = launch.kernel.__name__
    if mma:
        # One trip of the K loop does one BLOCK_K step of the CTA's BLOCK_M x BLOCK_N tile.
        # (TAPS products a trip; BLOCK_N2 a second column tile)
        fma_trip = b["BLOCK_M"] * (b["BLOCK_N"] + b.get("BLOCK_N2", 0)) * b["BLOCK_K"] * b.get("TAPS", 1)
        # (HGMMA is a warpgroup's: the body's operand bytes once for each group of 4 warps)
        c = ceiling(fma_trip, k["loop_mma_type"], k["loop_instrs"], warps, k["loop_operand_bytes"] * warps / 4)
        rate = MMA_FMA_PER_CLK[k["loop_mma_type"]] * 2 * SMS * CLOCK_HZ  # dense FLOP/s of the whole GPU
        out.update(fma_per_trip=fma_trip, fma_per_trip_sass=k["loop_warp_fmas"] * warps, **c)
        if name in GEMMS:
            m, n, kk, groups, trips = GEMMS[name](b, grid)
            useful = m * n * kk * groups
            out["shape"] = f"{m}x{n}x{kk}" + (f" g{groups}" if groups > 1 else "")
            executed = ctas * trips * fma_trip  # whole tiles: padding of M, N and K included
            # Instruction issue and operand reads overlap the MMA and each other: the slower bounds.
            t_comp = 2 * executed / rate / min(c["ceiling"], c["operand_ceiling"])
            out.update(flops=2 * useful, flops_executed=2 * executed, tile_eff=useful / executed,
                       t_compute_us=t_comp * 1e6)
            t = max(t_comp, t_mem)
            out.update(bound="compute" if t_comp >= t_mem else "memory", predicted_us=t / eff * 1e6)
            return out
    # No MMA loop: bytes / bandwidth, or instruction issue if that is longer (every instruction
    # counted once: exact for straight-line code, a lower bound with loops).
    t_issue = k["instructions"] * warps * ctas / (SCHEDULERS * SMS * CLOCK_HZ)
    t = max(t_mem, t_issue)
    out.update(t_issue_us=t_issue * 1e6, bound="memory" if t_mem >= t_issue else "issue", predicted_us=t / eff * 1e6)
    return out


# ----------------------------------------------------------------------------------------------
# Putting it together


def analyse_compiled(compiled) -> dict:
    """What ptxas and the SASS say about one compiled kernel."""
    md = compiled.metadata
    info = ptxas_info(compiled.asm["ptx"], fp_fusion=getattr(md, "enable_fp_fusion", True))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        dump = subprocess.run([_cuobjdump(), "-res-usage", "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+)", dump)
    cubin_regs = int(m.group(1)) if m else None
    info.update(sass_info(dump))
    info.update(num_warps=md.num_warps, num_stages=md.num_stages,
                smem=md.shared + info["static_smem"], cubin_regs=cubin_regs,
                ptxas_matches_cubin=cubin_regs is None or cubin_regs == info["regs"])
    if cubin_regs is not None:
        info["regs"] = cubin_regs  # the cubin Triton built is what runs
    info["spill_bytes"] = info["spill_stores"] + info["spill_loads"]
    info["spills"] = info["spill_bytes"] > 0
    return info


def analyse(launch: Launch, cache: dict | None = None, spec: Spec | None = None) -> dict:
    """Specialize, compile (once per distinct specialization, via `cache`), read and model one launch."""
    spec = spec or specialize(launch.kernel, launch.args, launch.kwargs)
    key = spec.key(launch.kernel)
    cache = {} if cache is None else cache
    if key not in cache:
        t0 = time.time()
        try:
            compiled = compile_spec(launch.kernel, spec)
            cache[key] = dict(analyse_compiled(compiled), compile_s=round(time.time() - t0, 2))
        except Exception as e:  # noqa: BLE001 - reported per launch, the run goes on
            cache[key] = dict(error=f"{type(e).__name__}: {str(e)[:500]}", compile_s=round(time.time() - t0, 2))
    info = cache[key]
    row = dict(kernel=launch.kernel.__name__, constexprs=spec.named_constexprs(launch.kernel),
               ones=spec.ones(launch.kernel), divisible_16=spec.divisible(launch.kernel),
               spec_hash=hashlib.sha1(repr(key).encode()).hexdigest()[:12])
    row.update({k: v for k, v in info.items() if k not in ("static_smem",)})
    if "error" not in info:
        row.update(model(launch, spec, info))
    return row


def run(rows: list[Row], progress: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Analyse each distinct launch; returns one dict per row (context fields included)."""
    cache: dict = {}
    out = []
    for i, r in enumerate(rows, 1):
        c = r.launch.context
        t0 = time.time()
        res = analyse(r.launch, cache)
        res = dict(layer=c.get("layer"), op=c.get("op"), kind=c.get("kind"), dtype=c.get("dtype"),
                   layout=c.get("layout"), where=r.labels, counts=r.counts, **res)
        out.append(res)
        msg = "error" if "error" in res else f"regs {res['regs']}, ceiling {_fmt(res.get('ceiling'), '.2f')}"
        progress(f"[{i}/{len(rows)}] {res['kernel']} {c.get('layer')} {c.get('op')} {c.get('dtype')} "
                 f"{c.get('layout')}: {msg} ({time.time() - t0:.1f} s)")
    return out


def summary(results: list[dict]) -> dict:
    """Headline numbers: spilling launches, ceilings by kind, predicted kernel time per step."""
    ok = [r for r in results if "error" not in r]
    spilling = [f"{r['kernel']} {r['layer']} {r['op']} {r['dtype']} {r['layout']}" for r in ok if r["spills"]]
    by_kind = {}
    for r in ok:
        if r.get("ceiling") is not None:
            by_kind.setdefault(r["kind"], []).append(r["ceiling"])
    ceilings = {k: dict(min=round(min(v), 3), median=round(statistics.median(v), 3), max=round(max(v), 3),
                        launches=len(v)) for k, v in sorted(by_kind.items())}
    mma = [r for r in ok if r.get("ceiling") is not None]
    worst = min(mma, key=lambda r: r["ceiling"]) if mma else None
    step = {}
    for r in ok:
        for where, n in r["counts"].items():
            step[where] = step.get(where, 0.0) + n * r.get("predicted_us", 0.0)
    drains = [f"{r['kernel']} {r['layer']} {r['op']} {r['dtype']} {r['layout']}" for r in ok
              if r.get("loop_mma_drains")]
    return dict(launches=len(results), compiled=len({r["spec_hash"] for r in results}),
                errors=len(results) - len(ok), spilling=len(spilling), spilling_launches=spilling,
                draining_launches=drains,
                min_ceiling=round(worst["ceiling"], 3) if worst else None,
                min_ceiling_launch=(f"{worst['kernel']} {worst['layer']} {worst['op']} {worst['dtype']} "
                                    f"{worst['layout']}") if worst else None,
                ceilings_by_kind=ceilings,
                predicted_step_us={k: round(v, 1) for k, v in sorted(step.items())})


# ----------------------------------------------------------------------------------------------
# Output

COLUMNS = ("kernel", "layer/op", "shape", "nets", "dtype", "layout", "regs", "spill B", "smem KB", "HGMMA/HMMA",
           "cp.async/TMA", "loop instrs", "bars/drains", "ceiling", "operand", "grid", "waves", "wave eff", "pred us")


def _fmt(v, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def _nets_of(r: dict) -> str:
    """Which steps make the launch: "single", "paper" or both, with the image's start layout if only one."""
    nets = sorted({w.split("/")[0] for w in r["counts"]}, reverse=True)
    starts = sorted({w.split("/")[1] for w in r["counts"]})
    return "+".join(nets) + (f" ({starts[0]} start)" if len(starts) == 1 and r["layout"] != starts[0] else "")


def table_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["kernel"], f"{r['layer']} {r['op']}", "", _nets_of(r), r["dtype"], r["layout"], "error"]
                        + [""] * (len(COLUMNS) - 7))
            continue
        rows.append([r["kernel"].lstrip("_").removesuffix("_kernel"), f"{r['layer']} {r['op']}", r.get("shape", ""),
                     _nets_of(r), r["dtype"],
                     r["layout"], str(r["regs"]), str(r["spill_bytes"]), f"{r['smem'] / 1024:.0f}",
                     f"{r['hgmma']}/{r['hmma']}", f"{r['ldgsts']}/{r['tma']}", _fmt(r["loop_instrs"]),
                     f"{r['loop_barriers']}/{r['loop_mma_drains']}" if r.get("loop_mma") else "-",
                     _fmt(r.get("ceiling"), ".2f"), _fmt(r.get("operand_ceiling"), ".2f"),
                     "x".join(map(str, r.get("grid", []))),
                     _fmt(r.get("waves"), ".2f"), _fmt(r.get("wave_eff"), ".2f"), _fmt(r.get("predicted_us"), ".1f")])
    return rows


def print_table(results: list[dict], summ: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(200, Console().width))
    table = Table(title="Triton launches compiled for sm_90 (static model at H100 SXM rates)")
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("kernel", "layer/op", "shape", "nets", "dtype", "layout", "grid")
                         else "right")
    for r, cells in zip(results, table_rows(results)):
        style = "red" if r.get("spills") or "error" in r else None
        table.add_row(*cells, style=style)
    console.print(table)
    console.print(f"{summ['launches']} distinct launches, {summ['errors']} errors; "
                  f"{summ['spilling']} spill{'s' if summ['spilling'] != 1 else ''}"
                  + (": " + "; ".join(summ["spilling_launches"]) if summ["spilling"] else ""))
    if summ["draining_launches"]:
        console.print("MMA loops that wait for every wgmma a trip (latency the model does not count): "
                      + "; ".join(summ["draining_launches"]))
    if summ["min_ceiling"] is not None:
        console.print(f"lowest ceiling {summ['min_ceiling']:.2f}: {summ['min_ceiling_launch']}")
    for kind, c in summ["ceilings_by_kind"].items():
        console.print(f"  ceiling {kind}: min {c['min']:.2f}, median {c['median']:.2f}, max {c['max']:.2f} "
                      f"({c['launches']} launches)")
    for where, us in summ["predicted_step_us"].items():
        console.print(f"  predicted kernel time of a step, {where}: {us / 1000:.2f} ms")


def markdown(results: list[dict], summ: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(results)]
    lines += ["", f"{summ['launches']} distinct launches, {summ['errors']} errors, {summ['spilling']} spilling."]
    if summ["draining_launches"]:
        lines.append("MMA loops that wait for every wgmma a trip (latency the model does not count): "
                     + "; ".join(summ["draining_launches"]) + ".")
    if summ["min_ceiling"] is not None:
        lines.append(f"Lowest ceiling {summ['min_ceiling']:.2f}: {summ['min_ceiling_launch']}.")
    lines += ["", "| kind | min ceiling | median | max | launches |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {c['min']:.2f} | {c['median']:.2f} | {c['max']:.2f} | {c['launches']} |"
              for k, c in summ["ceilings_by_kind"].items()]
    lines += ["", "| step (net/start layout/dtype) | predicted kernel time (ms) |", "|---|---|"]
    lines += [f"| {k} | {v / 1000:.2f} |" for k, v in summ["predicted_step_us"].items()]
    return "\n".join(lines) + "\n"


def _csv(choices):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if choices is not None and t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(choices)}, got {text!r}")
        return items
    return parse


def main(argv: list[str] | None = None) -> int:
    from perf._args import positive_int

    p = argparse.ArgumentParser(prog="python -m perf.static", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=positive_int, default=128)
    p.add_argument("--dtype", type=_csv(DTYPES), default=["fp32", "bf16"], help="fp32 (tf32 products), bf16, fp16")
    p.add_argument("--nets", type=_csv(NETS), default=list(NETS))
    p.add_argument("--layouts", type=_csv(LAYOUTS), default=list(LAYOUTS),
                   help="the image's layout at the start of the step (nhwc: as AlexNet feeds the kernels on GPUs)")
    p.add_argument("--kinds", type=_csv(KINDS), default=list(KINDS))
    p.add_argument("--layers", type=_csv(None), default=None, help="e.g. conv2,conv2-g2,lrn_pool1,pool5 (default: all)")
    p.add_argument("--limit", type=positive_int, default=None, help="analyse at most N distinct launches")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args(argv)
    require_compiler()
    import triton

    def err(msg: str) -> None:  # progress on stderr, the table on stdout
        print(msg, file=sys.stderr, flush=True)

    t0 = time.time()
    launches = [x for x in collect(args.batch, args.dtype, args.nets, args.layouts)
                if x.context["kind"] in args.kinds and (args.layers is None or x.context["layer"] in args.layers)]
    rows = distinct(launches)[:args.limit]
    err(f"{len(launches)} launches, {len(rows)} distinct: compiling for sm_90")
    results = run(rows, progress=err)
    summ = summary(results)
    print_table(results, summ)
    meta = dict(triton=triton.__version__, torch=torch.__version__, target="cuda sm_90 (GPUTarget('cuda', 90, 32))",
                command="python -m perf.static " + " ".join(sys.argv[1:] if argv is None else argv),
                batch=args.batch, seconds=round(time.time() - t0, 1),
                model=dict(sms=SMS, clock_hz=CLOCK_HZ, regs_per_sm=REGS_PER_SM, smem_per_sm=SMEM_PER_SM,
                           smem_per_cta=SMEM_PER_CTA, dram_bytes_per_s=DRAM_BYTES_PER_S,
                           mma_fma_per_clk_per_sm=MMA_FMA_PER_CLK),
                note="predictions of a static model, not measurements")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, summary=summ, rows=results), indent=1, default=_jsonable))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(results, summ))
    err(f"done in {time.time() - t0:.0f} s")
    return 1 if summ["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
