"""How the Trainer places the model and combines the work of its processes, behind one small interface.

    Single   one device; also the paper's towers (AlexNet.to_towers places each tower itself)
    DDP      data parallel: DistributedDataParallel under torchrun (NCCL on GPUs, gloo on CPUs)
    Hybrid   Krizhevsky's "one weird trick" under torchrun: convs data parallel, FC layers split

The training step is the same for all of them: forward, a loss summed over the readable rows of
this rank's batch, `reduce` (one all-reduce of four numbers under torchrun, nothing in one process),
backward, `finish_gradients`, the optimizer. Checkpoints hold the whole model and optimizer state,
whatever the strategy, so a run can be resumed under another one at an epoch boundary.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastalex import distributed as fdist

__all__ = ["Strategy", "Single", "DDP", "Hybrid", "make", "STRATEGIES"]

STRATEGIES = ("single", "towers", "ddp", "hybrid")


class Strategy:
    """One process, one model: the base every strategy refines.

    model: what the Trainer calls (maybe wrapped); module: the model itself; device: where batches go;
    out_device: where the logits come out (the second tower's device for the towers); dist: rank and
    world size."""

    name = "single"

    def __init__(self, model: torch.nn.Module, device: torch.device, dist: fdist.Env = fdist.Env()):
        self.device, self.dist = device, dist
        self.model = self.module = model if getattr(model, "devices", None) else model.to(device)
        devices = getattr(self.module, "devices", None)
        self.out_device = torch.device(devices[0]) if devices else device

    def reduce(self, stats: torch.Tensor) -> torch.Tensor:
        """Sum a small vector of per-rank numbers over all ranks (in place; the same one returned)."""
        return stats

    def finish_gradients(self) -> None:
        """After backward: whatever the strategy still owes the gradients."""

    def state_dicts(self, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """(model state, optimizer state) of the whole net, the same on every rank (collective)."""
        return self.module.state_dict(), optimizer.state_dict()

    def load_state_dicts(self, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict) -> None:
        self.module.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)

    def eval_model(self) -> torch.nn.Module:
        """The net evaluation runs (no collectives inside it)."""
        return self.module

    def close(self) -> None:
        """Release what the strategy holds (the process group under torchrun)."""


class Single(Strategy):
    """One device, or the paper's two towers on two devices (the model places its towers itself)."""


class _Distributed(Strategy):
    def reduce(self, stats: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(stats)
        return stats

    def close(self) -> None:
        import gc

        self.model = self.module
        gc.collect()  # the DDP reducer and autograd's hooks hold the group: free them before it goes
        fdist.shutdown()


class DDP(_Distributed):
    """Every rank a whole replica; DistributedDataParallel all-reduces the gradients during backward."""

    name = "ddp"

    def __init__(self, model: torch.nn.Module, device: torch.device, dist: fdist.Env):
        from torch.nn.parallel import DistributedDataParallel

        super().__init__(model, device, dist)
        ids = [device] if device.type == "cuda" else None
        self.model = DistributedDataParallel(self.module, device_ids=ids)


class Hybrid(_Distributed):
    """Convs data parallel, FC layers split over the ranks (fastalex.hybrid.HybridAlexNet)."""

    name = "hybrid"

    def __init__(self, model: torch.nn.Module, device: torch.device, dist: fdist.Env):
        from fastalex.hybrid import HybridAlexNet

        super().__init__(HybridAlexNet(model.to(device)), device, dist)

    def finish_gradients(self) -> None:
        self.model.finish_gradients()

    def state_dicts(self, optimizer):
        return self.model.full_state_dict(), self.model.gather_optimizer_state(optimizer)

    def load_state_dicts(self, optimizer, model_state, optimizer_state) -> None:
        self.model.load_full_state_dict(model_state)
        self.model.load_optimizer_state(optimizer, optimizer_state)

    def eval_model(self) -> torch.nn.Module:
        return self.model.full_model()  # gathered: collective


def make(strategy: str, model: torch.nn.Module, device: str, devices: Sequence | None = None) -> Strategy:
    """The strategy named `strategy` over `model`; device "auto" is the GPU (this rank's under
    torchrun) if there is one, else the CPU. Checks the combination before anything is placed."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "towers":
        if devices is None or len(devices) != 2:
            raise ValueError(f"strategy 'towers' needs devices=(device0, device1), one per tower; got {devices!r}")
        if getattr(model, "devices", None) is None:
            if not hasattr(model, "to_towers"):
                raise ValueError("strategy 'towers' needs a fastalex.AlexNet(variant='paper')")
            model = model.to_towers(devices)
        return Single(model, torch.device(model.devices[0]))
    if devices is not None:
        raise ValueError(f"devices is for strategy 'towers' (ddp and hybrid take one device per process from "
                         f"torchrun's LOCAL_RANK); got devices={devices!r} with strategy {strategy!r}")
    if strategy == "single":
        return Single(model, torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto"
                                          else device))
    if getattr(model, "devices", None) is not None:
        raise ValueError(f"strategy {strategy!r} needs a single-device model, not the towers model")
    if device == "auto":
        device = f"cuda:{fdist.env().local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist = fdist.init(device)
    model = model.to(device)
    fdist.broadcast_module(model)  # every rank starts from rank 0's weights
    return (DDP if strategy == "ddp" else Hybrid)(model, device, dist)
