"""Training strategies on CPUs: DDP and hybrid under torchrun (gloo, loopback), towers on ("cpu", "cpu"),
two nodes through torchrun's rendezvous, a worker killed and restarted, and an unreachable rank.

Each run is compared with one process training on the combined batch: same data order, same steps.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastalex
import dist_driver
from launch import child_env as _env, free_port as _free_port

DRIVER = Path(dist_driver.__file__)
ROOT = DRIVER.parent.parent


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _driver_args(out, strategy, kind, batch, epochs=2, every=0, slow=0.0) -> list[str]:
    return [str(DRIVER), str(out), strategy, kind, str(batch), str(epochs), str(every), str(slow)]


def _run(cmd, timeout=240, **env):
    p = subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def _single(tmp_path, kind, batch, epochs=2, unreadable=()) -> dict:
    """One process, the combined batch: the reference."""
    train, val = dist_driver.data(kind, unreadable=unreadable)
    with fastalex.backend("torch"):
        t = fastalex.Trainer(dist_driver.build(kind), epochs=epochs, batch_size=batch, lr=dist_driver.lr(kind),
                             out_dir=tmp_path / "single", progress=False, seed=7)
        t.fit(train, val)
    return {"model": t.module.state_dict(), "step": t.step, "history": t.history, "skipped": t.skipped_images}


def _assert_same_params(a: dict, b: dict, rtol=1e-4):
    assert a.keys() == b.keys()
    for k in a:
        err = (a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-12)
        assert err < rtol, (k, err.item())


def _standalone(n: int) -> list[str]:
    return ["--nnodes", "1", "--nproc-per-node", str(n), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{_free_port()}"]


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process_on_the_combined_batch(tmp_path):
    _run(_torchrun(*_standalone(2), *_driver_args(tmp_path / "ddp", "ddp", "plain", 4)))
    got = torch.load(tmp_path / "ddp" / "final.pt", weights_only=True)
    ref = _single(tmp_path, "plain", 8)
    assert got["step"] == ref["step"] == 24
    _assert_same_params(got["model"], ref["model"])
    # metrics reduced over ranks: the same training loss and validation error as one process
    for g, r in zip(got["history"], ref["history"]):
        assert g["train_loss"] == pytest.approx(r["train_loss"], rel=1e-4)
        assert g["val_top1_error"] == pytest.approx(r["val_top1_error"], abs=1e-9)
    assert got["describe"]["strategy"] == "ddp" and got["describe"]["world_size"] == 2
    # rank 0 alone wrote the run's files
    assert (tmp_path / "ddp" / "metrics.jsonl").read_text().count("\n") == 2


@pytest.mark.slow
def test_two_nodes_through_torchrun_rendezvous(tmp_path):
    port = _free_port()
    node = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-id", "fastalex-test",
            "--rdzv-endpoint", f"127.0.0.1:{port}"]
    cmd = _torchrun(*node, *_driver_args(tmp_path / "nodes", "ddp", "plain", 4))
    procs = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-4000:]
    got = torch.load(tmp_path / "nodes" / "final.pt", weights_only=True)
    _assert_same_params(got["model"], _single(tmp_path, "plain", 8)["model"])


@pytest.mark.slow
def test_hybrid_equals_one_process(tmp_path):
    # 6 images a rank (12 a step): at 3 a rank the run diverges (training loss ~19 for 4 classes), and
    # in that regime float rounding differences grew to 8e-4 in fc6.bias on one machine (1e-7 at 6).
    _run(_torchrun(*_standalone(2), *_driver_args(tmp_path / "hybrid", "hybrid", "alexnet", 6, epochs=2)))
    got = torch.load(tmp_path / "hybrid" / "final.pt", weights_only=True)
    ref = _single(tmp_path, "alexnet", 12, epochs=2)
    assert got["step"] == ref["step"] == 8
    _assert_same_params(got["model"], ref["model"])
    assert got["describe"]["strategy"] == "hybrid"


def _epoch0_order(n: int) -> list[int]:
    """The training images in the order epoch 0 takes them (seed 7, as the driver's Trainer)."""
    from fastalex.trainer import _EpochBatches

    return [i for batch in _EpochBatches(n, n, 7, 0) for _, i in batch]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "hybrid"])
def test_unreadable_images_keep_ranks_in_step_and_equal_one_process(tmp_path, strategy):
    # Per rank B images a step, global batch 2B. In epoch 0: rank 1 reads nothing at step 1, no rank
    # reads anything at step 2, rank 0 misses one image at step 3 (other epochs: wherever they fall).
    kind, b = ("plain", 4) if strategy == "ddp" else ("alexnet", 3)
    epochs = 2 if strategy == "ddp" else 1
    order = _epoch0_order(96 if kind == "plain" else 48)
    bad = order[3 * b:4 * b] + order[4 * b:6 * b] + order[6 * b + 1:6 * b + 2]
    _run(_torchrun(*_standalone(2), *_driver_args(tmp_path / strategy, strategy, kind, b, epochs=epochs)),
         DRIVER_UNREADABLE=",".join(map(str, bad)))
    got = torch.load(tmp_path / strategy / "final.pt", weights_only=True)
    ref = _single(tmp_path, kind, 2 * b, epochs=epochs, unreadable=bad)
    assert got["step"] == ref["step"]
    assert got["describe"]["skipped_train_images"] == ref["skipped"] == len(bad) * epochs  # counted over ranks
    _assert_same_params(got["model"], ref["model"])
    for g, r in zip(got["history"], ref["history"]):
        assert g["train_loss"] == pytest.approx(r["train_loss"], rel=1e-4)


def test_towers_on_two_cpus_equal_the_grouped_model(tmp_path):
    torch.manual_seed(0)
    model = fastalex.AlexNet(num_classes=4, variant="paper", image_size=67, dropout=0.0, init="kaiming")
    train = dist_driver.Blobs(16, 67)
    results = {}
    for strategy, devices in (("single", None), ("towers", ("cpu", "cpu"))):
        m = fastalex.AlexNet(num_classes=4, variant="paper", image_size=67, dropout=0.0)
        m.load_state_dict(model.state_dict())
        with fastalex.backend("torch"):
            t = fastalex.Trainer(m, epochs=1, batch_size=8, lr=0.05, out_dir=tmp_path / strategy, progress=False,
                                 seed=3, strategy=strategy, devices=devices)
            t.fit(train)
        results[strategy] = t.module.state_dict()
        if strategy == "towers":
            assert t.module.devices is not None and t.describe()["devices"] == ["cpu", "cpu"]
    _assert_same_params(results["towers"], results["single"])
    # the towers run's checkpoint is in the single-device layout: it loads into the grouped model
    state = torch.load(tmp_path / "towers" / "checkpoint.pt", weights_only=True)
    fastalex.AlexNet(num_classes=4, variant="paper", image_size=67).load_state_dict(state["model"])


@pytest.mark.slow
def test_killed_worker_restarts_from_checkpoint_and_ends_like_an_undisturbed_run(tmp_path):
    out = tmp_path / "faults"
    cmd = _torchrun(*_standalone(2), "--max-restarts", "1",
                    *_driver_args(out, "ddp", "plain", 4, epochs=3, every=2, slow=0.02))
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "pid.1.0").exists() and (out / "checkpoint.pt").exists()):
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            assert time.monotonic() < deadline, "the run never wrote its first checkpoint"
            time.sleep(0.05)
        time.sleep(0.3)  # a few steps past the checkpoint: those are lost and redone
        os.kill(int((out / "pid.1.0").read_text()), 9)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-4000:]
    assert (out / "pid.0.1").exists() and (out / "pid.1.1").exists(), "torchrun did not restart the workers"
    got = torch.load(out / "final.pt", weights_only=True)
    ref = _single(tmp_path, "plain", 8, epochs=3)
    assert got["step"] == ref["step"] == 36
    _assert_same_params(got["model"], ref["model"], rtol=1e-5)


def test_unreachable_rank_fails_with_a_clear_message_in_bounded_time(tmp_path):
    env = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               FASTALEX_DIST_TIMEOUT="3")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, *_driver_args(tmp_path, "ddp", "plain", 4)], env=_env(**env),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    # what failed, where, after how long (the limit it had)
    m = re.search(r"rank 1 of 2 could not reach the other ranks: forming the gloo process group through the "
                  r"store at 127\.0\.0\.1:(\d+) failed after (\d+\.\d)s \(limit 3s\)", p.stderr)
    assert m and int(m.group(1)) == int(env["MASTER_PORT"]), p.stderr[-3000:]
    assert 2.5 <= float(m.group(2)) < 60
    assert time.monotonic() - t0 < 90


def test_strategy_argument_errors(tmp_path, monkeypatch):
    model = dist_driver.build("plain")
    with pytest.raises(ValueError, match="strategy must be one of"):
        fastalex.Trainer(model, epochs=1, out_dir=tmp_path, strategy="fsdp")
    with pytest.raises(ValueError, match="needs devices"):
        fastalex.Trainer(model, epochs=1, out_dir=tmp_path, strategy="towers")
    with pytest.raises(ValueError, match="needs a fastalex.AlexNet"):
        fastalex.Trainer(model, epochs=1, out_dir=tmp_path, strategy="towers", devices=("cpu", "cpu"))
    with pytest.raises(ValueError, match="devices is for strategy 'towers'"):
        fastalex.Trainer(model, epochs=1, out_dir=tmp_path, devices=("cpu", "cpu"))
    from fastalex.distributed import DistributedError

    for var in ("WORLD_SIZE", "MASTER_ADDR", "RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DistributedError, match="run under torchrun"):
        fastalex.Trainer(model, epochs=1, out_dir=tmp_path, strategy="ddp")


@pytest.mark.slow
def test_perf_dist_check_runs_on_cpus(tmp_path):
    """perf.dist_check (the GPU session's towers and DDP check) end to end with --device cpu."""
    import json

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    p = _run([sys.executable, "-m", "perf.dist_check", "--device", "cpu", "--out", str(tmp_path / "out")],
             timeout=300, TMPDIR=str(scratch))
    # (torchrun leaves an empty torchelastic_* folder of its own)
    left = sum(f.stat().st_size for f in scratch.rglob("*") if f.is_file())
    assert left < 1 << 20, f"perf.dist_check left {left} bytes of scratch checkpoints in $TMPDIR"
    got = json.loads((tmp_path / "out" / "dist_check.json").read_text())
    assert got["card"] == "cpu" and len(got["results"]) == 2, p.stdout
    for r in got["results"]:
        assert r["ok"] and r["rel_err"] < 1e-3, r
    assert got["results"][1]["describe"]["strategy"] == "ddp"


def test_each_worker_group_agrees_on_a_generation_no_earlier_group_used():
    """fastalex.distributed._generation over a real TCPStore: the ranks of a group agree, a later group
    gets a new number, and what dead groups left (requests answered or not, a request number taken with
    no token written) changes nothing."""
    import datetime as dt
    import threading

    from torch.distributed import TCPStore

    from fastalex.distributed import Env, _generation

    limit = dt.timedelta(seconds=20)
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=limit)
    port = server.port

    def group(world: int) -> list[int]:
        got = [None] * world

        def rank(r):
            store = TCPStore("127.0.0.1", port, is_master=False, timeout=limit)
            got[r] = _generation(store, Env(r, world, r), limit)

        threads = [threading.Thread(target=rank, args=(r,)) for r in reversed(range(world))]  # rank 0 last
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return got

    first = group(3)
    assert first[0] is not None and len(set(first)) == 1
    # a dead group: rank 1 queued a request nobody answered; rank 2 took a number and died before its token
    server.set(f"fastalex/hello/{server.add('fastalex/hellos', 1)}", "stale-token")
    server.add("fastalex/hellos", 1)
    second = group(3)
    assert len(set(second)) == 1 and second[0] > first[0]
    third = group(2)
    assert len(set(third)) == 1 and third[0] > second[0]
