"""The report's edge-of-stability section: per trial, the online sharpness λ_max and the critical
sharpness λc (docs/METRICS.md §Online curvature) against the optimizer's stability threshold, and
whether the late phase meets the acceptance band.

The threshold (Cohen et al. 2021, https://arxiv.org/abs/2103.00065): 2/η for gradient descent
with step η, and (2 + 2β)/η with heavy-ball momentum β, on λ_max. For Adam (Cohen et al. 2022,
https://arxiv.org/abs/2207.14484) it is (2 + 2β1)/((1 − β1)η), 38/η at β1 = 0.9, on the
preconditioned sharpness λ_max(P⁻¹H) (``sharpness_precond``). With a schedule, η is the row's
lr, so the threshold is taken row by row. Other optimizers get their curves and no verdict.

The acceptance band: the median of λ_max/threshold over the late phase, the last quarter of the
trial's curvature rows (``measure.metrics.late_median``, the same window as the trial summary's
``sharpness_late_median``), within ±BAND of 1.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

from opt_study import optim
from opt_study.measure.metrics import late_median
from opt_study.report import render
from opt_study.report.data import StudyData
from opt_study.report.series import ids_sql

BAND = 0.10  # ±10% of the predicted threshold
COLUMNS = ("step", "lr", "sharpness", "sharpness_precond", "critical_sharpness")
HEAVY_BALL = ("sgd", "momentum")  # torch SGD: heavy-ball momentum β (0 for plain sgd), no Nesterov
ADAM = ("adam", "adamw")  # their β1: the threshold is on the preconditioned sharpness

SQL = """
SELECT trial_id, step, lr, sharpness, sharpness_precond, critical_sharpness FROM steps
WHERE (sharpness IS NOT NULL OR critical_sharpness IS NOT NULL) AND trial_id IN {ids} ORDER BY trial_id, step
"""


def threshold(optimizer: str, hparams: dict) -> tuple[str, float] | None:
    """(the column it bounds, c) of the threshold c/η: ("sharpness", 2 + 2β) for heavy-ball SGD
    (Cohen et al. 2021, https://arxiv.org/abs/2103.00065); ("sharpness_precond",
    (2 + 2β1)/(1 − β1)) for Adam (Cohen et al. 2022, https://arxiv.org/abs/2207.14484); None
    otherwise (or Nesterov)."""
    if optimizer in ADAM:
        b1 = float(optim.resolve_hparams(optimizer, hparams)["beta1"])
        return "sharpness_precond", (2.0 + 2.0 * b1) / (1.0 - b1)
    factor = threshold_factor(optimizer, hparams)
    return None if factor is None else ("sharpness", factor)


def threshold_factor(optimizer: str, hparams: dict) -> float | None:
    """c in the threshold c/η on λ_max: 2 + 2β for heavy-ball SGD (Cohen et al. 2021,
    https://arxiv.org/abs/2103.00065), None where no threshold on λ_max is known (or Nesterov)."""
    if optimizer not in HEAVY_BALL:
        return None
    hp = optim.resolve_hparams(optimizer, hparams)
    if hp.get("nesterov"):
        return None
    return 2.0 + 2.0 * float(hp.get("momentum", 0.0) or 0.0)


def trial_hparams(trial: dict) -> dict:
    """A report trial's hyperparameters (its non-null ``hp.*`` fields, prefix dropped)."""
    return {k[3:]: v for k, v in trial.items() if k.startswith("hp.") and v is not None}


def band_verdict(ratio: float, lo: float, hi: float) -> str:
    """ "met" when lo ≤ ratio ≤ hi, "not met" otherwise (a NaN ratio: "no data"). One rule for
    every acceptance band of the reproductions (this section, report.critical,
    report.seed_claims)."""
    if math.isnan(ratio):
        return "no data"
    return "met" if lo <= ratio <= hi else "not met"


def trial_verdict(trial: dict, verdict: str) -> str:
    """A band verdict, overruled for a trial that diverged or failed: its few rows before the end
    say nothing about where the run settles ("not met (diverged)")."""
    status = trial.get("status")
    if verdict in ("met", "not met") and status in ("diverged", "failed"):
        return f"not met ({status})"
    return verdict


def late(values: np.ndarray) -> float:
    """``late_median`` of the finite entries of ``values`` (the late phase of a curve)."""
    return late_median([float(v) for v in values if math.isfinite(v)])


def trial_curves(data: StudyData) -> dict[str, dict[str, np.ndarray]]:
    """trial id -> {step, lr, sharpness, sharpness_precond, critical_sharpness} arrays of its
    curvature rows."""
    ids = sorted(data.trials)
    if not ids:
        return {}
    out: dict[str, dict[str, list]] = {}
    for r in data.db.rows(SQL.format(ids=ids_sql(ids))):
        d = out.setdefault(r["trial_id"], {k: [] for k in COLUMNS})
        for k in d:
            d[k].append(math.nan if r[k] is None else float(r[k]))
    return {t: {k: np.asarray(v, dtype=float) for k, v in d.items()} for t, d in out.items()}


def verdict_row(trial: dict, c: dict[str, np.ndarray]) -> dict:
    """One trial's line: predicted threshold, late-phase medians, ratio and the verdict."""
    th = threshold(trial["optimizer"], trial_hparams(trial))
    col, factor = th if th is not None else ("sharpness", None)
    thr = factor / c["lr"] if factor is not None else np.full_like(c["lr"], math.nan)
    ok = np.isfinite(c[col])
    ratio = late_median(list((c[col] / thr)[ok])) if factor is not None else math.nan
    row = {
        "trial": trial["trial_id"],
        "optimizer": trial["optimizer"],
        "lr": float(c["lr"][-1]),
        "compared": col,
        "predicted": float(thr[-1]),
        "lambda_max_late": late(c["sharpness"]),
        "lambda_precond_late": late(c["sharpness_precond"]),
        "lambda_c_late": late(c["critical_sharpness"]),
        "ratio": ratio,
        "n": int(ok.sum()),
    }
    verdict = band_verdict(ratio, 1.0 - BAND, 1.0 + BAND)
    row["verdict"] = "no threshold" if factor is None or not ok.any() else trial_verdict(trial, verdict)
    return row


def figure(data: StudyData, curves: dict[str, dict[str, np.ndarray]]) -> Figure:
    """One panel per trial: λ_max and λc against the step, the threshold and its ±BAND band."""
    ids = sorted(curves)
    fig, axes = panels(len(ids))
    for ax, tid in zip(axes, ids):
        c, t = curves[tid], data.trials[tid]
        th = threshold(t["optimizer"], trial_hparams(t))
        ax.plot(c["step"], c["sharpness"], ".-", ms=3, lw=1, label="λ_max (Lanczos)")
        if np.isfinite(c["sharpness_precond"]).any():
            ax.plot(c["step"], c["sharpness_precond"], ".-", ms=3, lw=1, label="λ_max(P⁻¹H)")
        ax.plot(c["step"], c["critical_sharpness"], ".", ms=3, alpha=0.7, label="λc (critical)")
        if th is not None:
            factor = th[1]
            thr = factor / c["lr"]
            ax.plot(c["step"], thr, "k--", lw=1, label=f"{factor:g}/η")
            ax.fill_between(c["step"], thr * (1 - BAND), thr * (1 + BAND), color="k", alpha=0.08, lw=0)
        shade_late(ax, c["step"])
        ax.set_title(f"{tid} (lr {render.fmt(float(c['lr'][-1]), 3)})", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("sharpness")
        ax.legend(fontsize=7)
    return fig


def panels(n: int) -> tuple[Figure, list]:
    """A figure of n panels, 3 to a row (spare ones hidden): (figure, the n axes)."""
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def shade_late(ax, steps: np.ndarray) -> None:
    """Shade the late phase (the last quarter of the curvature rows) on ``ax``."""
    start = steps[len(steps) - max(1, len(steps) // 4)]
    ax.axvspan(start, steps[-1], color="tab:orange", alpha=0.07, lw=0)


def section(data: StudyData) -> list[str]:
    """The section's HTML parts (a note when no trial measured curvature)."""
    curves = trial_curves(data)
    if not curves:
        return [
            render.note(
                "No curvature rows: set measure.curvature_every to record λ_max and λc "
                "(docs/METRICS.md §Online curvature)."
            )
        ]
    rows = [verdict_row(data.trials[t], curves[t]) for t in sorted(curves) if t in data.trials]
    cols = [
        (k, k)
        for k in (
            "trial",
            "optimizer",
            "lr",
            "compared",
            "predicted",
            "lambda_max_late",
            "lambda_precond_late",
            "lambda_c_late",
            "ratio",
            "n",
            "verdict",
        )
    ]
    return [
        render.note(
            "Edge of stability (Cohen et al. 2021, arXiv:2103.00065): under gradient descent with step η "
            "(heavy-ball momentum β) λ_max rises to the threshold (2 + 2β)/η and hovers there; under Adam "
            "the preconditioned λ_max(P⁻¹H) does, at (2 + 2β1)/((1 − β1)η) = 38/η for β1 = 0.9 (Cohen et al. "
            "2022, arXiv:2207.14484). "
            f"Acceptance band: the median of λ_max / threshold over the late phase (the last quarter of "
            f"a trial's curvature rows, shaded) within ±{BAND:.0%} of 1 (met / not met). λc = 2/ηc "
            "along the update direction (Kalra et al. 2026, arXiv:2601.16979) is drawn beside it."
        ),
        render.figure(figure(data, curves), "sharpness against the stability threshold"),
        render.table(rows, cols),
    ]
