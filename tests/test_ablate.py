"""perf.ablate: the paper's ablations, on a tiny Fashion-MNIST written by the test (torch's ops, a few steps)."""

import json
import math

import pytest
import torch

from perf import ablate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_KEYS = {"run", "model", "steps", "diverged_at_step", "train_seconds", "eval_seconds", "images_per_second",
            "epochs", "final_train_loss", "final_train_error", "steps_to_25", "epochs_to_25", "seconds_to_25",
            "steps_to_converge", "epochs_to_converge", "seconds_to_converge", "test_top1_error", "test_top5_error",
            "test_loss", "test_images", "seconds_per_step", "curve"}


def _tiny(data, out, *extra):
    """The driver on a tiny budget: 3 steps of 8 per run at 67x67, the 32 test images."""
    return ablate.main(["--data", str(data), "--out", str(out), "--steps", "3", "-b", "8", "--image-size", "67",
                        "--warmup-steps", "1", "--window", "2", "--test-images", "32", "--device", "cpu",
                        "--no-progress", *extra])


def test_all_runs_write_json_markdown_and_png(tiny_fashion, tmp_path, capsys):
    out = tmp_path / "sub" / "ablate"  # parent folders get made
    assert _tiny(tiny_fashion, out) == 0
    printed = capsys.readouterr().out
    assert "vs the paper" in printed and "relu-vs-tanh" in printed

    result = json.loads((out / "ablate.json").read_text())
    assert list(result["runs"]) == list(ablate.RUNS)  # the baseline first
    assert result["settings"]["train_images"] == 64 and result["environment"]["backend"] == "torch"
    for name, r in result["runs"].items():
        assert set(r) == RUN_KEYS, name
        assert r["steps"] == 3 and r["diverged_at_step"] is None and r["test_images"] == 32
        assert r["train_seconds"] > 0 and r["epochs"] == pytest.approx(3 * 8 / 64)
        assert 0 <= r["test_top5_error"] <= r["test_top1_error"] <= 1
        assert all(len(c) == 3 for c in r["curve"].values())
        assert r["final_train_error"] == pytest.approx(sum(r["curve"]["batch_error"][-2:]) / 2)
        assert math.isfinite(r["final_train_loss"])
        if r["steps_to_25"] is None:
            assert r["seconds_to_25"] is None and r["epochs_to_25"] is None
    assert result["runs"]["tanh"]["model"]["activation"] == "tanh"
    assert result["runs"]["pool22"]["model"]["pool"] == [2, 2]
    assert result["runs"]["no-lrn"]["model"]["lrn"] is False and result["runs"]["dropout"]["model"]["dropout"] == 0.5

    comps = {c["name"]: c for c in result["comparisons"]}
    assert list(comps) == ["relu-vs-tanh", "lrn", "pooling", "dropout"]
    assert comps["relu-vs-tanh"]["metrics"][0]["paper"] == 6.0 and comps["dropout"]["metrics"][0]["paper"] == 2.0
    lrn = comps["lrn"]["metrics"][0]
    runs = result["runs"]
    assert lrn["paper"] == 1.4
    assert lrn["measured"] == pytest.approx(100 * (runs["no-lrn"]["test_top1_error"] - runs["relu"]["test_top1_error"]))

    md = (out / "ablate.md").read_text()
    assert "| run | steps |" in md and "| comparison | metric | measured | paper |" in md
    for name in ablate.RUNS:
        assert f"| {name} |" in md
    png = (out / "ablate.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    import matplotlib.image

    img = matplotlib.image.imread(out / "ablate.png")
    assert img.shape[1] > 3 * img.shape[0]  # four panels side by side


def test_subset_of_runs_always_has_the_baseline_and_honours_paths(tiny_fashion, tmp_path):
    out, js, md = tmp_path / "out", tmp_path / "a" / "r.json", tmp_path / "b" / "r.md"
    assert _tiny(tiny_fashion, out, "--runs", "tanh", "--json", str(js), "--markdown", str(md), "--steps", "2",
                 "--subset", "16") == 0
    result = json.loads(js.read_text())
    assert list(result["runs"]) == ["relu", "tanh"]
    assert [c["name"] for c in result["comparisons"]] == ["relu-vs-tanh"]
    assert result["settings"]["train_images"] == 16 and result["runs"]["relu"]["epochs"] == 1.0
    assert md.read_text().startswith("**") and (out / "ablate.png").read_bytes().startswith(PNG_MAGIC)
    assert not (out / "ablate.json").exists()


def test_a_diverging_run_is_cut_at_its_last_finite_step(tiny_fashion, tmp_path):
    assert _tiny(tiny_fashion, tmp_path, "--runs", "relu", "--lr", "1e30", "--warmup-steps", "0",
                 "--steps", "4") == 0
    r = json.loads((tmp_path / "ablate.json").read_text())["runs"]["relu"]  # strict JSON: no NaN in it
    assert r["diverged_at_step"] is not None and r["steps"] == r["diverged_at_step"] - 1
    assert r["test_top1_error"] is None and len(r["curve"]["batch_loss"]) == r["steps"]
    assert all(math.isfinite(v) for v in r["curve"]["batch_loss"])


def test_steps_to_target():
    curve = [0.9, 0.6, 0.3, 0.26, 0.25, 0.31, 0.1]
    assert ablate.steps_to_target(curve, 0.25) == 5  # 1-based; equal counts as reached
    assert ablate.steps_to_target(curve, 0.9) == 1
    assert ablate.steps_to_target(curve, 0.05) is None  # never reached
    assert ablate.steps_to_target([], 0.25) is None
    # On the running mean a single lucky batch does not count.
    noisy = [0.9, 0.9, 0.1, 0.9, 0.5, 0.3, 0.2, 0.2]
    smooth = ablate.running_mean(noisy, 3)
    assert smooth[:3] == pytest.approx([0.9, 0.9, 1.9 / 3]) and smooth[-1] == pytest.approx(0.7 / 3)
    assert ablate.steps_to_target(noisy, 0.25) == 3 and ablate.steps_to_target(smooth, 0.25) == 8


def test_running_mean_and_images_seen():
    assert ablate.running_mean([1.0, 2.0, 3.0, 4.0], 1) == [1.0, 2.0, 3.0, 4.0]
    assert ablate.running_mean([1.0, 2.0, 3.0, 4.0], 10) == pytest.approx([1.0, 1.5, 2.0, 2.5])
    with pytest.raises(ValueError, match="window"):
        ablate.running_mean([1.0], 0)
    # full batches only: 100 images in batches of 32 are 3 steps an epoch; a batch larger than the set is all of it
    assert [ablate.images_seen(s, 100, 32) for s in (0, 1, 3, 4)] == [0, 32, 96, 128]
    assert ablate.images_seen(2, 16, 32) == 32


def test_runs_train_on_the_trainer_with_full_batches_for_exactly_their_steps():
    seen = []

    class Ids(ablate._OnDevice):  # records the batches the Trainer asks for
        def get_batch(self, epoch, indices):
            seen.append((epoch, list(indices)))
            return super().get_batch(epoch, indices)

    data = Ids(torch.randn(100, 1, 4, 4), torch.randint(0, 3, (100,)))
    s = dict(batch_size=32, lr=0.01, momentum=0.9, wd=0.0, lr_schedule="constant", warmup_steps=0, device="cpu",
             seed=0)
    curves = ablate._Curves(7, torch.device("cpu"))
    trainer = ablate._trainer(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3)), s, 7, [curves])
    trainer.fit(data)
    assert trainer.step == 7 and [len(b) for _, b in seen] == [32] * 7  # 3 full batches an epoch
    assert [e for e, _ in seen] == [0, 0, 0, 1, 1, 1, 2]
    assert len({i for _, b in seen[:3] for i in b}) == 96  # an epoch: no image twice
    assert seen[0][1] != seen[3][1]  # the next epoch: another order
    assert bool((curves.loss > 0).all()) and bool(((curves.error >= 0) & (curves.error <= 1)).all())


@pytest.mark.parametrize("schedule,warmup", [("cosine", 5), ("cosine", 0), ("constant", 3)])
def test_lr_schedule_is_the_runs(schedule, warmup):
    """A run of 40 steps trains with the schedule its settings name: linear warm-up, then cosine to 0
    over the run's steps (or constant)."""
    s = dict(batch_size=8, lr=0.02, momentum=0.9, wd=5e-4, lr_schedule=schedule, warmup_steps=warmup, device="cpu",
             seed=0)
    trainer = ablate._trainer(torch.nn.Linear(2, 2), s, 40)
    for step in (0, 1, 4, 5, 17, 39, 40):
        want = 0.02 * 0.5 * (1 + math.cos(math.pi * step / 40)) if schedule == "cosine" else 0.02
        if warmup and step < warmup:
            want *= (step + 1) / warmup
        trainer.step = step
        assert trainer.current_lr(40) == pytest.approx(want), step


def test_compare_ratios_and_differences():
    base = dict(steps=100, train_seconds=50.0, steps_to_25=10, seconds_to_25=5.0, steps_to_converge=40,
                test_top1_error=0.10, test_top5_error=0.01)
    runs = {"relu": base, "tanh": dict(base, steps_to_25=60, seconds_to_25=33.0),
            "no-lrn": dict(base, test_top1_error=0.12, steps_to_converge=None),
            "dropout": dict(base, steps_to_converge=80, test_top1_error=None)}
    comps = {c["name"]: {m["metric"]: m["measured"] for m in c["metrics"]} for c in ablate.compare(runs)}
    assert list(comps) == ["relu-vs-tanh", "lrn", "dropout"]  # pool22 did not run
    assert comps["relu-vs-tanh"]["steps to 25% train error, tanh / relu"] == pytest.approx(6.0)
    assert comps["relu-vs-tanh"]["seconds to 25% train error, tanh / relu"] == pytest.approx(6.6)
    assert comps["lrn"]["top-1 test error, no-lrn - relu (points)"] == pytest.approx(2.0)
    assert comps["lrn"]["steps to converge, no-lrn / relu"] is None  # not reached
    assert comps["dropout"]["steps to converge, dropout / relu"] == pytest.approx(2.0)
    assert comps["dropout"]["top-1 test error, dropout - relu (points)"] is None
    # not reached in 100 steps: at least 100 / 40; shown so in the table
    lrn = next(c for c in ablate.compare(runs) if c["name"] == "lrn")["metrics"][2]
    assert lrn["at_least"] == pytest.approx(2.5)
    table = ablate.comparison_table({"comparisons": ablate.compare(runs)})[1]
    assert ["lrn", "steps to converge, no-lrn / relu", "> 2.50x (not reached)", "-"] in table
    assert ["relu-vs-tanh", "steps to 25% train error, tanh / relu", "6.00x", "6.00x"] in table
    # the baseline did not reach it: no bound either
    comps = ablate.compare({"relu": dict(base, steps_to_25=None), "tanh": dict(base, steps_to_25=None)})
    assert comps[0]["metrics"][0]["measured"] is None and comps[0]["metrics"][0]["at_least"] is None


@pytest.mark.parametrize("extra,msg", [
    (["--runs", "relu,sigmoid"], "unknown run 'sigmoid'"),
    (["--runs", ","], "name at least one run"),
    (["--steps", "0"], "--steps: expected an integer >= 1, got 0"),
    (["--converge-error", "1.5"], "--converge-error: expected a number in (0, 1)"),
    (["--lr", "-1"], "--lr: expected a positive number"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--image-size", "40"], "--image-size 40 is too small"),
    (["--device", "nonsense"], "--device 'nonsense'"),
    (["--subset", "1000"], "--subset 1000 is more than the training split has (64)"),
    (["--test-images", "100"], "--test-images 100 is more than the test split has (32)"),
])
def test_bad_flags_are_clear_errors(tiny_fashion, tmp_path, capsys, extra, msg):
    assert _tiny(tiny_fashion, tmp_path, *extra) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "ablate.json").exists()


def test_missing_data_and_cuda(tmp_path, capsys):
    assert ablate.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path), "--no-progress"]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert ablate.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
