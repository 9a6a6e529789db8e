"""Krizhevsky's "one weird trick" (2014) for fastalex's AlexNet on torch.distributed.

The convolutional layers (about 95% of the computation, about 5% of the parameters) run data
parallel: every rank holds all of them and runs its own slice of the global batch. The fully
connected layers (the reverse) run model parallel: every rank holds a slice of the output neurons
of fc6, fc7 and fc8 and computes it for the whole global batch; activations are exchanged with
collectives:

    rank r: x_r (B, 3, H, W) -> features -> (B, F)          [drop6 on its own rows]
            all_gather along the batch    -> (W*B, F)        [on every rank]
            fc6 slice -> act6 -> drop7    -> (W*B, n6_r)     [drop7 on its own neurons]
            all_gather along the neurons  -> (W*B, 4096)
            fc7 slice -> act7, gather     -> (W*B, 4096)
            fc8 slice, gather             -> (W*B, C) logits; rank r returns its own rows (B, C)

    torchrun --nproc-per-node 2 -m fastalex train --strategy hybrid

    hybrid = HybridAlexNet(AlexNet(...))                 # same weights on every rank (same seed, or broadcast)
    opt = fastalex.optim.sgd(hybrid.parameters(), ...)
    loss = F.cross_entropy(hybrid(x_local), y_local)      # every rank the same local batch size B
    loss.backward(); hybrid.finish_gradients(); opt.step()

Training equals single-process training of the full net on the concatenated global batch
(rank 0's rows first) with the mean loss over it, up to float rounding (tested with gloo on CPUs).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from fastalex.model import AlexNet

__all__ = ["HybridAlexNet", "bytes_per_step", "split_sizes"]


def split_sizes(n: int, world: int) -> list[int]:
    """How n output neurons are split over `world` ranks: the first n % world ranks get one more."""
    return [n // world + (1 if r < n % world else 0) for r in range(world)]


def _fc_names(model: AlexNet) -> list[str]:
    """Names of the fc layers (fc6, fc7, fc8) in the classifier, from the model's layer table ("fc6"...
    for paper/single, "1", "4", "6" for torchvision)."""
    return [path.split(".", 1)[1] for layer, path in model.layers if layer.kind == "fc"]


def _check_model(model) -> None:
    if not isinstance(model, AlexNet):
        raise TypeError(f"HybridAlexNet wraps a fastalex.AlexNet, got {type(model).__name__}")
    if getattr(model, "devices", None) is not None:
        raise ValueError("HybridAlexNet needs a single-device AlexNet, not the towers model (AlexNet(devices=...)): "
                         "build the net without devices (hybrid parallelism replaces the paper's two towers)")


def _config(model: AlexNet) -> dict:
    cfg = getattr(model, "config", None)
    if cfg is not None:
        return dict(cfg)
    drop = next((m.p for m in model.classifier.modules() if isinstance(m, nn.Dropout)), 0.0)
    return dict(num_classes=model.num_classes, variant=model.variant, dropout=float(drop),
                image_size=model.image_size, activation=model.activation, lrn=model.lrn, pool=model.pool)


_NO_REDUCE_SCATTER: set = set()  # backends that said they lack reduce_scatter (older gloo)


def _reduce_scatter(out: torch.Tensor, chunks: list[torch.Tensor], group) -> None:
    """out = sum over ranks of their chunks[rank]; where the backend lacks reduce_scatter, an all-reduce."""
    backend = str(dist.get_backend(group))
    if backend not in _NO_REDUCE_SCATTER:
        try:
            dist.reduce_scatter(out, chunks, group=group)
            return
        except RuntimeError as e:  # raised before any communication: "... does not support reduce_scatter"
            if "support" not in str(e):
                raise
            _NO_REDUCE_SCATTER.add(backend)
    full = torch.cat(chunks)
    dist.all_reduce(full, group=group)
    out.copy_(full[dist.get_rank(group) * out.shape[0]:][:out.shape[0]])


class _AllGather(torch.autograd.Function):
    """all_gather along dim 0 with autograd: forward (N, ...) -> (W*N, ...); backward reduce-scatters
    (sums) the gradient, so every rank's loss reaches the rows it came from. Every rank the same N."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group, world: int, rank: int) -> torch.Tensor:
        ctx.group, ctx.world, ctx.rank = group, world, rank
        t = t.contiguous()
        n = t.shape[0]
        out = t.new_empty((world * n, *t.shape[1:]))
        dist.all_gather([out[r * n:(r + 1) * n] for r in range(world)], t, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        n = grad.shape[0] // ctx.world
        chunks = [grad[r * n:(r + 1) * n] for r in range(ctx.world)]
        out = torch.empty_like(chunks[ctx.rank])
        _reduce_scatter(out, chunks, ctx.group)
        return out, None, None, None


class HybridAlexNet(nn.Module):
    """AlexNet with data-parallel convs and model-parallel FC layers over a torch.distributed group.

    Built on every rank from the same full AlexNet (same weights on every rank, e.g. the same seed):
    keeps `features` (and avgpool for torchvision) whole, and keeps only this rank's slice of the output
    neurons (rows of the weight, entries of the bias) of fc6, fc7 and fc8.
    forward(x_local (B, 3, H, W)) -> logits (B, num_classes) for this rank's own rows; every rank must
    call it with the same B (collectives need equal sizes). The convs run as AlexNet.forward_features;
    the FC layers are the model's table's fc rows (AlexNet.layers).

    Rank r of W holds rows [start_r, start_r + n_r) of each FC layer with n_r = split_sizes(n, W)[r]
    (uneven splits allowed; the collectives pad every slice to ceil(n / W) and trim after).
    `features` are the given model's own modules (shared, not copied); the FC slices are copies, so
    the full model can be dropped. Parameters come in the full model's order (features..., fc6.weight,
    fc6.bias, fc7..., fc8...) under the same names; state_dict() is this rank's (sliced) state,
    full_state_dict() the full net's (collective).

    Dropout: drop6 acts on this rank's own rows before the batch is gathered, drop7 on this rank's
    own fc6 neurons before they are gathered: each activation element is dropped by exactly one
    rank's RNG, as in the single net (seed ranks differently for independent masks; the convs draw
    no random numbers, so the replicated weights stay identical).
    """

    def __init__(self, model: AlexNet, group=None):
        super().__init__()
        _check_model(model)
        if not dist.is_available():
            raise RuntimeError("HybridAlexNet needs torch.distributed, which this torch build lacks")
        if not dist.is_initialized():
            raise RuntimeError("HybridAlexNet needs an initialised torch.distributed process group: launch the "
                               "processes with torchrun (e.g. `torchrun --nproc-per-node 2 -m fastalex train "
                               "--strategy hybrid`) and call torch.distributed.init_process_group (or "
                               "fastalex.distributed.init) before building it")
        self.group = group
        self._comm_group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if self.rank < 0:
            raise ValueError("this process is not a member of the given process group")

        self.config = _config(model)
        self.variant, self.num_classes, self.image_size = model.variant, model.num_classes, model.image_size
        self.activation, self.lrn, self.pool, self.devices = model.activation, model.lrn, model.pool, None

        # Registration order = parameter order = the full model's: features, (avgpool), classifier.
        self.features = model.features
        if hasattr(model, "avgpool"):
            self.avgpool = model.avgpool
        self.fc_names = _fc_names(model)
        self.fc_sizes: dict[str, list[int]] = {}   # full out features split over ranks, per FC layer
        self.fc_in = model.classifier.get_submodule(self.fc_names[0]).in_features
        children = []
        for name, m in model.classifier.named_children():
            if name in self.fc_names:
                sizes = split_sizes(m.out_features, self.world_size)
                start = sum(sizes[:self.rank])
                m = self._slice_linear(m, start, sizes[self.rank])
                self.fc_sizes[name] = sizes
            children.append((name, m))
        self.classifier = nn.Sequential(OrderedDict(children))
        self.train(model.training)

    @staticmethod
    @torch.no_grad()
    def _slice_linear(fc: nn.Linear, start: int, n: int) -> nn.Linear:
        """An nn.Linear holding rows [start, start + n) of fc (built without initialising anything)."""
        out = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(out)
        out.in_features, out.out_features = fc.in_features, n
        out.weight = nn.Parameter(fc.weight[start:start + n].clone(), requires_grad=fc.weight.requires_grad)
        bias = None if fc.bias is None else nn.Parameter(fc.bias[start:start + n].clone(),
                                                        requires_grad=fc.bias.requires_grad)
        out.register_parameter("bias", bias)
        return out

    # The convs run exactly as in AlexNet: its own methods, on the modules shared with it (features,
    # avgpool) and its variant, image_size and pool (devices is None: never the towers' path).
    _check_input = AlexNet._check_input
    forward_features = AlexNet.forward_features

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world_size={self.world_size}, fc_out_per_rank=" + str(
            {n: s[self.rank] for n, s in self.fc_sizes.items()})

    # -- layout --------------------------------------------------------------------------------

    def _rows(self, name: str) -> tuple[int, int]:
        sizes = self.fc_sizes[name]
        start = sum(sizes[:self.rank])
        return start, start + sizes[self.rank]

    def _sliced_keys(self) -> dict[str, str]:
        """state_dict key -> FC layer name, for the sliced entries (weights and biases of fc6/7/8)."""
        return {f"classifier.{name}.{p}": name for name in self.fc_names
                for p, _ in self.classifier.get_submodule(name).named_parameters(recurse=False)}

    def _sliced_params(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name in self.fc_names for _, p in self.classifier.get_submodule(name).named_parameters()]

    def _replicated_params(self) -> list[nn.Parameter]:
        sliced = {id(p) for _, p in self._sliced_params()}
        return [p for p in self.parameters() if id(p) not in sliced]

    # -- forward -------------------------------------------------------------------------------

    def _gather_batch(self, h: torch.Tensor) -> torch.Tensor:
        """(N, ...) on every rank -> (W*N, ...), rank 0's rows first (autograd: the backward reduce-scatters)."""
        return _AllGather.apply(h, self._comm_group, self.world_size, self.rank)

    def _gather_neurons(self, h: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """(N, n_r) on every rank -> (N, sum n_r): padded to max n_r for the collective, trimmed after."""
        width, n = max(sizes), h.shape[0]
        if h.shape[1] < width:
            h = F.pad(h, (0, width - h.shape[1]))
        g = self._gather_batch(h).view(self.world_size, n, width)
        if all(s == width for s in sizes):
            return g.permute(1, 0, 2).reshape(n, self.world_size * width)
        return torch.cat([g[r, :, :s] for r, s in enumerate(sizes)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.flatten(self.forward_features(x), 1)
        b = h.shape[0]
        sizes = None  # None: h holds this rank's rows, all features; else h holds this rank's neurons, all rows
        for name, m in self.classifier.named_children():
            if name in self.fc_sizes:  # fc6, fc7, fc8: this rank's slice
                h = self._gather_batch(h) if sizes is None else self._gather_neurons(h, sizes)
                sizes = self.fc_sizes[name]
            h = m(h)  # the slice of a Linear; dropout and activations elementwise on what this rank holds
        logits = self._gather_neurons(h, sizes)  # (W*B, num_classes) on every rank
        return logits[self.rank * b:(self.rank + 1) * b]

    # -- gradients -----------------------------------------------------------------------------

    @torch.no_grad()
    def finish_gradients(self) -> None:
        """Turn the grads left by every rank's loss.backward() into those of the mean loss over the global batch.

        Each rank's loss L_r is the mean over its B rows, and the global loss is L = (1/W) sum_r L_r.
        The backward of each all_gather is a reduce-scatter (sum over ranks), so after backward every
        rank's grads are those of sum_r L_r = W * L with respect to what this rank holds:
          - an FC slice is held by this rank alone: grad = W * dL/dslice  ->  divided by W;
          - the convs are replicated, and this rank's copy only saw its own rows: grad_r is the part
            of d(W L)/dconv through rank r's rows  ->  dL/dconv = (1/W) sum_r grad_r: all-reduced
            (summed, one flat buffer, every rank the same result) and divided by W.
        Collective: every rank calls it after backward and before the optimizer step. A non-finite
        FC gradient on any rank is made NaN on every rank (one extra element in the all-reduce), so
        that a GradScaler skips the step on all ranks or on none.
        """
        world = self.world_size
        replicated = self._replicated_params()
        sliced = [p for _, p in self._sliced_params() if p.grad is not None]
        ref = next((p.grad for p in replicated + sliced if p.grad is not None), None)
        if ref is None:
            raise RuntimeError("finish_gradients() found no gradients: call it after loss.backward()")
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in replicated]
        bad = torch.zeros((), dtype=torch.float32, device=ref.device)
        for g in (p.grad for p in sliced):
            bad = bad + (~torch.isfinite(g)).any().float()
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [bad.reshape(1)])
        dist.all_reduce(flat, group=self._comm_group)
        flat.div_(world)
        offset = 0
        for p, g in zip(replicated, grads):
            part = flat[offset:offset + g.numel()].view_as(g)
            if p.grad is None:
                p.grad = part.to(p.dtype).clone()
            else:
                p.grad.copy_(part)
            offset += g.numel()
        nonfinite = flat[-1] > 0
        for p in sliced:
            p.grad.div_(world).masked_fill_(nonfinite, float("nan"))

    # -- state ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _gather_rows(self, t: torch.Tensor, name: str) -> torch.Tensor:
        """This rank's rows of an FC layer's tensor -> the full tensor on every rank (collective)."""
        sizes = self.fc_sizes[name]
        width = max(sizes)
        t = t.detach()
        if t.shape[0] < width:
            t = torch.cat([t, t.new_zeros((width - t.shape[0], *t.shape[1:]))])
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous(), group=self._comm_group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    def full_state_dict(self) -> dict:
        """The full net's state_dict on every rank (model.state_dict()'s keys and shapes; collective)."""
        sliced = self._sliced_keys()
        out = OrderedDict()
        for key, t in self.state_dict().items():
            out[key] = self._gather_rows(t, sliced[key]) if key in sliced else t.detach().clone()
        return out

    def load_full_state_dict(self, sd) -> None:
        """Load a full net's state_dict (e.g. full_state_dict()'s or a plain AlexNet's): this rank's slices."""
        sliced = self._sliced_keys()
        own = self.state_dict()
        missing, unexpected = [k for k in own if k not in sd], [k for k in sd if k not in own]
        if missing or unexpected:
            raise ValueError(f"not this AlexNet's state_dict: missing keys {missing}, unexpected keys {unexpected}")
        local = OrderedDict()
        for key, t in sd.items():
            if key in sliced:
                name = sliced[key]
                full = sum(self.fc_sizes[name])
                if t.shape[0] != full or tuple(t.shape[1:]) != tuple(own[key].shape[1:]):
                    raise ValueError(f"{key}: expected the full layer's shape ({full}, *{tuple(own[key].shape[1:])}), "
                                     f"got {tuple(t.shape)}")
                start, stop = self._rows(name)
                t = t[start:stop]
            local[key] = t
        self.load_state_dict(local)

    def _optimizer_index(self, optimizer: torch.optim.Optimizer) -> dict[int, int]:
        """id(param) -> the index the optimizer's state_dict gives it (order of the param groups)."""
        index, i = {}, 0
        for group in optimizer.param_groups:
            for p in group["params"]:
                index[id(p)] = i
                i += 1
        ours = {id(p) for p in self.parameters()}
        if set(index) != ours:
            raise ValueError("the optimizer must be built over hybrid.parameters() (all of them, nothing else)")
        return index

    def gather_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """optimizer.state_dict() as if for the full model (collective): the same param indices as an
        optimizer over model.parameters() with the same groups; the FC slices' per-parameter tensors
        (SGD's momentum buffers) gathered along dim 0."""
        index = self._optimizer_index(optimizer)
        sd = optimizer.state_dict()
        state = dict(sd["state"])
        for name, p in self._sliced_params():
            i = index[id(p)]
            if i not in state:
                continue
            entry = dict(state[i])
            for k in sorted(entry):  # the same order on every rank: the gathers pair up
                v = entry[k]
                if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape == p.shape:
                    entry[k] = self._gather_rows(v, name)
            state[i] = entry
        return {"state": state, "param_groups": sd["param_groups"]}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, full_state: dict) -> None:
        """Load gather_optimizer_state()'s result (or a full model's SGD state_dict): this rank's slices."""
        index = self._optimizer_index(optimizer)
        state = dict(full_state["state"])
        for name, p in self._sliced_params():
            i = index[id(p)]
            if i not in state:
                continue
            full_shape = (sum(self.fc_sizes[name]), *p.shape[1:])
            start, stop = self._rows(name)
            entry = dict(state[i])
            for k, v in entry.items():
                if isinstance(v, torch.Tensor) and v.dim() >= 1:
                    if tuple(v.shape) != full_shape:
                        raise ValueError(f"optimizer state {k!r} of parameter {i} ({name}): expected the full layer's "
                                         f"shape {full_shape}, got {tuple(v.shape)}")
                    entry[k] = v[start:stop].clone()
            state[i] = entry
        optimizer.load_state_dict({"state": state, "param_groups": full_state["param_groups"]})

    def full_model(self) -> AlexNet:
        """A plain AlexNet with the full weights (a copy, on this net's device; collective): for evaluation."""
        sd = self.full_state_dict()
        with torch.device("meta"):
            net = AlexNet(**self.config, init="torch")
        net.load_state_dict(sd, assign=True)
        net.train(self.training)
        return net


def bytes_per_step(model, batch_per_rank: int, world: int, dtype_bytes: int = 4) -> dict:
    """Bytes that each rank sends (and receives) per training step under HybridAlexNet, with ring collectives.

    B = batch_per_rank, W = world, F = fc6's input features (256*6*6 = 9216 at full size),
    n_l = out features of fc6, fc7, fc8, m_l = ceil(n_l / W) (the padded slice the collectives move),
    P_conv = the replicated (conv) parameters, P = all parameters, d = dtype_bytes. An all_gather in
    which every rank contributes c elements makes each rank send (W-1) c; its backward (a
    reduce-scatter of the gradient) the same; a ring all-reduce of P elements 2 (W-1) ceil(P / W).

        features_forward  = (W-1) * B * F * d             conv features gathered along the batch
        features_backward = (W-1) * B * F * d             their gradients reduce-scattered
        fc{6,7,8}_forward = (W-1) * (W*B) * m_l * d       each FC layer's activations gathered
        fc{6,7,8}_backward= (W-1) * (W*B) * m_l * d       their gradients reduce-scattered
        conv_allreduce    = 2 * (W-1) * ceil(P_conv / W) * d
        total             = the sum of the above
        ddp_allreduce     = 2 * (W-1) * ceil(P / W) * d   (data parallelism over every layer, for comparison)

    All tensors are counted at d bytes (gradients included). `model` is an AlexNet or a HybridAlexNet.
    """
    for what, v in (("batch_per_rank", batch_per_rank), ("world", world), ("dtype_bytes", dtype_bytes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be a positive int, got {v!r}")
    if isinstance(model, HybridAlexNet):
        fc_in, outs = model.fc_in, [sum(model.fc_sizes[n]) for n in model.fc_names]
        sliced = {id(p) for _, p in model._sliced_params()}
        p_conv = sum(p.numel() for p in model.parameters() if id(p) not in sliced)
        p_fc = sum((fc_in if i == 0 else outs[i - 1]) * n + n for i, n in enumerate(outs))
    else:
        _check_model(model)
        fcs = [model.classifier.get_submodule(n) for n in _fc_names(model)]
        fc_in, outs = fcs[0].in_features, [fc.out_features for fc in fcs]
        fc_params = {id(p) for fc in fcs for p in fc.parameters()}
        p_conv = sum(p.numel() for p in model.parameters() if id(p) not in fc_params)
        p_fc = sum(p.numel() for fc in fcs for p in fc.parameters())
    b, w, d = batch_per_rank, world, dtype_bytes
    out = {"features_forward": (w - 1) * b * fc_in * d, "features_backward": (w - 1) * b * fc_in * d}
    for name, n in zip(("fc6", "fc7", "fc8"), outs):
        out[f"{name}_forward"] = out[f"{name}_backward"] = (w - 1) * w * b * math.ceil(n / w) * d
    out["conv_allreduce"] = 2 * (w - 1) * math.ceil(p_conv / w) * d
    out["total"] = sum(out.values())
    out["ddp_allreduce"] = 2 * (w - 1) * math.ceil((p_conv + p_fc) / w) * d
    return out
