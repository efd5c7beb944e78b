"""Teacher-student regression: a small ReLU network learns the outputs of a fixed random one.

The data are a pure function of (config, seed, step, index), as opt_study's Workload contract
asks: inputs x ~ N(0, I) are drawn from a local generator per micro-batch, and targets are the
teacher's outputs plus Gaussian noise. The teacher depends on the config only, so every trial
of a study learns the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from opt_study import Workload
from opt_study.config import FieldError
from opt_study.workloads.base import STREAM_DATA, STREAM_EVAL, Batch, eval_slices, generator, seeded_build


@dataclass(frozen=True)
class TeacherStudentConfig:
    """The workload's parameters: every key of the YAML's `workload:` besides `type`."""

    dim: int = 16  # input features
    hidden: int = 32  # hidden width of teacher and student
    noise: float = 0.1  # std of the label noise
    eval_samples: int = 256  # size of the fixed held-out set

    def __post_init__(self):
        for name, lo, hi in (("dim", 1, 4096), ("hidden", 1, 4096), ("eval_samples", 1, 1 << 20)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise FieldError(name, f"must be an integer in [{lo}, {hi}], got {v!r}")
        if not 0.0 <= self.noise < 10.0:
            raise FieldError("noise", f"must be in [0, 10), got {self.noise!r}")


def _net(dim: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class TeacherStudent(Workload):
    """Batches are (x [b, dim] float32, y [b, 1] float32); the loss is the mean squared error."""

    config_class = TeacherStudentConfig
    unit = "samples"
    precisions = ("fp32",)  # float32 inputs into the first layer

    def __init__(self, cfg: TeacherStudentConfig, seed: int):
        super().__init__(cfg, seed)
        # the teacher is a function of the config only (seed 0), scaled to unit output variance
        # so that the loss starts near 1 + noise² whatever dim and hidden are
        self.teacher = seeded_build(0, lambda: _net(cfg.dim, cfg.hidden)).requires_grad_(False)
        probe = torch.randn(4096, cfg.dim, generator=generator(STREAM_EVAL, 0, 1))
        self.gain = 1.0 / max(float(self.teacher(probe).std()), 1e-6)
        self.val = self._sample(cfg.eval_samples, generator(STREAM_EVAL, 0))

    def _sample(self, n: int, g: torch.Generator) -> Batch:
        x = torch.randn(n, self.cfg.dim, generator=g)
        return x, self.gain * self.teacher(x) + self.cfg.noise * torch.randn(n, 1, generator=g)

    def build_model(self) -> nn.Module:
        return seeded_build(self.seed, lambda: _net(self.cfg.dim, self.cfg.hidden))

    def train_batch(self, step: int, index: int, micro_batch_size: int) -> Batch:
        return self._sample(micro_batch_size, generator(STREAM_DATA, self.seed, step, index))

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    def eval_batches(self, micro_batch_size: int, rank: int, world: int) -> list[Batch]:
        x, y = self.val
        return [(x[s], y[s]) for s in eval_slices(len(y), micro_batch_size, rank, world)]

    def units_per_batch(self, batch: Batch) -> int:
        return batch[0].shape[0]
