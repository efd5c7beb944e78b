"""mlp_classify: a multilayer perceptron (ReLU or tanh) trained with cross-entropy or MSE on a
small table.

dataset "digits": scikit-learn's bundled 8×8 handwritten digits (1,797 samples, 64 features,
10 classes; shipped inside scikit-learn, no download). "synthetic": a Gaussian mixture with
one isotropic unit-variance component per class and class means drawn at random.

The data and the train/validation split depend on the config only, never on the trial seed,
so every seed and every optimizer of a study is evaluated on the same held-out samples; the
seed drives the initialisation, the batch sampling and dropout. Features are standardised
with the training split's mean and standard deviation.

``full_batch: n`` trains on a fixed subset, the first n training samples (of the split, so the
same for every seed): micro-batch i of every step is rows [i·b, (i+1)·b) mod n of it, so with
micro_batch_size × workers × grad_accum = n every step sees the whole subset once: full-batch
gradient descent, as in Cohen et al. 2021 (https://arxiv.org/abs/2103.00065).
``loss: mse`` is their squared loss on one-hot targets, ½·mean_i Σ_k (z_ik − 1[k = y_i])².
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from opt_study.config import FieldError
from opt_study.workloads.base import STREAM_DATA, Batch, Workload, eval_slices, generator, seeded_build

DATASETS = ("digits", "synthetic")
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
LOSSES = ("cross_entropy", "mse")
DATA_SEED = 0  # the seed of the dataset and split: fixed, so all trials share them
MEAN_SPREAD = 2.0  # class means ~ N(0, (MEAN_SPREAD² / n_features) I): separable, not trivially


@dataclass(frozen=True)
class MLPClassifyConfig:
    dataset: str = "digits"  # "digits" or "synthetic"
    hidden: tuple[int, ...] = (64, 64)  # widths of the hidden layers; () is softmax regression
    dropout: float = 0.0  # after every hidden ReLU
    val_fraction: float = 0.2  # held-out fraction of the samples
    n_classes: int = 10  # synthetic only; digits has 10
    n_features: int = 64  # synthetic only; digits has 64
    n_samples: int = 2000  # synthetic only; digits has 1797
    activation: str = "relu"  # "relu" or "tanh" (smooth: finite-difference Hessians see no kinks)
    loss: str = "cross_entropy"  # "cross_entropy" or "mse" (½·mean Σ_k (z_k − onehot_k)²)
    full_batch: int = 0  # n > 0: train on the first n training samples, every step all of them

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise FieldError("dataset", f"must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        hidden = tuple(self.hidden)
        if any(isinstance(h, bool) or not isinstance(h, int) or not 1 <= h <= 1 << 16 for h in hidden):
            raise FieldError("hidden", f"must be a list of integers in [1, 65536], got {self.hidden!r}")
        object.__setattr__(self, "hidden", hidden)  # a YAML list becomes a hashable tuple
        if not 0.0 <= self.dropout < 1.0:
            raise FieldError("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise FieldError("val_fraction", f"must be in (0, 1), got {self.val_fraction!r}")
        for name, lo, hi in (("n_classes", 2, 1 << 16), ("n_features", 1, 1 << 16), ("n_samples", 2, 1 << 24)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise FieldError(name, f"must be an integer in [{lo}, {hi}], got {v!r}")
        if self.dataset == "digits" and (self.n_classes, self.n_features) != (10, 64):
            raise FieldError(
                "n_classes" if self.n_classes != 10 else "n_features",
                "digits has 10 classes and 64 features; leave n_classes and n_features "
                "at their defaults or use dataset: synthetic",
            )
        if self.activation not in ACTIVATIONS:
            raise FieldError("activation", f"must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.loss not in LOSSES:
            raise FieldError("loss", f"must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if (
            isinstance(self.full_batch, bool)
            or not isinstance(self.full_batch, int)
            or not 0 <= self.full_batch <= 1 << 24
        ):
            raise FieldError(
                "full_batch", f"must be an integer in [0, 16777216] (0: sampled batches), got {self.full_batch!r}"
            )
        if self.dataset == "synthetic" and self.n_samples < self.n_classes:
            raise FieldError("n_samples", f"must be >= n_classes={self.n_classes}")


def load_dataset(cfg: MLPClassifyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """All samples as (features [n, f] float32, labels [n] int64), before the split."""
    if cfg.dataset == "digits":
        from sklearn.datasets import load_digits  # lazy: only this dataset needs scikit-learn

        d = load_digits()
        return torch.as_tensor(d.data, dtype=torch.float32), torch.as_tensor(d.target, dtype=torch.int64)
    g = generator(STREAM_DATA, DATA_SEED)
    means = torch.randn(cfg.n_classes, cfg.n_features, generator=g) * (MEAN_SPREAD / cfg.n_features**0.5)
    y = torch.arange(cfg.n_samples) % cfg.n_classes  # balanced classes
    x = means[y] + torch.randn(cfg.n_samples, cfg.n_features, generator=g)
    return x, y


class InputLinear(nn.Linear):
    """The first layer: casts the float32 features to its weight's dtype, so that a bf16 model
    (and the fp32 loss re-evaluation of a bf16 run, which gives it fp32 weights) reads them. For
    an fp32 model the cast returns the input itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))


def make_mlp(
    n_features: int, hidden: tuple[int, ...], n_classes: int, dropout: float, activation: str = "relu"
) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = n_features
    for h in hidden:
        layers += [(InputLinear if not layers else nn.Linear)(width, h), ACTIVATIONS[activation]()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append((InputLinear if not layers else nn.Linear)(width, n_classes))
    return nn.Sequential(*layers)


class MLPClassifyWorkload(Workload):
    """Batches are (features [b, f] float32, labels [b] int64); loss is mean cross-entropy."""

    unit = "samples"
    precisions = ("fp32", "bf16")  # the first layer casts the float32 features (InputLinear)

    def __init__(self, cfg: MLPClassifyConfig, seed: int):
        super().__init__(cfg, seed)
        x, y = load_dataset(cfg)
        perm = torch.randperm(len(y), generator=generator(STREAM_DATA, DATA_SEED, 1))
        n_val = max(1, int(len(y) * cfg.val_fraction))
        train, val = perm[n_val:], perm[:n_val]
        mean, std = x[train].mean(dim=0), x[train].std(dim=0)
        std = torch.where(std > 0, std, torch.ones_like(std))  # digits has constant pixels
        x = (x - mean) / std
        self.train_x, self.train_y = x[train].contiguous(), y[train].contiguous()
        self.val_x, self.val_y = x[val].contiguous(), y[val].contiguous()
        self.n_features, self.n_classes = x.shape[1], int(cfg.n_classes)

    def build_model(self) -> nn.Module:
        c = self.cfg
        return seeded_build(
            self.seed, lambda: make_mlp(self.n_features, c.hidden, self.n_classes, c.dropout, c.activation)
        )

    def train_batch(self, step: int, index: int, micro_batch_size: int) -> Batch:
        n = self.cfg.full_batch
        if n:  # the fixed subset: micro-batch `index` is the same rows at every step
            i = (index * micro_batch_size + torch.arange(micro_batch_size)) % min(n, len(self.train_y))
            return self.train_x[i], self.train_y[i]
        # Sampling with replacement: every micro-batch is an independent draw, so no epoch state.
        i = torch.randint(0, len(self.train_y), (micro_batch_size,), generator=self._batch_generator(step, index))
        return self.train_x[i], self.train_y[i]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        z = model(x)
        if self.cfg.loss == "mse":
            return 0.5 * (z - F.one_hot(y, z.shape[-1]).to(z.dtype)).square().sum(dim=-1).mean()
        return F.cross_entropy(z, y)

    def eval_batches(self, micro_batch_size: int, rank: int, world: int) -> list[Batch]:
        return [(self.val_x[s], self.val_y[s]) for s in eval_slices(len(self.val_y), micro_batch_size, rank, world)]

    def units_per_batch(self, batch: Batch) -> int:
        return batch[0].shape[0]
