"""A researcher's own code, as the `dataset` adapter's tests name it by import path
(`user_code:make_digits`, `user_code:make_mlp`): tests/ is on sys.path under pytest (the rootdir
conftest) and in the torchrun harness (tests/dist/harness.py puts it there)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset


class Digits(Dataset):
    """scikit-learn's 8x8 digits, standardised: item i is (features [64] float32, label int64)."""

    def __init__(self, noise: float = 0.0):
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.as_tensor(d.data, dtype=torch.float32)
        self.x = (x - x.mean(0)) / x.std(0).clamp_min(1.0)
        self.y = torch.as_tensor(d.target, dtype=torch.int64)
        self.noise = noise

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        # a random "augmentation" from torch's global generator: the adapter must make it a pure
        # function of (seed, step, index)
        x = self.x[i] + self.noise * torch.randn(self.x.shape[1]) if self.noise else self.x[i]
        return x, self.y[i]


def make_digits(noise: float = 0.0) -> Dataset:
    return Digits(noise)


def make_mlp(hidden: int = 32, n_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))


class Stream(torch.utils.data.IterableDataset):
    """An iterable-style dataset: the adapter refuses it (it has no index to draw from)."""

    def __iter__(self):
        return iter([(torch.zeros(64), torch.tensor(0))])


def make_iterable() -> Stream:
    return Stream()


class Exploding(nn.Module):
    """An MLP whose forward raises on its `after`-th training call: a real bug in a user's model,
    as `tests/e2e/test_hostile_run.py` runs it (the record must carry this message)."""

    def __init__(self, after: int):
        super().__init__()
        self.net, self.after, self.calls = make_mlp(), after, 0

    def forward(self, x):
        self.calls += self.training
        if self.calls >= self.after:
            raise RuntimeError(f"exploded at training forward {self.calls}")
        return self.net(x)


def make_exploding_mlp(after: int = 3) -> nn.Module:
    return Exploding(after)


class Gated(nn.Module):
    """An MLP whose `hold_at`-th training forward waits until the file `gate` exists (at most
    `max_wait_s`): trials that hold their resources until the test opens the gate, so
    tests/e2e/test_sim_cluster.py sees trials overlap whatever the machine's speed."""

    def __init__(self, gate: str, hold_at: int, max_wait_s: float):
        super().__init__()
        self.net, self.gate, self.hold_at, self.max_wait_s, self.calls = make_mlp(), gate, hold_at, max_wait_s, 0

    def forward(self, x):
        import os
        import time

        self.calls += self.training
        if self.calls == self.hold_at:
            deadline = time.time() + self.max_wait_s
            while not os.path.exists(self.gate) and time.time() < deadline:
                time.sleep(0.2)
        return self.net(x)


def make_gated_mlp(gate: str, hold_at: int = 1, max_wait_s: float = 300.0) -> nn.Module:
    return Gated(gate, hold_at, max_wait_s)
