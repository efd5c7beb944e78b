"""The statistics of the report that are not per-step metrics: pure functions of numbers.

- ``mean_ci``: mean and Student-t confidence half-width over independent replicates (seeds);
- ``quantile_envelope``: the (L0, L1)-smoothness upper envelope, a constrained quantile fit;
- ``best_so_far``: the best value found within a tuning budget (Crowded Valley);
- ``performance_profile``: Dolan–Moré / AlgoPerf performance profiles.

Non-finite inputs have one meaning everywhere: "no result" (a diverged or failed trial, a target
never reached). They are never averaged; the callers count them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, int]:
    """``(mean, half_width, n)`` over the finite ``values``: the two-sided Student-t interval
    mean ± t_{(1+level)/2, n−1} · s/√n (s the sample standard deviation, ddof = 1).

    The mean is NaN for n = 0 and the half-width NaN for n < 2 (no interval from one seed).
    """
    from scipy.stats import t as student_t

    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = int(x.size)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(x[0]), math.nan, 1
    half = float(student_t.ppf(0.5 + level / 2.0, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return float(x.mean()), half, n


def _pinball_min_l0(y: np.ndarray, g: np.ndarray, l1: float, q: float) -> tuple[float, float]:
    """For a fixed slope, the best intercept L0 ≥ 0 and the pinball loss Σ ρ_q(y − L0 − L1 g).

    Σ ρ_q(z_i − c) is minimized by the q-quantile z_(⌈qn⌉) (``inverted_cdf``); under c ≥ 0 the
    loss is convex in c, so the constrained minimizer is max(0, that quantile).
    """
    z = y - l1 * g
    l0 = max(0.0, float(np.quantile(z, q, method="inverted_cdf")))
    r = z - l0
    return l0, float(np.sum(np.where(r > 0, q * r, (q - 1.0) * r)))


def quantile_envelope(
    grad_norm: Sequence[float], smoothness: Sequence[float], q: float = 0.95, tol: float = 1e-12
) -> dict[str, float]:
    """The (L0, L1)-smoothness envelope L_t ≤ L0 + L1‖g_t‖ fitted as a q-quantile regression
    with L0, L1 ≥ 0 (docs/METRICS.md §Aggregates: an upper envelope, not least squares).

    (L0, L1)-smoothness: Zhang, He, Sra, Jadbabaie 2020, https://arxiv.org/abs/1905.11881.
    Quantile regression: Koenker & Bassett 1978, https://doi.org/10.2307/1913643.

    Minimizes Σ ρ_q(L_i − L0 − L1 g_i), ρ_q(r) = max(q r, (q − 1) r). For a fixed L1 the best
    L0 is closed-form (``_pinball_min_l0``) and the remaining function of L1 is convex (a
    partial minimum of a jointly convex function), with its minimum in [0, max L_i/g_i]
    (beyond, the line is above every point and the loss grows), so a golden-section search
    finds it. Pairs with a non-finite value or g ≤ 0 are dropped.

    Returns ``L0, L1, q, n`` (points used) and ``frac_below`` (share of points with
    L_i ≤ L0 + L1 g_i, about q); NaN fit for fewer than 2 points.
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    g = np.asarray(grad_norm, dtype=float)
    y = np.asarray(smoothness, dtype=float)
    keep = np.isfinite(g) & np.isfinite(y) & (g > 0)
    g, y = g[keep], y[keep]
    if g.size < 2:
        return {"L0": math.nan, "L1": math.nan, "q": q, "n": float(g.size), "frac_below": math.nan}
    lo, hi = 0.0, max(0.0, float(np.max(y / g)))
    loss = lambda l1: _pinball_min_l0(y, g, l1, q)[1]  # noqa: E731
    phi = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - phi * (hi - lo), lo + phi * (hi - lo)
    fa, fb = loss(a), loss(b)
    while hi - lo > tol * max(1.0, hi):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - phi * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + phi * (hi - lo)
            fb = loss(b)
    # The search brackets the minimum; the ends of the original interval are candidates too.
    cands = [0.0, lo, hi, max(0.0, float(np.max(y / g)))]
    l1 = min(cands, key=loss)
    l0 = _pinball_min_l0(y, g, l1, q)[0]
    below = float(np.mean(y <= l0 + l1 * g + 1e-12 * np.abs(y)))
    return {"L0": l0, "L1": l1, "q": q, "n": float(g.size), "frac_below": below}


def best_so_far(values: Sequence[float]) -> list[float]:
    """Running minimum over a tuning sequence: entry b−1 is the best of the first b values.
    Non-finite values (diverged, failed, not yet evaluated) never improve it; the entry stays
    +inf until a finite value is seen."""
    out, best = [], math.inf
    for v in values:
        if v is not None and math.isfinite(v):
            best = min(best, float(v))
        out.append(best)
    return out


def budgets(n: int) -> list[int]:
    """Tuning budgets shown for n configurations: 1, 2, 4, ... and n itself."""
    out, b = [], 1
    while b < n:
        out.append(b)
        b *= 2
    return out + [n] if n >= 1 else []


def performance_profile(times: Mapping[str, Mapping[str, float]], taus: Sequence[float]) -> dict[str, np.ndarray]:
    """ρ_o(τ): the share of problems on which optimizer o is within a factor τ of the best.

    Dolan & Moré 2002, https://doi.org/10.1007/s101070100263; as used by AlgoPerf, Dahl et
    al. 2023, https://arxiv.org/abs/2306.07179 (Sec. 4.5). ``times[problem][optimizer]`` is a
    cost (e.g. steps to reach the target); +inf or NaN means "never reached". The ratio is
    r = t / min_o t; problems on which no optimizer has a finite cost are left out (they rank
    nobody). Every optimizer named anywhere gets a profile (missing entries count as inf).
    """
    names = sorted({o for per in times.values() for o in per})
    taus = np.asarray(taus, dtype=float)
    ratios: dict[str, list[float]] = {o: [] for o in names}
    for per in times.values():
        costs = {o: float(per.get(o, math.inf)) for o in names}
        costs = {o: (c if math.isfinite(c) else math.inf) for o, c in costs.items()}
        best = min(costs.values(), default=math.inf)
        if not math.isfinite(best):
            continue
        for o, c in costs.items():
            ratios[o].append(c / best if best > 0 else (1.0 if c == best else math.inf))
    out = {}
    for o in names:
        r = np.asarray(ratios[o], dtype=float)
        out[o] = np.array([np.mean(r <= t) for t in taus]) if r.size else np.full(taus.shape, math.nan)
    return out


def profile_score(rho: np.ndarray, taus: Sequence[float]) -> float:
    """The normalized area under a profile over [τ_min, τ_max] (1 = best on every problem),
    trapezoid rule (AlgoPerf's benchmark score, Dahl et al. 2023, Sec. 4.5)."""
    taus = np.asarray(taus, dtype=float)
    width = taus[-1] - taus[0]
    if width <= 0 or not np.all(np.isfinite(rho)):
        return math.nan
    return float(np.sum((rho[1:] + rho[:-1]) * np.diff(taus)) / 2.0 / width)
