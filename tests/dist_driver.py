"""Run by tests/test_distributed.py under torchrun (or alone): trains a small net with fastalex.Trainer.

    python tests/dist_driver.py OUT STRATEGY KIND BATCH EPOCHS CHECKPOINT_EVERY SLOW

KIND: "plain" (a tiny conv net, no dropout) or "alexnet" (the single net at 67x67, no dropout).
Writes OUT/pid.<rank>.<restart> when training starts and OUT/final.pt (the model's parameters) at the end.
$DRIVER_BACKEND picks fastalex's backend (default torch); $DRIVER_UNREADABLE lists training images
(comma-separated indices) that read as None, as a dataset's unreadable files do.
"""

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

import fastalex


class Blobs(torch.utils.data.Dataset):
    """Four classes of noisy images with random flips (augmentation from the global RNG)."""

    def __init__(self, n: int, size: int, seed: int = 0, slow: float = 0.0, unreadable=()):
        centers = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 4, (n,), generator=g)
        self.x = centers[self.y] + 0.8 * torch.randn(n, 3, size, size, generator=g)
        self.slow, self.unreadable = slow, set(unreadable)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if self.slow:
            time.sleep(self.slow)
        if i in self.unreadable:
            return None
        x = self.x[i] + 0.1 * torch.randn_like(self.x[i])
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), self.y[i]


def build(kind: str) -> nn.Module:
    torch.manual_seed(5)
    if kind == "plain":
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 4))
    return fastalex.AlexNet(num_classes=4, variant="single", image_size=67, dropout=0.0, init="kaiming")


def lr(kind: str) -> float:
    return 0.05 if kind == "plain" else 0.01  # (0.05 makes the AlexNet diverge within 8 steps)


def data(kind: str, slow: float = 0.0, unreadable=None):
    size = 8 if kind == "plain" else 67
    n = 96 if kind == "plain" else 48
    if unreadable is None:
        unreadable = [int(i) for i in os.environ.get("DRIVER_UNREADABLE", "").split(",") if i]
    return Blobs(n, size, slow=slow, unreadable=unreadable), Blobs(24, size, seed=1)


def main() -> None:
    out, strategy, kind = sys.argv[1], sys.argv[2], sys.argv[3]
    batch, epochs, every, slow = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
    train, val = data(kind, slow)
    with fastalex.backend(os.environ.get("DRIVER_BACKEND", "torch")):
        t = fastalex.Trainer(build(kind), epochs=epochs, batch_size=batch, lr=lr(kind), out_dir=out,
                             checkpoint_every=every, progress=False, seed=7, strategy=strategy)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart != "0":
            t.resume(missing_ok=True)
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, f"pid.{t.dist.rank}.{restart}").write_text(str(os.getpid()))
        try:
            t.fit(train, val)
            state = t.state_dict()  # collective under ddp and hybrid
            if t.dist.is_main:
                torch.save({"model": state["model"], "step": t.step, "history": t.history,
                            "describe": t.describe()}, Path(out, "final.pt"))
        finally:
            t.close()  # leave the process group in order


if __name__ == "__main__":
    main()
