"""The report's critical-sharpness section: does λc track λ_max where both are measured?

Kalra et al. 2026 (https://arxiv.org/abs/2601.16979) introduce the critical sharpness λc = 2/ηc
(ηc the step along the update direction at which the loss stops decreasing; docs/METRICS.md
§Online curvature) as a cheap stand-in for the Hessian sharpness λ_max and report that it
captures its phenomena, progressive sharpening and the edge of stability. On a quadratic under
gradient descent λc is the gradient's Rayleigh quotient, ≤ λ_max, and equal to it once the
gradient lies in the top eigenvector's direction, which is where the edge of stability drives it.

Acceptance band (tested here, stated in the replication configs): per trial, the median of the
row-wise ratio λc/λ_max over the late phase (the last quarter of the rows where both are
measured, ``eos.late``) within ±BAND of 1. The verdict is given for the optimizers whose edge of
stability is on λ_max (gradient descent, heavy-ball momentum: ``eos.threshold``); for Adam the
edge is on λ_max(P⁻¹H) and the paper makes no claim that λc along the preconditioned update
equals the raw λ_max, so its ratios are shown without a verdict. The early-phase median (the first
quarter) is shown beside it: where it is far below 1, λc did not track λ_max before the edge.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

from opt_study.report import eos, render
from opt_study.report.data import StudyData

BAND = 0.10  # ±10%: the same band as the edge-of-stability verdict


def early(values: np.ndarray) -> float:
    """The median of the first quarter (at least one) of the finite entries; NaN when none."""
    v = [float(x) for x in values if math.isfinite(x)]
    return float(np.median(v[: max(1, len(v) // 4)])) if v else math.nan


def ratios(c: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, λc/λ_max) of the rows where both are finite and λ_max > 0."""
    ok = np.isfinite(c["critical_sharpness"]) & np.isfinite(c["sharpness"]) & (c["sharpness"] > 0)
    return c["step"][ok], c["critical_sharpness"][ok] / c["sharpness"][ok]


def tracking_row(trial: dict, c: dict[str, np.ndarray]) -> dict:
    """One trial's line: how many rows carry both, the early and late median of λc/λ_max, the
    verdict against the band (or why there is none)."""
    _, r = ratios(c)
    th = eos.threshold(trial["optimizer"], eos.trial_hparams(trial))
    on_lmax = th is not None and th[0] == "sharpness"
    late = eos.late(r)
    verdict = (
        eos.trial_verdict(trial, eos.band_verdict(late, 1.0 - BAND, 1.0 + BAND))
        if on_lmax
        else "no claim (edge not on λ_max)"
    )
    return {
        "trial": trial["trial_id"],
        "optimizer": trial["optimizer"],
        "lr": float(c["lr"][-1]) if len(c["lr"]) else math.nan,
        "n_both": int(len(r)),
        "ratio_early": early(r),
        "ratio_late": late,
        "lambda_max_late": eos.late(c["sharpness"]),
        "lambda_c_late": eos.late(c["critical_sharpness"]),
        "verdict": verdict if len(r) else "no data",
    }


def figure(data: StudyData, curves: dict[str, dict[str, np.ndarray]]) -> Figure:
    """One panel per trial: λc/λ_max against the step (log scale), 1 and its ±BAND band."""
    ids = sorted(curves)
    fig, axes = eos.panels(len(ids))
    for ax, tid in zip(axes, ids):
        steps, r = ratios(curves[tid])
        if len(r):
            ax.semilogy(steps, np.clip(r, 1e-4, None), ".-", ms=3, lw=1, label="λc / λ_max")
            eos.shade_late(ax, steps)
        ax.axhline(1.0, color="k", ls="--", lw=1)
        ax.axhspan(1 - BAND, 1 + BAND, color="k", alpha=0.08, lw=0)
        ax.set_title(f"{tid} ({data.trials[tid]['optimizer']})", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("λc / λ_max")
        ax.legend(fontsize=7)
    return fig


def section(data: StudyData) -> list[str]:
    """The section's HTML parts (a note when no trial measured both λc and λ_max)."""
    curves = {t: c for t, c in eos.trial_curves(data).items() if t in data.trials and len(ratios(c)[1])}
    if not curves:
        return [
            render.note(
                "No step carries both λ_max and λc: set measure.curvature_every with lanczos_steps "
                "and critical_forwards above 0 (docs/METRICS.md §Online curvature)."
            )
        ]
    rows = [tracking_row(data.trials[t], curves[t]) for t in sorted(curves)]
    cols = [(k, k) for k in rows[0]]
    return [
        render.note(
            "Critical sharpness λc = 2/ηc along the update direction (Kalra et al. 2026, arXiv:2601.16979) "
            "against the Lanczos λ_max on the same rows. Acceptance band: the median of λc/λ_max over the "
            f"late phase (the last quarter of the rows with both, shaded) within ±{BAND:.0%} of 1, for "
            "optimizers whose edge of stability is on λ_max (gradient descent, heavy-ball momentum); Adam's "
            "ratios are shown without a verdict (its edge is on λ_max(P⁻¹H)). ratio_early: the first "
            "quarter's median, before the edge."
        ),
        render.figure(figure(data, curves), "critical sharpness over λ_max"),
        render.table(rows, cols),
    ]
