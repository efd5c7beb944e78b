"""quadratic: a noisy matrix quadratic whose every metric has a closed form (docs/METRICS.md
§Correctness contract).

    f(X; B) = mean_{i in B} ½ tr((X − C_i)ᵀ A (X − C_i)),    C_i = C + noise · ξ_i

X is a dim × cols matrix parameter (so matrix optimizers see a matrix), A = Q diag(λ) Qᵀ is
symmetric positive definite with eigenvalues λ log-spaced from lambda_min to lambda_max and
Q a random orthogonal matrix, C a random centre and ξ_i standard normal noise, one draw per
sample. Q, C and the initial point are drawn from the seed; the batch is the tensor of
centres C_i, shape [b, dim, cols]. The gradient of the mean loss is A (X − mean_i C_i).

Exactness: the model computes in float32 with the float32 matrix `A32`, which is exactly
symmetric (symmetrised in float64, then rounded element-wise). The workload's `A` is the
float64 copy of that same float32 matrix and `spectrum` its float64 eigenvalues, so closed
forms built from `A` describe the trained function up to float32 rounding of the arithmetic
only; `spectrum` equals the nominal log-spaced λ to float32 rounding of A's entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from opt_study.config import FieldError
from opt_study.workloads.base import STREAM_DATA, STREAM_EVAL, Batch, Workload, eval_slices, generator

EVAL_SAMPLES = 512  # fixed evaluation centres


@dataclass(frozen=True)
class QuadraticConfig:
    dim: int = 16  # rows of X and size of A
    cols: int = 4  # columns of X
    lambda_min: float = 0.1  # smallest eigenvalue of A
    lambda_max: float = 10.0  # largest eigenvalue of A
    noise: float = 0.1  # standard deviation of each sample's centre around C
    init_scale: float = 1.0  # X_0 = C + init_scale · Z, Z standard normal

    def __post_init__(self):
        for name, hi in (("dim", 4096), ("cols", 4096)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
                raise FieldError(name, f"must be an integer in [1, {hi}], got {v!r}")
        # The model trains in float32 (max ~3.4e38): with these caps the loss, at most
        # λ_max · scale² · dim · cols ~ 1e12 · 1e12 · 1.7e7, stays finite at x_0.
        if not 1e-12 <= self.lambda_min <= 1e12:
            raise FieldError("lambda_min", f"must be in [1e-12, 1e12], got {self.lambda_min!r}")
        if not self.lambda_min <= self.lambda_max <= 1e12:
            raise FieldError("lambda_max", f"must be in [lambda_min={self.lambda_min}, 1e12], got {self.lambda_max!r}")
        if not 0.0 <= self.noise <= 1e6:
            raise FieldError("noise", f"must be in [0, 1e6], got {self.noise!r}")
        if not 0.0 <= self.init_scale <= 1e6:
            raise FieldError("init_scale", f"must be in [0, 1e6], got {self.init_scale!r}")


class QuadraticModel(nn.Module):
    """Parameter X [dim, cols], buffer A [dim, dim]; forward(centres [b, dim, cols]) -> losses [b]."""

    def __init__(self, a32: torch.Tensor, x0: torch.Tensor):
        super().__init__()
        self.X = nn.Parameter(x0.clone())
        self.register_buffer("A", a32.clone())

    def forward(self, centres: torch.Tensor) -> torch.Tensor:
        d = self.X - centres  # [b, dim, cols]
        # ½ tr(Dᵀ A D) = ½ Σ_jk D_jk (A D)_jk; autograd gives ½ (A + Aᵀ) D = A D since A is symmetric.
        return 0.5 * (d * torch.matmul(self.A, d)).sum(dim=(1, 2))


class QuadraticWorkload(Workload):
    """Batches are (centres [b, dim, cols] float32,); loss is the mean of the per-sample losses."""

    unit = "samples"

    def __init__(self, cfg: QuadraticConfig, seed: int):
        super().__init__(cfg, seed)
        g = generator(STREAM_DATA, self.seed)
        # Haar-random orthogonal Q: QR of a Gaussian matrix with R's diagonal signs moved into Q
        # (Mezzadri 2007, https://arxiv.org/abs/math-ph/0609050).
        q, r = torch.linalg.qr(torch.randn(cfg.dim, cfg.dim, generator=g, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r))
        lam = torch.logspace(math.log10(cfg.lambda_min), math.log10(cfg.lambda_max), cfg.dim, dtype=torch.float64)
        a = (q * lam) @ q.T
        self.A32 = ((a + a.T) / 2).to(torch.float32)  # exactly symmetric after element-wise rounding
        self.A = self.A32.to(torch.float64)
        self.spectrum = torch.linalg.eigvalsh(self.A)
        self.nominal_spectrum = lam
        self.C = torch.randn(cfg.dim, cfg.cols, generator=g, dtype=torch.float64).to(torch.float32)
        self.X0 = self.C + cfg.init_scale * torch.randn(cfg.dim, cfg.cols, generator=g)
        self.eval_centres = self._centres(generator(STREAM_EVAL, self.seed), EVAL_SAMPLES)

    def _centres(self, g: torch.Generator, n: int) -> torch.Tensor:
        xi = torch.randn(n, self.cfg.dim, self.cfg.cols, generator=g)
        return self.C + self.cfg.noise * xi

    def build_model(self) -> nn.Module:
        # No global RNG is used: every random quantity was drawn from local generators above.
        return QuadraticModel(self.A32, self.X0)

    def train_batch(self, step: int, index: int, micro_batch_size: int) -> Batch:
        return (self._centres(self._batch_generator(step, index), micro_batch_size),)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch[0]).mean()

    def eval_batches(self, micro_batch_size: int, rank: int, world: int) -> list[Batch]:
        return [(self.eval_centres[s],) for s in eval_slices(EVAL_SAMPLES, micro_batch_size, rank, world)]

    def units_per_batch(self, batch: Batch) -> int:
        return batch[0].shape[0]

    def full_loss(self, x: torch.Tensor) -> float:
        """The noise-free objective ½ tr((X − C)ᵀ A (X − C)) in float64 (its minimum, 0, is at C)."""
        d = x.detach().to(torch.float64).cpu() - self.C.to(torch.float64)
        return float(0.5 * (d * (self.A @ d)).sum())
