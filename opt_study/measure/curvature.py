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


def lanczos(
    hvp: Callable[[Vec], Vec], v0: Vec, steps: int, reduce: Reduce, window: int | None = None
) -> tuple[np.ndarray, int]:
    """Ritz values of H (descending) after up to ``steps`` Lanczos steps from start vector v0,
    and the number of steps taken (fewer if the Krylov space became invariant).

    Two all-reduces per step (one per Gram-Schmidt pass; the second also carries ‖w‖²),
    besides those of ``hvp``. v0 is any non-zero start vector (its local part).

    ``window=None`` keeps every basis vector and re-orthogonalises against all of them (memory:
    k × the local part, float64). ``window=w`` keeps only the last w: with w = 2 this is the
    classical three-term Lanczos with local re-orthogonalisation, memory a constant 2 vectors.
    In finite precision the basis then loses orthogonality once a Ritz value converges and
    copies ("ghosts") of converged eigenvalues appear, but the extreme Ritz values stay accurate
    (Paige's analysis; Meurant & Strakoš 2006, https://doi.org/10.1017/S096249290626001X), so
    λ_max is what the window keeps; the rest of ``hessian_top`` would repeat it.
    """
    keep = steps if window is None else max(2, min(window, steps))
    basis = torch.empty(keep, v0.numel(), dtype=torch.float64, device=v0.device)
    basis[0] = v0 / global_norm(v0, reduce)
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(steps):
        w = hvp(basis[j % keep])
        rows = [i % keep for i in range(max(0, j + 1 - keep), j + 1)]  # oldest first, newest last
        alpha = 0.0
        for rep in range(2):
            c = torch.stack([torch.dot(basis[i], w) for i in rows])
            if rep == 1:
                c = torch.cat([c, torch.dot(w, w).reshape(1)])  # ‖w‖² before the 2nd pass
            reduce(c)
            coef = c[: len(rows)]
            for i, a in zip(rows, coef):
                w = w - a * basis[i]
            alpha += float(coef[-1])
        alphas.append(alpha)
        # ‖w‖² after the second pass = before − Σc² (the pass removes an orthogonal component)
        beta = math.sqrt(max(float(c[-1]) - float((coef**2).sum()), 0.0))
        if j == steps - 1 or beta <= 1e-12 * max(abs(a) for a in alphas):
            break
        betas.append(beta)
        basis[(j + 1) % keep] = w / beta
    t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    return np.linalg.eigvalsh(t)[::-1].copy(), len(alphas)


GROW = 4.0  # bracket growth while the loss still decreases: τ up to 4^8 within 10 forwards


def critical_step(phi: Callable[[float], float], max_evals: int, start: float = 1.0) -> tuple[float | None, int]:
    """The critical step τc along a direction: the step at which the loss φ(τ) stops being below
    φ(0), found with at most ``max_evals`` evaluations of φ (φ(0) included). Returns (τc or None,
    evaluations used).

    Critical sharpness (Kalra et al. 2026, https://arxiv.org/abs/2601.16979): λc = 2/ηc, ηc the
    step along the update direction at which the loss stops decreasing. With h(τ) = φ(τ) − φ(0):

    1. bracket from ``start`` (τ = 1: the real update): multiply τ by GROW while h(τ) < 0, or
       halve it while h(τ) ≥ 0, until lo < hi with h(lo) < 0 ≤ h(hi) (a non-finite φ counts as ≥);
    2. refine the bracket by false position with the Illinois modification (Dowell & Jarratt
       1971, https://doi.org/10.1007/BF01934364), which converges superlinearly;
    3. τc = the root of the secant through the final bracket (exact when h is linear there).

    None when no bracket is found within the budget: the loss still decreased at the largest
    step tried (τc beyond it), or it increased at the smallest (the direction does not descend
    on this batch). On φ(τ) = ½(x + τΔ)ᵀA(x + τΔ), h(τ) = τ⟨Ax, Δ⟩ + ½τ²ΔᵀAΔ, and the only
    positive root is τc = −2⟨Ax, Δ⟩ / ΔᵀAΔ (docs/METRICS.md §Online curvature).
    """
    f0 = phi(0.0)
    n = 1

    def h(tau: float) -> float:
        nonlocal n
        n += 1
        v = phi(tau) - f0
        return v if math.isfinite(v) else math.inf

    lo = hi = None  # (τ, h(τ)) with h < 0, and with h ≥ 0
    tau = start
    while n < max_evals and (lo is None or hi is None):
        v = h(tau)
        if v < 0:
            lo = (tau, v)
            tau = tau * GROW
        else:
            hi = (tau, v)
            tau = tau / 2.0
    if lo is None or hi is None:
        return None, n
    tau_c, _ = _illinois(h, lo, hi, max_evals - n)
    return tau_c, n  # h counted every evaluation


def _illinois(h, lo: tuple[float, float], hi: tuple[float, float], budget: int) -> tuple[float, int]:
    """(the root in (lo, hi) of h, evaluations used), h(lo) < 0 ≤ h(hi), by Illinois false
    position with at most ``budget`` evaluations. An infinite h(hi) falls back to bisection."""
    side, used = 0, 0
    while True:
        (a, fa), (b, fb) = lo, hi
        if math.isinf(fb):
            c = 0.5 * (a + b)
        else:
            c = b - fb * (b - a) / (fb - fa)
            c = min(max(c, a), b)
        if used >= budget or b - a <= 1e-9 * b:
            return c, used
        used += 1
        fc = h(c)
        if fc < 0:
            lo = (c, fc)
            if side == -1 and not math.isinf(hi[1]):
                hi = (hi[0], hi[1] / 2)  # Illinois: halve the stale end's value
            side = -1
        else:
            hi = (c, fc)
            if side == 1:
                lo = (lo[0], lo[1] / 2)
            side = 1


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
