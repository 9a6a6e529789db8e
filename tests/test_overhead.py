"""perf.overhead (the Trainer against a bare loop) on a tiny configuration: what it writes, never its timings."""

import json

import pytest

from perf import overhead


def _tiny(data, tmp_path, *extra):
    out = tmp_path / "overhead.json"
    # torch's ops: the command's default on a CPU (the tests run Triton's interpreter under "auto")
    assert overhead.main(["--data", str(data), "--steps", "3", "--warmup", "1", "-b", "8", "--backend", "torch",
                          "--no-progress", "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("path", ["batched", "per-item"])
def test_interleaved_run_writes_both_sides_and_trains_alike(tiny_fashion, tmp_path, capsys, path):
    res = _tiny(tiny_fashion, tmp_path, "--data-path", path)
    assert res["mode"] == "interleaved" and res["data_path"] == path and res["environment"]["backend"] == "torch"
    assert res["steps"] == 3 and res["warmup"] == 1 and res["batch_size"] == 8
    assert res["settings"]["variant"] == "paper" and res["settings"]["image_size"] == 67  # the quick preset
    for side in ("bare", "trainer"):
        r = res[side]
        assert r["images"] == 24 and r["seconds"] > 0 and r["images_per_second"] == pytest.approx(24 / r["seconds"],
                                                                                                  rel=1e-3)
    assert res["ratio"] == pytest.approx(res["trainer"]["seconds"] / res["bare"]["seconds"], rel=1e-3)
    q = res["step_ratios"]
    assert q["n"] == 3 and q["min"] <= q["median"] <= q["max"]
    # The same batches, lr schedule and initial weights: the same loss after 4 steps, bit for bit.
    assert res["same_training"] is True and res["last_loss"]["bare"] == res["last_loss"]["trainer"] > 0
    assert "trainer seconds / bare seconds" in capsys.readouterr().out


@pytest.mark.parametrize("side", ["bare", "trainer"])
def test_one_side_alone(tiny_fashion, tmp_path, side):
    res = _tiny(tiny_fashion, tmp_path, "--only", side)
    other = "trainer" if side == "bare" else "bare"
    assert res["mode"] == side and res[side]["images"] == 24 and res[other] is None
    assert res["ratio"] is None and res["step_ratios"] is None and res["same_training"] is None


def test_too_few_images_is_a_clear_error(tiny_fashion, tmp_path):
    with pytest.raises(SystemExit, match="1 \\+ 8 steps of 8 need 72 training images, the data has 64"):
        overhead.main(["--data", str(tiny_fashion), "--steps", "8", "--warmup", "1", "-b", "8"])
