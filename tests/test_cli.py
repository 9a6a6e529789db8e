"""The `fastalex` command on a tiny Fashion-MNIST-format dataset written by the test."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from launch import child_env as _child_env

from fastalex import cli


def _train(data, out, *extra):
    return cli.main(["train", "--data", str(data), "--out", str(out), "--epochs", "2", "-b", "16", "--image-size",
                     "67", "--backend", "torch", "--no-progress", "--lr", "0.01", *extra])


def test_train_writes_results_and_eval_reads_them(tiny_fashion, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tiny_fashion, out) == 0
    final = json.loads((out / "final.json").read_text())
    for key in ("test_top1", "test_top5", "epochs", "wall_seconds", "images_per_second", "device", "backend",
                "variant", "image_size"):
        assert key in final, key
    assert final["epochs"] == 2 and final["test_images"] == 32 and final["image_size"] == [67, 67]
    assert 0.0 <= final["test_top1"] <= final["test_top5"] <= 1.0
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["class_names"][0] == "T-shirt/top" and state["args"]["variant"] == "paper"

    assert cli.main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(tiny_fashion),
                     "--json", str(tmp_path / "eval.json")]) == 0
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["images"] == 32 and res["top1"] == pytest.approx(final["test_top1"])


def test_existing_run_is_not_overwritten_without_asking(tiny_fashion, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tiny_fashion, out, "--epochs", "1") == 0
    before = (out / "checkpoint.pt").read_bytes()
    assert _train(tiny_fashion, out, "--epochs", "1") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before
    # --resume continues the same run to more epochs
    assert _train(tiny_fashion, out, "--resume") == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("argv,msg", [
    (["train", "--epochs", "0"], "--epochs must be at least 1"),
    (["train", "--data", "/nonexistent/fashion"], "/nonexistent/fashion"),
    (["train", "--image-size", "40", "--data", "DATA"], "too small"),
    (["eval", "--checkpoint", "/nonexistent.pt"], "no checkpoint at"),
])
def test_clear_messages(argv, msg, tiny_fashion, capsys):
    argv = [str(tiny_fashion) if a == "DATA" else a for a in argv]
    assert cli.main(argv) == 2
    assert msg in capsys.readouterr().err


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "fastalex", "train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for flag in ("--dataset", "--variant", "--image-size", "--batch-size", "--lr", "--momentum", "--wd",
                 "--precision", "--workers", "--seed", "--subset", "--resume", "--test-only", "--checkpoint-every",
                 "--preset"):
        assert flag in out.stdout, flag


@pytest.mark.parametrize("workers", [["-j", "0"], []])  # in this process; the default: worker processes
def test_imagefolder_with_a_corrupt_image_is_skipped_and_counted(tmp_path, workers):
    from PIL import Image

    rng = np.random.default_rng(1)
    for split, n in (("train", 6), ("val", 4)):
        for c in ("cat", "dog"):
            folder = tmp_path / "data" / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "data" / "train" / "dog" / "bad.jpg").write_bytes(b"definitely not a jpeg")
    out = tmp_path / "run"
    argv = ["train", "--dataset", "imagefolder", "--data", str(tmp_path / "data"), "--out", str(out), "--variant",
            "single", "--image-size", "67", "--epochs", "1", "-b", "4", "--backend", "torch", "--no-progress",
            "--init", "kaiming", *workers]
    if workers:
        with pytest.warns(RuntimeWarning, match="bad.jpg"):
            code = cli.main(argv)
    else:  # a DataLoader worker warns in its own process (forked inside pytest's warning capture: lost
        code = cli.main(argv)  # to the test; a user sees it on stderr): the count still reaches the run
    assert code == 0
    final = json.loads((out / "final.json").read_text())
    assert final["skipped_images"] == 1 and final["test_images"] == 8


def test_strategy_towers_from_the_command_line(tiny_fashion, tmp_path):
    out = tmp_path / "towers"
    assert _train(tiny_fashion, out, "--epochs", "1", "--strategy", "towers", "--devices", "cpu,cpu") == 0
    final = json.loads((out / "final.json").read_text())
    assert final["strategy"] == "towers" and final["devices"] == ["cpu", "cpu"] and final["world_size"] == 1
    # the checkpoint is in the single-device layout: eval loads it into the grouped net
    assert cli.main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(tiny_fashion)]) == 0


@pytest.mark.parametrize("extra,msg", [
    (["--strategy", "towers"], "needs --devices"),
    (["--devices", "cpu,cpu"], "needs --devices DEV0,DEV1 (one per tower), and --devices is only for it"),
    (["--strategy", "towers", "--devices", "cpu"], "must name two devices"),
    (["--strategy", "ddp"], "run under torchrun"),
])
def test_strategy_usage_errors(tiny_fashion, tmp_path, capsys, extra, msg, monkeypatch):
    for var in ("WORLD_SIZE", "MASTER_ADDR", "RANK"):
        monkeypatch.delenv(var, raising=False)
    assert _train(tiny_fashion, tmp_path / "bad", *extra) in (1, 2)
    assert msg in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_through_torchrun_and_the_command(tiny_fashion, tmp_path):
    """The user's command: torchrun -m fastalex train --strategy ddp (2 ranks, gloo)."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "fastalex", "train",
           "--strategy", "ddp", "--data", str(tiny_fashion), "--out", str(out), "--epochs", "1", "-b", "8",
           "--image-size", "67", "--backend", "torch", "--no-progress", "--lr", "0.01"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run(cmd, env=dict(env, OMP_NUM_THREADS="1", FASTALEX_DIST_TIMEOUT="60"), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    final = json.loads((out / "final.json").read_text())
    assert final["strategy"] == "ddp" and final["world_size"] == 2 and final["test_images"] == 32
    assert p.stdout.count("test top-1 accuracy") == 1  # rank 0 alone reports


def test_train_logs_step_rows_and_tensorboard_as_a_user_runs_it(tiny_fashion, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastalex", "train", "--data", str(tiny_fashion), "--out", str(out), "--epochs", "1",
           "-b", "16", "--image-size", "67", "--backend", "torch", "--no-progress", "--log-every", "2", "--tensorboard"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_child_env())
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows] == [("step", 2), ("step", 4), ("epoch", 4)]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    p = subprocess.run([*cmd[:-3], "--log-every", "0", "--overwrite"], capture_output=True, text=True, timeout=120,
                       env=_child_env())
    assert p.returncode == 2 and p.stderr.strip().endswith("--log-every must be at least 1, got 0"), p.stderr


def test_workers_default_to_the_cores_except_for_in_memory_fashion_mnist(tiny_fashion, tmp_path, monkeypatch, capsys):
    import os

    cores = len(os.sched_getaffinity(0))
    for argv in (["train"], ["eval", "--checkpoint", "c.pt"], ["neighbors", "--checkpoint", "c.pt", "--query", "q"]):
        assert cli._parser().parse_args(argv).workers is None, argv  # resolved per dataset
    assert cli.default_workers("fashion-mnist") == 0
    assert cli.default_workers("imagefolder") == min(8, cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))  # torchrun's processes share the cores
    assert cli.default_workers("imagefolder") == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert cli._workers(cli._parser().parse_args(["train", "-j", "0", "--dataset", "imagefolder"]), "imagefolder") == 0
    # through the command: the run records what it used; a negative count is a usage error
    out = tmp_path / "run"
    assert _train(tiny_fashion, out, "--epochs", "1") == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["args"]["workers"] == 0
    assert _train(tiny_fashion, tmp_path / "bad", "-j", "-1") == 2
    assert "--workers must be at least 0" in capsys.readouterr().err
