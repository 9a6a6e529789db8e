"""torch.distributed plumbing for the Trainer: torchrun's environment, the process group, small collectives.

Launch with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT:

    torchrun --nproc-per-node 2 -m fastalex train --strategy ddp
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m fastalex train ...

A rank that cannot reach the others, or a collective that waits on a dead rank, fails after
`$FASTALEX_DIST_TIMEOUT` seconds (default 300) with a message saying what failed, where and after
how long: never a silent hang. torchrun --max-restarts works as it is (see init).
"""

from __future__ import annotations

import datetime as dt
import os
import time
import uuid
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
    """Join the process group torchrun describes (NCCL for CUDA devices, gloo for CPUs), once.

    Under torchrun the workers share the launcher's store, which outlives a worker group: after a
    restart (--max-restarts) it still holds the dead group's keys (its ranks' addresses), and a new
    group reading them fails with "Connection refused" (pytorch/pytorch#135712). So each new group
    first agrees on a generation number no earlier group used (_generation) and keeps its keys
    under fastalex/gen<N>/: nothing for the user to export.
    """
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
    started, stage = time.monotonic(), f"connecting to the store at {where}"
    try:
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's shared store
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), e.world_size,
                                  is_master=False, timeout=limit)
            stage = f"agreeing on a fresh key prefix through the store at {where}"
            gen = _generation(store, e, limit)
            stage = f"forming the {backend} process group (generation {gen}) through the store at {where}"
            dist.init_process_group(backend, store=dist.PrefixStore(f"fastalex/gen{gen}", store), rank=e.rank,
                                    world_size=e.world_size, timeout=limit)
        else:
            stage = f"forming the {backend} process group through the store at {where}"
            dist.init_process_group(backend, timeout=limit)
        # The first collective is what proves every rank is there; it too is bounded by the timeout.
        stage = f"waiting for all {e.world_size} ranks in the first {backend} barrier"
        barrier()
    except Exception as err:  # noqa: BLE001 (re-raised with what happened and what to check)
        shutdown()
        first = str(err).splitlines()[0] if str(err) else ""
        raise DistributedError(
            f"rank {e.rank} of {e.world_size} could not reach the other ranks: {stage} failed after "
            f"{time.monotonic() - started:.1f}s (limit {limit.total_seconds():g}s) with {type(err).__name__}: "
            f"{first}. Check that every node runs torchrun with the same --rdzv-endpoint / MASTER_ADDR:MASTER_PORT, "
            f"that the port is open between machines, and ${TIMEOUT_VAR} for slow starts") from None
    return env()


def _generation(store, e: Env, limit: dt.timedelta) -> int:
    """A number every rank of this group agrees on and no earlier group of the run used.

    torchrun's TORCHELASTIC_RESTART_COUNT is not it: a node restarted for a membership change does
    not count a restart, so nodes can disagree. Instead rank 0 takes the next value of a counter in
    the store, and each other rank learns it by a request under a key only it knows (a random
    token, queued through a second counter), so no rank can read an answer left by a dead group.
    """
    if e.world_size == 1:
        return store.add("fastalex/generation", 1)
    deadline = time.monotonic() + limit.total_seconds()
    if e.rank != 0:
        token = uuid.uuid4().hex
        store.set(f"fastalex/hello/{store.add('fastalex/hellos', 1)}", token)
        gen = int(store.get(f"fastalex/answer/{token}"))  # waits (up to the store's timeout) for rank 0
        store.set(f"fastalex/gen{gen}/joined/{e.rank}", "1")
        return gen
    gen = store.add("fastalex/generation", 1)
    joined = [f"fastalex/gen{gen}/joined/{r}" for r in range(1, e.world_size)]
    pending: set[int] = set()
    scanned = 0
    while not store.check(joined):
        # Answer every request queued so far, old ones too (nobody waits on those: harmless). A request
        # whose writer died between taking its number and writing its token stays pending, unanswered.
        n = store.add("fastalex/hellos", 0)
        pending.update(range(scanned + 1, n + 1))
        scanned = n
        for i in sorted(pending):
            if store.check([f"fastalex/hello/{i}"]):
                store.set(f"fastalex/answer/{store.get(f'fastalex/hello/{i}').decode()}", str(gen))
                pending.discard(i)
        if time.monotonic() > deadline:
            missing = [r for r, key in enumerate(joined, 1) if not store.check([key])]
            raise TimeoutError(f"rank 0 did not hear from ranks {missing}")
        time.sleep(0.01)
    return gen


def lost_peers(err: BaseException) -> bool:
    """Whether err is a collective that failed because another rank went away (died, or timed out)."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Connection refused",
                            "Timed out waiting", "timed out", "ProcessGroupNCCL", "gloo/transport"))


def shutdown() -> None:
    """Leave (destroy) the process group, if this process is in one; safe to call on any exit path."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
