"""torch.distributed plumbing for the Trainer: torchrun's environment, the process group, small collectives.

Launch with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT:

    torchrun --nproc-per-node 2 -m fastalex train --strategy ddp
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m fastalex train ...

A rank that cannot reach the others, or a collective that waits on a dead rank, fails after
`$FASTALEX_DIST_TIMEOUT` seconds (default 300) with a message saying so: never a silent hang.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

TIMEOUT_VAR = "FASTALEX_DIST_TIMEOUT"


class DistributedError(RuntimeError):
    """The process group could not be formed or used (unreachable rank, missing torchrun environment)."""


@dataclass(frozen=True)
class Env:
    """Where this process stands: rank, world_size and local_rank (0, 1, 0 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env() -> Env:
    """This process's place in the group: from the initialised process group, else torchrun's variables."""
    if dist.is_available() and dist.is_initialized():
        return Env(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    try:
        return Env(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as e:
        raise RuntimeError(f"torchrun's RANK/WORLD_SIZE/LOCAL_RANK must be integers: {e}") from None


def timeout() -> dt.timedelta:
    raw = os.environ.get(TIMEOUT_VAR, "300")
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"${TIMEOUT_VAR} must be a number of seconds, got {raw!r}") from None
    if seconds <= 0:
        raise ValueError(f"${TIMEOUT_VAR} must be positive, got {raw!r}")
    return dt.timedelta(seconds=seconds)


def init(device: torch.device) -> Env:
    """Join the process group torchrun describes (NCCL for CUDA devices, gloo for CPUs), once."""
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if dist.is_initialized():
        return env()
    if "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise DistributedError("strategy 'ddp' and 'hybrid' run under torchrun, e.g. "
                           "`torchrun --nproc-per-node 2 -m fastalex train --strategy ddp`: RANK, WORLD_SIZE, "
                           "MASTER_ADDR and MASTER_PORT are not set")
    e, limit = env(), timeout()
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=limit)
        # The first collective is what proves every rank is there; it too is bounded by the timeout.
        barrier()
    except Exception as err:  # noqa: BLE001 (re-raised with what happened and what to check)
        raise DistributedError(
            f"rank {e.rank} of {e.world_size} could not reach the other ranks at {where} within "
            f"{limit.total_seconds():g}s ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            f"Check that every node runs torchrun with the same --rdzv-endpoint / MASTER_ADDR:MASTER_PORT, that "
            f"the port is open between machines, and ${TIMEOUT_VAR} for slow starts") from None
    return env()


def barrier() -> None:
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums of a few numbers over all ranks (float64, so counts stay exact)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj) -> list:
    """Every rank's obj, in rank order (just [obj] outside a group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Every rank takes rank src's parameters and buffers."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        with torch.no_grad():
            for t in module.state_dict().values():
                dist.broadcast(t, src)
