"""Hessian spectrum and trace from Hessian-vector products, on sharded vectors.

Every vector here is this rank's local part (a flat float64 tensor: the concatenation of its
fragments); a global inner product is a local dot plus a SUM all-reduce (``reduce``, a no-op on
one process), several of them packed into one all-reduce where the algorithm allows. Nothing
here knows about DeepSpeed: ``hvp(v)`` is given (opt_study.replay.worker builds it
from gradients; the options and their defaults are opt_study.replay.HessianOptions).

- ``fd_hvp``: Hv by central differences of gradients, (∇F(x + εv) − ∇F(x − εv)) / (2ε), for
  engines where double backward cannot pass (ZeRO hooks, fused kernels). Truncation error is
  O(ε²‖∇³F‖), rounding error O(u‖∇F‖/ε) with u the gradient's unit roundoff (Nocedal & Wright,
  "Numerical Optimization", 2nd ed., §8.1), which alone would put ε near u^{1/3}‖x‖. ReLU
  networks need a much smaller step: a difference that crosses an activation kink measures a
  gradient jump, not curvature. Measured on mlp_classify (digits, fp32, ‖x‖ = 2.9, 30 Lanczos
  steps against double-backward λ_max = 0.8686): ε = 1e-3 gave 6.99, 1e-2 gave 2.31; ε from
  3e-6 to 3e-4 stayed within 4e-4 relative. Hence the default ε = 3e-5 · max(‖x‖, 1)
  (HessianOptions.fd_eps). In bf16 (u = 2^-8) no step is good: treat Hessian estimates of
  bf16 trials as rough.
- ``lanczos``: the largest Ritz values of H after k Lanczos steps with full
  re-orthogonalisation (classical Gram-Schmidt applied twice, "twice is enough": Giraud,
  Langou & Rozložník 2005, https://doi.org/10.1016/j.camwa.2004.06.025), as in the Hessian
  spectra of Ghorbani, Krishnan & Xiao 2019 (https://arxiv.org/abs/1901.10159) and Cohen et
  al. 2021 (https://arxiv.org/abs/2103.00065, λ_max against 2/η).
- ``hutchinson``: tr(H) ≈ mean of zᵀHz over Rademacher z (Hutchinson 1990,
  https://doi.org/10.1080/03610919008812866), with the standard error of the mean.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

Vec = torch.Tensor  # this rank's flat float64 part of a global vector
Reduce = Callable[[torch.Tensor], torch.Tensor]  # in-place SUM over ranks


def fd_hvp(grad_at: Callable[[Vec], Vec], x: Vec, eps: float) -> Callable[[Vec], Vec]:
    """v -> Hv ≈ (∇F(x + εv) − ∇F(x − εv)) / (2ε); ``grad_at`` maps a local point to the local
    gradient (a collective: every rank calls it together). Leaves the model at x − εv; callers
    put x back when done."""

    def hvp(v: Vec) -> Vec:
        g_plus = grad_at((x + eps * v).float())
        g_minus = grad_at((x - eps * v).float())
        return (g_plus.double() - g_minus.double()) / (2.0 * eps)

    return hvp


def global_norm(v: Vec, reduce: Reduce) -> float:
    s = torch.dot(v, v).reshape(1).double()
    reduce(s)
    return math.sqrt(float(s))


def lanczos(hvp: Callable[[Vec], Vec], v0: Vec, steps: int, reduce: Reduce) -> tuple[np.ndarray, int]:
    """Ritz values of H (descending) after up to ``steps`` Lanczos steps from start vector v0,
    and the number of steps taken (fewer if the Krylov space became invariant).

    Two all-reduces per step (one per Gram-Schmidt pass; the second also carries ‖w‖²),
    besides those of ``hvp``. Memory: the k basis vectors (k × the local part, float64).
    v0 is any non-zero start vector (its local part).
    """
    basis = torch.empty(steps, v0.numel(), dtype=torch.float64, device=v0.device)
    basis[0] = v0 / global_norm(v0, reduce)
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(steps):
        w = hvp(basis[j])
        stack = basis[: j + 1]
        alpha = 0.0
        for rep in range(2):
            c = stack @ w
            if rep == 1:
                c = torch.cat([c, torch.dot(w, w).reshape(1)])  # ‖w‖² before the 2nd pass
            reduce(c)
            coef = c[: j + 1]
            w = w - coef @ stack
            alpha += float(coef[-1])
        alphas.append(alpha)
        # ‖w‖² after the second pass = before − Σc² (the pass removes an orthogonal component)
        beta = math.sqrt(max(float(c[-1]) - float((coef**2).sum()), 0.0))
        if j == steps - 1 or beta <= 1e-12 * max(abs(a) for a in alphas):
            break
        betas.append(beta)
        basis[j + 1] = w / beta
    t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    return np.linalg.eigvalsh(t)[::-1].copy(), len(alphas)


def hutchinson(hvp: Callable[[Vec], Vec], probes: list[Vec], reduce: Reduce) -> tuple[float, float]:
    """(mean, standard error) of zᵀHz over the Rademacher probes z (local parts); two
    all-reduces for all probes (‖z‖², then zᵀHz). Hz is evaluated as ‖z‖·H(z/‖z‖) so the
    difference step is ε along a unit vector whatever the dimension."""
    if not probes:
        return math.nan, math.nan
    sq = torch.stack([torch.dot(z, z) for z in probes]).double()
    reduce(sq)
    norms = [math.sqrt(float(v)) for v in sq]
    q = torch.stack([torch.dot(z, hvp(z / nz)) for z, nz in zip(probes, norms)]).double()
    reduce(q)
    vals = q.cpu().numpy() * np.array(norms)
    se = float(vals.std(ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else math.nan
    return float(vals.mean()), se
