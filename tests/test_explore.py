"""Figures 3 and 4 as commands: `fastalex predict`, `neighbors`, `filters` and fastalex.explore, on a tiny run."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import fastalex
from fastalex import AlexNet, checkpoint, cli, explore
from fastalex.data import CLASSES, FashionMNIST, load_fashion_mnist

SIZE = 67


@pytest.fixture(scope="module")
def run(tiny_fashion, tmp_path_factory):
    """(checkpoint path, query PNG paths): a 1-epoch paper-net run; 2 test images as PNGs, and one RGB 50x40."""
    out = tmp_path_factory.mktemp("run")
    assert cli.main(["train", "--data", str(tiny_fashion), "--out", str(out), "--epochs", "1", "-b", "16",
                     "--image-size", str(SIZE), "--backend", "torch", "--no-progress", "--lr", "0.01"]) == 0
    images, _ = load_fashion_mnist("test", tiny_fashion)
    queries = []
    for i in (0, 5):
        queries.append(out / f"test{i}.png")
        Image.fromarray(images[i]).save(queries[-1])
    queries.append(out / "colour.png")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(queries[-1])
    yield out / "checkpoint.pt", [str(q) for q in queries]
    shutil.rmtree(out, ignore_errors=True)


def _model(path):
    state = checkpoint.load(path)
    model = cli._model_from(state["args"], len(state["class_names"]))
    model.load_state_dict(state["model"])
    return model.eval()


def test_predict_probabilities_are_the_models_softmax(run, tiny_fashion, tmp_path, capsys):
    ckpt, queries = run
    out = tmp_path / "pred.json"
    assert cli.main(["predict", *queries, "--checkpoint", str(ckpt), "--json", str(out), "--backend", "torch"]) == 0
    shown = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert [r["image"] for r in res] == queries and queries[0] in shown

    x = explore.preprocess_images(queries, "fashion-mnist", SIZE)
    # a PNG of a test image becomes exactly the test set's tensor
    test_images, test_labels = load_fashion_mnist("test", tiny_fashion)
    test_set = FashionMNIST.from_arrays(test_images, test_labels, image_size=SIZE)
    assert torch.equal(x[0], test_set[0][0]) and torch.equal(x[1], test_set[5][0])
    model = _model(ckpt)
    with fastalex.backend("torch"), torch.no_grad():
        probs = torch.softmax(model(x), dim=1)
        assert torch.allclose(explore.probabilities(model, x), probs, atol=1e-6)
    assert torch.allclose(probs.sum(1), torch.ones(3), atol=1e-5)
    for r, p in zip(res, probs):
        top = r["top"]
        assert len(top) == 5
        values = [t["probability"] for t in top]
        assert values == sorted(values, reverse=True)
        assert [t["index"] for t in top] == p.topk(5).indices.tolist()
        assert values == pytest.approx(p.topk(5).values.tolist(), abs=1e-6)
        assert all(t["class"] == CLASSES[t["index"]] for t in top)


@pytest.mark.parametrize("k,batch_size,wrap", [(20, 16, False), (5, 7, True), (64, 30, False)])
def test_nearest_neighbors_match_brute_force(run, tiny_fashion, k, batch_size, wrap):
    """Running top-k over batches (k larger than a batch; a ragged last batch; every image) == all at once."""
    ckpt, queries = run
    images, labels = load_fashion_mnist("train", tiny_fashion)
    train = FashionMNIST.from_arrays(images, labels, image_size=SIZE)
    data = torch.utils.data.Subset(train, range(len(train))) if wrap else train  # wrap: the DataLoader path
    model = _model(ckpt)
    q = explore.preprocess_images(queries, "fashion-mnist", SIZE)
    with fastalex.backend("torch"):
        dist, idx = explore.nearest_neighbors(model, data, q, k=k, batch_size=batch_size)
        everything = explore.hidden_features(model, train.batch(range(len(train)))[0])
        # In float64: torch.cdist's default (matrix-product) mode loses digits to cancellation in float32.
        want_d, want_i = torch.cdist(explore.hidden_features(model, q).double(), everything.double()).topk(
            k, largest=False)
    assert everything.shape == (64, 4096) and dist.shape == idx.shape == (3, k)
    assert torch.equal(idx, want_i)
    assert torch.allclose(dist.double(), want_d, rtol=1e-5, atol=1e-5)


def test_nearest_neighbors_run_in_eval_mode():
    """Dropout is off while searching, and the model's training mode comes back."""
    torch.manual_seed(0)
    model = AlexNet(num_classes=4, variant="single", image_size=SIZE, dropout=0.5, init="kaiming").train()
    rng = np.random.default_rng(2)
    data = FashionMNIST.from_arrays(rng.integers(0, 255, (20, 28, 28), dtype=np.uint8), np.zeros(20, np.int64),
                                    image_size=SIZE)
    q = data.batch([3, 11])[0]
    with fastalex.backend("torch"):
        dist, idx = explore.nearest_neighbors(model, data, q, k=3, batch_size=8)
    assert model.training
    assert idx[:, 0].tolist() == [3, 11] and torch.allclose(dist[:, 0], torch.zeros(2), atol=1e-3)


def test_neighbors_command_writes_grid_and_json(run, tiny_fashion, tmp_path, capsys):
    ckpt, queries = run
    grid, out = tmp_path / "grid.png", tmp_path / "nn.json"
    assert cli.main(["neighbors", "--checkpoint", str(ckpt), "--query", *queries[:2], "--data", str(tiny_fashion),
                     "-k", "4", "-b", "16", "--out", str(grid), "--json", str(out), "--tile", "32", "--backend",
                     "torch", "--no-progress"]) == 0
    res = json.loads(out.read_text())
    images, labels = load_fashion_mnist("train", tiny_fashion)
    train = FashionMNIST.from_arrays(images, labels, image_size=SIZE)
    with fastalex.backend("torch"):
        dist, idx = explore.nearest_neighbors(_model(ckpt), train, explore.preprocess_images(queries[:2],
                                                                                              "fashion-mnist", SIZE), 4)
    assert [r["query"] for r in res] == queries[:2]
    for r, d, i in zip(res, dist.tolist(), idx.tolist()):
        assert [n["index"] for n in r["neighbors"]] == i
        assert [n["distance"] for n in r["neighbors"]] == pytest.approx(d, rel=1e-4, abs=1e-4)
        assert all(n["class"] == CLASSES[labels[n["index"]]] for n in r["neighbors"])
    with Image.open(grid) as img:  # 2 rows of query + 4 neighbours, 32 px tiles, 2 px gaps, 4 px separator
        assert img.format == "PNG" and img.size == (5 * 32 + 7 * 2 + 4, 2 * 32 + 3 * 2)


def test_filters_paper_towers_in_separate_blocks(run, tmp_path, capsys):
    ckpt, _ = run
    out = tmp_path / "kernels.png"
    assert cli.main(["filters", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    with Image.open(out) as img:
        assert img.format == "PNG"
        pixels = np.asarray(img.convert("RGB"))
    block = 3 * 44 + 4  # 48 kernels per tower: 3 rows of 16, 11 px * scale 4, 1 px gaps around
    assert pixels.shape == (2 * block + 8, 16 * 44 + 17, 3)
    assert (pixels[block:block + 8] == 255).all()  # the gap between the towers
    w = checkpoint.load(ckpt)["model"]["features.conv1.weight"]

    def tile(k):  # kernel k, normalised on its own, upscaled 4x, as (44, 44, 3) uint8
        t = (w[k] - w[k].min()) / (w[k].max() - w[k].min())
        return (t.repeat_interleave(4, 1).repeat_interleave(4, 2) * 255).round().byte().permute(1, 2, 0).numpy()

    assert np.array_equal(pixels[1:45, 1:45], tile(0))  # tower 1 starts with kernel 0
    assert np.array_equal(pixels[block + 8 + 1:block + 8 + 45, 1:45], tile(48))  # tower 2 with kernel 48


def test_filters_other_variant_is_a_plain_grid(tmp_path, capsys):
    model = AlexNet(num_classes=10, variant="torchvision", image_size=SIZE)
    ckpt = checkpoint.save_atomic({"model": model.state_dict(), "class_names": list(CLASSES), "epoch": 0,
                                   "args": {"variant": "torchvision", "image_size": SIZE, "dropout": 0.5,
                                            "num_classes": 10, "dataset": "fashion-mnist", "data": None}},
                                  tmp_path / "tv.pt")
    out = tmp_path / "k.png"
    assert cli.main(["filters", "--checkpoint", str(ckpt), "--out", str(out), "--scale", "2",
                     "--normalize", "global"]) == 0
    with Image.open(out) as img:  # 64 kernels: 4 rows of 16, 22 px each
        assert img.format == "PNG" and img.size == (16 * 22 + 17, 4 * 22 + 5)


@pytest.mark.parametrize("argv,msg", [
    (["predict", "Q0", "--checkpoint", "/nonexistent.pt"], "no checkpoint at /nonexistent.pt"),
    (["predict", "/nonexistent.png", "--checkpoint", "CKPT"], "no image file at /nonexistent.png"),
    (["predict", "BAD", "--checkpoint", "CKPT"], "cannot read image"),
    (["predict", "Q0", "--checkpoint", "CKPT", "--top", "0"], "--top must be at least 1"),
    (["neighbors", "--checkpoint", "CKPT", "--query", "Q0", "-k", "0"], "-k must be at least 1"),
    (["neighbors", "--checkpoint", "CKPT", "--query", "Q0", "-k", "65", "--data", "DATA"],
     "more than the training split's 64 images"),
    (["neighbors", "--checkpoint", "CKPT", "--query", "/nonexistent.png"], "no image file at /nonexistent.png"),
    (["filters", "--checkpoint", "/nonexistent.pt", "--out", "x.png"], "no checkpoint at"),
    (["filters", "--checkpoint", "BAD", "--out", "x.png"], "not a readable fastalex checkpoint"),
])
def test_clear_messages(argv, msg, run, tiny_fashion, tmp_path, capsys):
    ckpt, queries = run
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    subst = {"CKPT": str(ckpt), "Q0": queries[0], "BAD": str(bad), "DATA": str(tiny_fashion)}
    assert cli.main([subst.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
