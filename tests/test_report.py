"""perf.report: the compute-breakdown report, run in-process on the CPU with torch's ops (no timing checks)."""

import json

import pytest
import torch

import fastalex
from fastalex import flops
from perf import report

LAYER_KEYS = {"name", "module", "kind", "output_shape", "params", "macs", "flops", "activation_bytes", "param_share",
              "mac_share", "time_ms", "time_share", "gflops", "fused"}
TOP_KEYS = {"variant", "image_size", "batch_size", "device", "backend", "backends", "dtype", "warmup", "repeats",
            "params_total", "macs_total", "flops_total", "conv_param_share", "fc_param_share", "conv_mac_share",
            "fc_mac_share", "conv_time_share", "fc_time_share", "total_time_ms", "forward_time_ms", "gflops",
            "layers", "environment"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_single_run(tmp_path, capsys):
    """One run of the report (single net, batch 2, torch backend; JSON + Markdown + PNG), checked part by part.

    One test, not a fixture shared by several: under pytest-xdist each worker would run it again.
    """
    paths = {k: tmp_path / "sub" / f"report.{k}" for k in ("json", "md", "png")}  # parent folders get made
    rc = report.main(["--variant", "single", "--batch-size", "2", "--device", "cpu", "--backend", "torch",
                      "--warmup", "0", "--repeats", "2", "--json", str(paths["json"]),
                      "--markdown", str(paths["md"]), "--plot", str(paths["png"])])
    assert rc == 0
    out = capsys.readouterr().out
    assert "conv vs FC" in out and "fc6" in out and "62,378,344" in out  # the printed tables
    result = json.loads(paths["json"].read_text())
    check_json(result)
    check_markdown(result, paths["md"].read_text())
    check_png(paths["png"])


def check_json(result):
    assert set(result) == TOP_KEYS
    counts = flops.count("single", batch_size=2)
    assert (result["variant"], result["image_size"], result["batch_size"], result["device"]) == ("single", 227, 2,
                                                                                                  "cpu")
    assert (result["backend"], result["backends"], result["dtype"]) == ("torch", ["torch"], "float32")
    assert (result["params_total"], result["macs_total"]) == (counts.params_total, counts.macs_total)
    assert (result["params_total"], result["macs_total"]) == (62_378_344, 2 * 1_135_256_096)
    assert result["conv_param_share"] == pytest.approx(counts.conv_param_share)
    assert result["conv_mac_share"] == pytest.approx(counts.conv_mac_share)
    assert set(result["environment"]) >= {"torch", "triton", "device_name", "date"}
    assert result["environment"]["torch"] == torch.__version__

    layers = result["layers"]
    assert [l["name"] for l in layers] == [l.name for l in counts.layers]
    for row, l in zip(layers, counts.layers):
        assert set(row) == LAYER_KEYS
        assert (row["kind"], row["output_shape"], row["params"], row["macs"], row["activation_bytes"]) == (
            l.kind, list(l.output_shape), l.params, l.macs, l.activation_bytes)
        assert set(row["time_ms"]) == {"torch"} and row["time_ms"]["torch"] > 0
        if l.macs:
            assert row["gflops"]["torch"] == pytest.approx(2 * l.macs / row["time_ms"]["torch"] / 1e6)
        else:
            assert row["gflops"]["torch"] is None

    total = sum(l["time_ms"]["torch"] for l in layers)
    assert result["total_time_ms"]["torch"] == pytest.approx(total)
    assert sum(l["time_share"]["torch"] for l in layers) == pytest.approx(1.0)
    conv = sum(l["time_ms"]["torch"] for l in layers if l["kind"] == "conv")
    fc = sum(l["time_ms"]["torch"] for l in layers if l["kind"] == "fc")
    assert result["conv_time_share"]["torch"] == pytest.approx(conv / total)
    assert result["fc_time_share"]["torch"] == pytest.approx(fc / total)
    assert result["forward_time_ms"]["torch"] > 0


def check_markdown(result, text):
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| layer |"))
    assert lines[header + 1].startswith("|---|")
    rows = lines[header + 2: header + 2 + len(result["layers"]) + 1]
    assert [r.split("|")[1].strip() for r in rows] == [l["name"] for l in result["layers"]] + ["**total**"]
    assert all(r.count("|") == lines[header].count("|") for r in rows)
    assert "| conv | conv1, conv2, conv3, conv4, conv5 | 6.0 | 94.8 |" in text
    assert "62,378,344" in text


def check_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert 400 <= width <= 4000 and 200 <= height <= 3000


real_backend = fastalex.backend


def _torch_for_both(name):
    """Stand-in for fastalex.backend: both "backends" run torch's ops (the Triton interpreter is too slow)."""
    return real_backend("torch")


def test_two_backends_schema(tmp_path, monkeypatch):
    monkeypatch.setattr(report.fastalex, "backend", _torch_for_both)
    monkeypatch.setattr(report, "triton_can_run", lambda device: True)
    path, md, png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    assert report.main(["--variant", "torchvision", "--image-size", "63", "--batch-size", "1", "--device", "cpu",
                        "--backend", "both", "--warmup", "0", "--repeats", "1", "--json", str(path),
                        "--markdown", str(md), "--plot", str(png)]) == 0
    result = json.loads(path.read_text())
    assert result["backend"] == "both" and result["backends"] == ["torch", "triton"]
    assert set(result) == TOP_KEYS | {"speedup", "triton_vs_torch_rel_err"}
    assert result["triton_vs_torch_rel_err"] == 0.0  # both ran torch's ops here
    for key in ("conv_time_share", "fc_time_share", "total_time_ms", "forward_time_ms", "gflops"):
        assert set(result[key]) == {"torch", "triton"}
    for row in result["layers"]:
        assert set(row) == LAYER_KEYS | {"speedup"}
        assert set(row["time_ms"]) == set(row["time_share"]) == set(row["gflops"]) == {"torch", "triton"}
        assert row["speedup"] == pytest.approx(row["time_ms"]["torch"] / row["time_ms"]["triton"])
    assert result["speedup"] == pytest.approx(result["total_time_ms"]["torch"] / result["total_time_ms"]["triton"])
    text = md.read_text()
    assert "| torch ms | triton ms | speed-up |" in text and "triton % time" in text
    check_png(png)


def test_fused_lrn_and_pool_are_timed_as_one_on_triton(tmp_path, monkeypatch):
    """The model runs lrn1 -> pool1 as one LRNMaxPool2d: on the Triton backend that module is timed on
    lrn1's row and pool1's row holds 0; torch's ops time the two layers apart."""
    monkeypatch.setattr(report.fastalex, "backend", _torch_for_both)
    monkeypatch.setattr(report, "triton_can_run", lambda device: True)
    path = tmp_path / "r.json"
    assert report.main(["--variant", "single", "--image-size", "67", "--batch-size", "1", "--device", "cpu",
                        "--backend", "both", "--warmup", "0", "--repeats", "1", "--json", str(path)]) == 0
    rows = {r["name"]: r for r in json.loads(path.read_text())["layers"]}
    for i in (1, 2):
        lrn, pool = rows[f"lrn{i}"], rows[f"pool{i}"]
        assert lrn["fused"] == pool["fused"] == f"lrn{i}+pool{i}"
        assert lrn["time_ms"]["triton"] > 0 and pool["time_ms"]["triton"] == 0.0 and pool["speedup"] is None
        assert lrn["time_ms"]["torch"] > 0 and pool["time_ms"]["torch"] > 0
    assert rows["pool5"]["fused"] is None and rows["conv1"]["fused"] is None


def test_defaults(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the CPU defaults")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = report.parse_args([])
    assert (str(args.device), args.backend, args.backends) == ("cpu", "torch", ["torch"])
    assert (args.variant, args.image_size, args.batch_size, args.warmup, args.repeats) == ("single", 227, 8, 1, 3)
    assert report.parse_args(["--variant", "torchvision"]).image_size == 224
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs the kernels on the CPU: both by default
    assert report.parse_args([]).backends == ["torch", "triton"]


@pytest.mark.parametrize("argv", [
    ["--variant", "vgg"],
    ["--batch-size", "0"],
    ["--batch-size", "two"],
    ["--image-size", "50"],
    ["--variant", "torchvision", "--image-size", "62"],
    ["--repeats", "0"],
    ["--warmup", "-1"],
    ["--backend", "cudnn"],
    ["--device", "tpu"],
    ["--device", "meta"],
    ["--dtype", "int8"],
    ["--device", "cpu", "--dtype", "bfloat16"],
])
def test_bad_flags(argv, capsys):
    with pytest.raises(SystemExit) as e:
        report.parse_args(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_backend_unavailable(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for argv in (["--device", "cpu", "--backend", "triton"], ["--device", "cpu", "--backend", "both"]):
        with pytest.raises(SystemExit) as e:
            report.parse_args(argv)
        assert e.value.code == 2
        assert "TRITON_INTERPRET=1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            report.parse_args(["--device", "cuda"])
        assert "no CUDA device" in capsys.readouterr().err


def test_time_ms_takes_the_median(monkeypatch):
    calls = []
    ticks = iter([0.0, 0.001, 0.001, 0.011, 0.011, 0.014])  # perf_counter readings: 1, 10, 3 ms
    monkeypatch.setattr(report.time, "perf_counter", lambda: next(ticks))
    assert report.time_ms(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=3) == pytest.approx(3.0)
    assert len(calls) == 5  # 2 warm-up + 3 timed
