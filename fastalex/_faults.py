"""Fault injection for the fault-tolerance tests: a real signal at a named point of a real run.

    FASTALEX_FAULT="step=3"                         # SIGKILL this process after its 3rd training step
    FASTALEX_FAULT="validation=1,signal=INT"        # Ctrl-C's SIGINT during the first validation
    FASTALEX_FAULT="step=2,rank=1,restart=0;step=5,rank=0,restart=1"   # several faults, under torchrun

Points: step (after an optimizer step), epoch-saved (just after an epoch's checkpoint is written),
validation and test (after the first batch of a validation / the final test evaluation),
checkpoint-write (inside a checkpoint write: the temporary file written, not yet renamed).
`=N` fires at the N-th time this process reaches the point. rank / restart: only on that rank
(torchrun's RANK) / restart (TORCHELASTIC_RESTART_COUNT). Unset (as always outside the tests), a
point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

VAR = "FASTALEX_FAULT"
POINTS = ("step", "epoch-saved", "validation", "test", "checkpoint-write")


def _parse(text: str) -> list[dict]:
    faults = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        try:
            fields = dict(kv.split("=", 1) for kv in part.split(","))
            point = next(k for k in fields if k in POINTS)
            fault = {"point": point, "at": int(fields[point]), "signal": fields.get("signal", "KILL"),
                     "rank": fields.get("rank"), "restart": fields.get("restart")}
        except (ValueError, StopIteration):
            raise ValueError(f"${VAR}: each fault is POINT=N[,signal=KILL|INT][,rank=R][,restart=K] with POINT one "
                             f"of {POINTS}; got {part!r}") from None
        if not hasattr(signal, "SIG" + fault["signal"]):
            raise ValueError(f"${VAR}: no signal SIG{fault['signal']} (in {part!r})")
        faults.append(fault)
    return faults


_FAULTS = _parse(os.environ.get(VAR, ""))
_SEEN: dict[str, int] = {}


def point(name: str) -> None:
    """Deliver the configured signal to this process if a fault is set for this point (and count)."""
    if not _FAULTS:
        return
    _SEEN[name] = _SEEN.get(name, 0) + 1
    for f in _FAULTS:
        if f["point"] != name or f["at"] != _SEEN[name]:
            continue
        if f["rank"] is not None and f["rank"] != os.environ.get("RANK", "0"):
            continue
        if f["restart"] is not None and f["restart"] != os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"):
            continue
        os.kill(os.getpid(), getattr(signal, "SIG" + f["signal"]))
