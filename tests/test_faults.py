"""Reproducibility and faults, tested as a user meets them: the `fastalex` command in subprocesses.

The same command with the same seed gives bit-identical checkpoints (single, towers on cpu,cpu, ddp
and hybrid under torchrun with gloo). A run killed anywhere (a real SIGKILL at a named point, set
through $FASTALEX_FAULT; a real SIGINT from outside for Ctrl-C) and resumed with --resume ends
bit-identical to the undisturbed run. A damaged latest checkpoint falls back to the one before it.

The runs: the paper preset (dropout, crops, flips, PCA colour noise, ten-crop test, so everything
random is exercised) at 67x67 on the tiny Fashion-MNIST fixture: 64 training images, batch 16 (4 steps
an epoch), 2 epochs, a checkpoint every 3 steps (saves at steps 3, 4 (epoch end), 6, 8 (epoch end)).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch import child_env as _env, free_port as _free_port


def _flags(data, seed=5):
    return ["--data", str(data), "--preset", "paper", "--image-size", "67", "--epochs", "2", "-b", "16",
            "--lr", "0.01", "--init", "kaiming", "--seed", str(seed), "--checkpoint-every", "3", "--backend", "torch",
            "--no-progress"]


def _command(data, out, *extra, ranks=0, seed=5, torchrun=()):
    """`fastalex train ...`, under `torchrun --nproc-per-node RANKS *torchrun` (static rendezvous, as in the
    README) if ranks."""
    launch = [sys.executable, "-m", "fastalex"]
    if ranks:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
                  str(_free_port()), *torchrun, "-m", "fastalex"]
    return [*launch, "train", *_flags(data, seed), "--out", str(out), *extra]


def _run(cmd, expect=0, timeout=300, **env):
    p = subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == expect, f"exit {p.returncode}, expected {expect}\n{p.stdout[-2000:]}\n{p.stderr[-5000:]}"
    return p


def _state(out, name="checkpoint.pt"):
    return torch.load(Path(out) / name, weights_only=True)


def _tensors(obj, prefix=""):
    """Every tensor in a nested checkpoint, by path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def assert_bit_identical(a: dict, b: dict):
    """Weights, optimizer state, progress and the per-epoch losses and errors all equal, bit for bit."""
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    for part in ("model", "optimizer"):
        ta, tb = dict(_tensors(a[part])), dict(_tensors(b[part]))
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{part}{k} differs"
    keys = ("epoch", "step", "train_loss", "val_top1_error", "val_top5_error", "val_loss")
    assert [{k: h.get(k) for k in keys} for h in a["history"]] == [{k: h.get(k) for k in keys} for h in b["history"]]


@pytest.fixture(scope="module")
def reference(tiny_fashion, tmp_path_factory):
    """The undisturbed single-process run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _run(_command(tiny_fashion, out))
    yield out
    shutil.rmtree(out.parent, ignore_errors=True)  # 300 MB of checkpoints


def test_same_seed_same_run_and_another_seed_another(tiny_fashion, reference, tmp_path):
    _run(_command(tiny_fashion, tmp_path / "again"))
    assert_bit_identical(_state(tmp_path / "again"), _state(reference))
    _run(_command(tiny_fashion, tmp_path / "other", seed=6))
    other, ref = _state(tmp_path / "other"), _state(reference)
    # the seed decides the initial weights too (they used to come from the unseeded global RNG)
    assert not torch.equal(other["model"]["features.conv1.weight"], ref["model"]["features.conv1.weight"])


@pytest.mark.slow
def test_towers_on_two_cpus_same_seed_same_run(tiny_fashion, tmp_path):
    towers = ("--strategy", "towers", "--devices", "cpu,cpu")
    _run(_command(tiny_fashion, tmp_path / "a", *towers))
    _run(_command(tiny_fashion, tmp_path / "b", *towers))
    assert_bit_identical(_state(tmp_path / "a"), _state(tmp_path / "b"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "hybrid"])
def test_torchrun_same_seed_same_run(tiny_fashion, tmp_path, strategy):
    for name in ("a", "b"):
        _run(_command(tiny_fashion, tmp_path / name, "--strategy", strategy, "-b", "8", ranks=2))
    assert_bit_identical(_state(tmp_path / "a"), _state(tmp_path / "b"))


# (fault, what the resumed run starts from)
FAULTS = {
    "first-epoch": "step=4",                  # after step 4 (epoch 1's last): resumes from step 3's checkpoint
    "after-epoch-checkpoint": "epoch-saved=1",  # just after epoch 1's checkpoint: resumes from it
    "validation": "validation=2",             # during epoch 2's validation: resumes from step 6
    "final-test": "test=1",                   # during the ten-crop test: all epochs done, resumes to test
    "checkpoint-write": "checkpoint-write=3",  # writing step 6's checkpoint (3rd write; best.pt is a link): from 4
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_sigkill_anywhere_then_resume_is_bit_identical(tiny_fashion, reference, tmp_path, fault):
    out = tmp_path / "run"
    _run(_command(tiny_fashion, out), expect=-signal.SIGKILL, FASTALEX_FAULT=FAULTS[fault])
    assert not (out / "final.json").exists()
    _run(_command(tiny_fashion, out, "--resume"))
    assert_bit_identical(_state(out), _state(reference))
    assert (out / "final.json").exists()
    assert not list(out.glob(".*.tmp")), "a killed write's temporary file was left behind"


def _interrupt(cmd, out, **env) -> subprocess.CompletedProcess:
    """Run cmd, press Ctrl-C (SIGINT to the process group, as a terminal does) once the first checkpoint is there."""
    proc = subprocess.Popen(cmd, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            assert time.monotonic() < deadline, "the run never wrote its first checkpoint"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_ctrl_c_then_resume_is_bit_identical(tiny_fashion, reference, tmp_path):
    out = tmp_path / "run"
    p = _interrupt(_command(tiny_fashion, out), out)
    assert p.returncode == 130, p.stderr[-3000:]
    assert "Continue with: fastalex train --resume" in p.stderr
    assert _state(out)["step"] < 8
    _run(_command(tiny_fashion, out, "--resume"))
    assert_bit_identical(_state(out), _state(reference))


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tiny_fashion, reference, tmp_path):
    out = tmp_path / "run"
    _run(_command(tiny_fashion, out), expect=-signal.SIGKILL, FASTALEX_FAULT="validation=2")
    assert _state(out)["step"] == 6 and _state(out, "checkpoint.prev.pt")["step"] == 4
    latest = out / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[:200_000])  # a disk fault: the file cut short
    p = _run(_command(tiny_fashion, out, "--resume"))
    said = [line for line in p.stderr.splitlines() if "checkpoint" in line]
    assert said == [f"fastalex: {latest} is not a readable fastalex checkpoint: it is truncated or corrupt; "
                    f"continuing from {out / 'checkpoint.prev.pt'} (step 4)"], p.stderr
    assert_bit_identical(_state(out), _state(reference))
    # neither readable: one line naming both, exit 2, no traceback
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (out / name).write_bytes(b"\0" * 1000)
    p = _run(_command(tiny_fashion, out, "--resume"), expect=2)
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"{latest} is not a readable fastalex checkpoint" in p.stderr
    assert "checkpoint.prev.pt is not a readable fastalex checkpoint" in p.stderr
    assert "weights_only=False" not in p.stderr


DDP = ("--strategy", "ddp", "-b", "8")  # two gloo ranks, 8 images each: the same 4 steps an epoch


@pytest.fixture(scope="module")
def ddp_reference(tiny_fashion, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-reference") / "run"
    _run(_command(tiny_fashion, out, *DDP, ranks=2))
    yield out
    shutil.rmtree(out.parent, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("fault", [*FAULTS, "ctrl-c"])
def test_ddp_fault_then_resume_is_bit_identical(tiny_fashion, ddp_reference, tmp_path, fault):
    """A rank killed (rank 0 for the checkpoint write: it alone writes), torchrun stops, then --resume."""
    out = tmp_path / "run"
    if fault == "ctrl-c":
        p = _interrupt(_command(tiny_fashion, out, *DDP, ranks=2), out)
        assert p.returncode != 0 and not (out / "final.json").exists(), p.stderr[-3000:]
    else:
        rank = 0 if fault == "checkpoint-write" else 1
        _run(_command(tiny_fashion, out, *DDP, ranks=2), expect=1, FASTALEX_FAULT=f"{FAULTS[fault]},rank={rank}")
        assert not (out / "final.json").exists()
    _run(_command(tiny_fashion, out, *DDP, "--resume", ranks=2))
    assert_bit_identical(_state(out), _state(ddp_reference))


@pytest.mark.slow
def test_torchrun_restarts_survive_killed_workers_with_nothing_exported(tiny_fashion, ddp_reference, tmp_path):
    """Plain `torchrun --max-restarts 3`: a worker killed three times (ranks 1, 0, 1, at different steps);
    each time the group restarts and continues from the last checkpoint, and the run ends with the
    undisturbed run's weights. (Before fastalex kept each group's keys apart, a restarted group read the
    dead one's addresses from torchrun's store and failed, intermittently, with "Connection refused".)"""
    out = tmp_path / "run"
    # (each process counts its own steps: restart 1 resumes at step 3, so its 3rd step is the run's 6th)
    faults = "step=4,rank=1,restart=0;step=3,rank=0,restart=1;validation=1,rank=1,restart=2"
    p = _run(_command(tiny_fashion, out, *DDP, ranks=2, torchrun=("--max-restarts", "3")), FASTALEX_FAULT=faults)
    # (the survivor of each kill may first say it lost its peer, if torchrun has not stopped it yet)
    said = [line for line in p.stderr.splitlines() if line.startswith("fastalex: restarted")]
    assert said == [f"fastalex: restarted by torchrun; continuing from step {s}" for s in (3, 6, 6)], p.stderr[-4000:]
    assert all("lost the other ranks" in line for line in p.stderr.splitlines()
               if line.startswith("fastalex:") and line not in said)
    assert_bit_identical(_state(out), _state(ddp_reference))


@pytest.mark.parametrize("command", ["eval", "predict", "neighbors", "filters"])
def test_a_file_that_is_not_a_checkpoint_gets_one_line(tmp_path, reference, command, capsys):
    from fastalex import cli

    image = tmp_path / "shoe.png"
    from PIL import Image

    Image.new("L", (28, 28)).save(image)
    cut = tmp_path / "cut.pt"
    cut.write_bytes((reference / "checkpoint.pt").read_bytes()[:200_000])
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    extra = {"eval": [], "predict": [str(image)], "neighbors": ["--query", str(image), "--out", str(tmp_path / "n.png")],
             "filters": ["--out", str(tmp_path / "f.png")]}[command]
    for path, why in ((cut, "it is truncated or corrupt"), (text, "it is not a PyTorch checkpoint file")):
        assert cli.main([command, "--checkpoint", str(path), *extra]) == 2
        err = capsys.readouterr().err
        assert err == f"fastalex: {path} is not a readable fastalex checkpoint: {why}\n"


def test_deterministic_flag_runs_and_changes_nothing_on_the_cpu(tiny_fashion, reference, tmp_path):
    """--deterministic (torch.use_deterministic_algorithms, cuDNN's flags): on the CPU, where the run is
    bit-exact anyway, it gives the very same run."""
    _run(_command(tiny_fashion, tmp_path / "det", "--deterministic"))
    assert_bit_identical(_state(tmp_path / "det"), _state(reference))


def test_python_api_same_seed_same_weights(tmp_path):
    """AlexNet(seed=) and Trainer(seed=) from Python: two runs, the global RNG disturbed in between."""
    import fastalex
    from dist_driver import Blobs

    runs = []
    for i, noise in enumerate((0, 12345)):
        torch.manual_seed(noise)
        torch.rand(noise % 7 + 1)
        model = fastalex.AlexNet(num_classes=4, variant="paper", image_size=67, init="kaiming", seed=11)
        with fastalex.backend("torch"):
            t = fastalex.Trainer(model, epochs=1, batch_size=8, lr=0.01, out_dir=tmp_path / str(i), progress=False,
                                 seed=11)  # dropout 0.5 (the paper's) and Blobs' random flips: both seeded
            t.fit(Blobs(16, 67))
        runs.append(_state(tmp_path / str(i)))
    assert_bit_identical(*runs)


@pytest.mark.slow
def test_a_rank_that_loses_its_peer_says_so_in_one_line(tiny_fashion, tmp_path):
    """Two ranks started by hand (no torchrun to stop the survivor); rank 1 killed after step 2: rank 0's
    next collective fails, and it says what, where and when, and exits 1, leaving the group in order."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   FASTALEX_FAULT="step=2,rank=1")
        procs.append(subprocess.Popen(_command(tiny_fashion, tmp_path / "run", *DDP), env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode == 1, outs[0][1][-3000:]
    said = [line for line in outs[0][1].splitlines() if line.startswith("fastalex:")]
    assert len(said) == 1 and "Traceback" not in outs[0][1], outs[0][1][-3000:]
    assert re.match(r"fastalex: rank 0 of 2 lost the other ranks at epoch 1, step 2 \(\d+\.\ds after its last "
                    r"completed step; collectives wait at most \$FASTALEX_DIST_TIMEOUT = 60s\): \w+: .+", said[0]), said
