"""The seed paper's two claims, marked met / not met per optimizer on the assumption table.

Tran, Zhang & Cutkosky 2024 (https://arxiv.org/abs/2407.01825) find that along the training
trajectory the convexity-like first-order inequalities hold on most steps, while the
smoothness bound on the loss change, ⟨g, Δ⟩ + (L̂/2)‖Δ‖², is loose. The tests here
(configs/replications/tzc_tiny_lm_cpu.yaml states them), on the rows of
``tables.assumption_table`` (each optimizer's best configuration, means over seeds):

- convexity holds on most steps: ``frac_convexity_fwd_holds`` > MOST and
  ``frac_convexity_bwd_holds`` > MOST (shares of the measured, unflagged steps classified
  against the noise floor; docs/METRICS.md §Aggregates);
- the smoothness bound is loose: L̂ = ``smoothness_local_max`` ≥ LOOSE × the effective
  smoothness ratio ``smoothness_ratio`` = Σ(δ − ⟨g, Δ⟩)/(½Σ‖Δ‖²), the curvature the steps
  actually had. The looseness factor L̂/ratio is shown (∞ when the ratio ≤ 0: the loss changed
  by at most its linear term, so any positive L̂ overstates it).
"""

from __future__ import annotations

import math

from opt_study.report.eos import band_verdict

MOST = 0.5  # "most steps": more than half
LOOSE = 10.0  # "loose": L̂ at least 10× the effective smoothness ratio


def looseness(l_hat: float, ratio: float) -> float:
    """L̂ / effective smoothness ratio; ∞ when the ratio ≤ 0 < L̂, NaN without data."""
    if not (math.isfinite(l_hat) and math.isfinite(ratio)):
        return math.nan
    if ratio <= 0:
        return math.inf if l_hat > 0 else math.nan
    return l_hat / ratio


def _num(row: dict, key: str) -> float:
    v = row.get(key)
    return math.nan if v is None else float(v)


def claim_row(row: dict) -> dict:
    """One optimizer's line from its assumption-table row: the statistics and both verdicts."""
    fwd, bwd = _num(row, "frac_convexity_fwd_holds"), _num(row, "frac_convexity_bwd_holds")
    loose = looseness(_num(row, "smoothness_local_max"), _num(row, "smoothness_ratio"))
    convex = band_verdict(min(fwd, bwd), math.nextafter(MOST, math.inf), 1.0)
    return {
        "label": row["label"],
        "n_measured": row.get("n_measured"),
        "fwd_holds": fwd,
        "bwd_holds": bwd,
        "convexity_most_steps": convex,
        "L_hat": row.get("smoothness_local_max"),
        "eff_smoothness_ratio": row.get("smoothness_ratio"),
        "L_hat_over_ratio": loose,
        "smoothness_loose": band_verdict(loose, LOOSE, math.inf),
        "progress_predicted": row.get("frac_progress_predicted"),
    }


def claim_rows(assumption_rows: list[dict]) -> list[dict]:
    return [claim_row(r) for r in assumption_rows]


NOTE = (
    "Seed paper's claims (Tran, Zhang & Cutkosky 2024, arXiv:2407.01825), per optimizer's best "
    f"configuration: convexity holds on most steps (fwd and bwd holds > {MOST:g}), and the smoothness "
    f"bound ⟨g, Δ⟩ + (L̂/2)‖Δ‖² is loose (L̂ ≥ {LOOSE:g} × the effective smoothness ratio). "
    "progress_predicted: the share of steps on which that bound predicts a decrease."
)
