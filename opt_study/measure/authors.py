"""The aggregates the authors of arXiv:2407.01825 report, from stored measured rows (docs/METRICS.md
§Authors' aggregates).

Transcribed from their code, tranhp98/some_projects, test_properties/transformers/run_clm.py
lines 842-867 and 911-923 (and test_properties/ImageClassification/Cifar10/train.py lines 84-99,
which resets them every epoch):

    current_convexity_gap = current_loss - prev_loss - linear_approx   # δ_t − ⟨g⁺_t, Δ_t⟩
    num += linear_approx; denom += current_loss - prev_loss            # Σ⟨g⁺, Δ⟩, Σδ
    exp_avg_gap_1 = 0.99 * exp_avg_gap_1 + (1 - 0.99) * current_convexity_gap   (from 0)
    L = max(L, current_L); exp_avg_L_1 = 0.99 * exp_avg_L_1 + (1 - 0.99) * current_L
    logged: convexity_gap / iteration, num / denom ("linear/loss_gap"), exp_avg_*

where current_loss = f(w_t; x_{t−1}), prev_loss = f(w_{t−1}; x_{t−1}) and the gradient is taken
at w_t on the batch x_{t−1}: our ℓ⁺_t, ℓ_t, g⁺_t with s = 1, so their instantaneous gap is our
``convexity_gap_bwd`` and their L our ``smoothness_authors``. They update every step; we update
on measured steps (every ``measure.every``-th), so an EMA here has a horizon of 1/(1 − β)
MEASURED steps. Pure Python: the query layer (results.query.authors_aggregates) and the trial
summary (study.recorder.trial_summary) both call ``aggregate``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from opt_study.measure.names import AUTHORS_NAMES

# The EMA factors of run_clm.py (exp_avg_*_.99 and exp_avg_*_.9999); names.AUTHORS_NAMES has
# gap_<key> and smoothness_<key> for each.
EMA_BETAS: dict[str, float] = {"ema99": 0.99, "ema9999": 0.9999}


def _f(v) -> float:
    return math.nan if v is None else float(v)


def aggregate(rows: Iterable[Mapping]) -> dict[str, float]:
    """The authors' aggregates over one window: ``rows`` are the window's measured rows in step
    order (``loss``, ``loss_probe``, ``probe_s``, ``ip_probe_update``, ``convexity_gap_bwd``,
    ``smoothness_authors``, ``flag``). Flagged rows and rows whose gap is not finite are skipped,
    as in metrics.summarize. Undefined values (no rows, Σδ = 0) are NaN.

    - gap_mean = Σ gap_t / n, gap_t = δ_t − ⟨g⁺_t, s_tΔ_t⟩ (their ``convexity_gap / iteration``)
    - gap_ema99, gap_ema9999: e ← β·e + (1 − β)·gap_t from e = 0, no bias correction
    - linear_over_loss_gap = Σ⟨g⁺_t, s_tΔ_t⟩ / Σδ_t (their ``linear/loss_gap``)
    - convexity_excess = Σ(⟨g⁺_t, s_tΔ_t⟩ − δ_t) = −Σ gap_t, ≥ 0 under convexity
    - smoothness_max = max L_t, smoothness_ema*: the same EMAs of L_t (their L, exp_avg_L_*),
      over the rows where L_t is finite
    """
    n, gap_sum, num, den = 0, 0.0, 0.0, 0.0
    ema = dict.fromkeys(EMA_BETAS, 0.0)
    l_ema, l_max, n_l = dict.fromkeys(EMA_BETAS, 0.0), -math.inf, 0
    for r in rows:
        if r.get("flag"):
            continue
        delta = _f(r.get("loss_probe")) - _f(r.get("loss"))
        lin = _f(r.get("probe_s")) * _f(r.get("ip_probe_update"))  # ⟨g⁺_t, s_tΔ_t⟩
        gap = delta - lin
        if math.isfinite(gap):
            n, gap_sum, num, den = n + 1, gap_sum + gap, num + lin, den + delta
            for k, b in EMA_BETAS.items():
                ema[k] = b * ema[k] + (1.0 - b) * gap
        L = _f(r.get("smoothness_authors"))
        if math.isfinite(L):
            n_l, l_max = n_l + 1, max(l_max, L)
            for k, b in EMA_BETAS.items():
                l_ema[k] = b * l_ema[k] + (1.0 - b) * L
    out = {"n": float(n), "gap_mean": gap_sum / n if n else math.nan}
    out.update({f"gap_{k}": v if n else math.nan for k, v in ema.items()})
    out["linear_over_loss_gap"] = num / den if n and den != 0 else math.nan
    out["convexity_excess"] = num - den if n else math.nan
    out["smoothness_max"] = l_max if n_l else math.nan
    out.update({f"smoothness_{k}": v if n_l else math.nan for k, v in l_ema.items()})
    return {k: out[k] for k in AUTHORS_NAMES}


def summary(rows: Iterable[Mapping]) -> dict[str, float]:
    """``aggregate`` over a trial's measured rows, named for the trial summary (authors_*)."""
    return {f"authors_{k}": v for k, v in aggregate(rows).items()}


__all__ = ["AUTHORS_NAMES", "EMA_BETAS", "aggregate", "summary"]
