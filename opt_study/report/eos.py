"""The report's edge-of-stability section: per trial, the online sharpness λ_max and the critical
sharpness λc (docs/METRICS.md §Online curvature) against the optimizer's stability threshold, and
whether the late phase meets the acceptance band.

The threshold (Cohen et al. 2021, https://arxiv.org/abs/2103.00065): 2/η for gradient descent
with step η, and (2 + 2β)/η with heavy-ball momentum β (their §5 / App. on momentum). With a
schedule, η is the row's lr, so the threshold is taken row by row. Optimizers without a known
threshold (Adam's is a threshold on the preconditioned sharpness, not built) get their curves
and no verdict.

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
HEAVY_BALL = ("sgd", "momentum")  # torch SGD: heavy-ball momentum β (0 for plain sgd), no Nesterov

SQL = """
SELECT trial_id, step, lr, sharpness, critical_sharpness FROM steps
WHERE (sharpness IS NOT NULL OR critical_sharpness IS NOT NULL) AND trial_id IN {ids} ORDER BY trial_id, step
"""


def threshold_factor(optimizer: str, hparams: dict) -> float | None:
    """c in the threshold c/η: 2 + 2β for heavy-ball SGD (Cohen et al. 2021,
    https://arxiv.org/abs/2103.00065), None where no threshold on λ_max is known (or Nesterov)."""
    if optimizer not in HEAVY_BALL:
        return None
    hp = optim.resolve_hparams(optimizer, hparams)
    if hp.get("nesterov"):
        return None
    return 2.0 + 2.0 * float(hp.get("momentum", 0.0) or 0.0)


def trial_curves(data: StudyData) -> dict[str, dict[str, np.ndarray]]:
    """trial id -> {step, lr, sharpness, critical_sharpness} arrays of its curvature rows."""
    ids = sorted(data.trials)
    if not ids:
        return {}
    out: dict[str, dict[str, list]] = {}
    for r in data.db.rows(SQL.format(ids=ids_sql(ids))):
        d = out.setdefault(r["trial_id"], {k: [] for k in ("step", "lr", "sharpness", "critical_sharpness")})
        for k in d:
            d[k].append(math.nan if r[k] is None else float(r[k]))
    return {t: {k: np.asarray(v, dtype=float) for k, v in d.items()} for t, d in out.items()}


def verdict_row(trial: dict, c: dict[str, np.ndarray]) -> dict:
    """One trial's line: predicted threshold, late-phase medians, ratio and the verdict."""
    hp = {k[3:]: v for k, v in trial.items() if k.startswith("hp.") and v is not None}
    factor = threshold_factor(trial["optimizer"], hp)
    thr = factor / c["lr"] if factor is not None else np.full_like(c["lr"], math.nan)
    ok = np.isfinite(c["sharpness"])
    ratio = late_median(list((c["sharpness"] / thr)[ok])) if factor is not None else math.nan
    row = {
        "trial": trial["trial_id"],
        "optimizer": trial["optimizer"],
        "lr": float(c["lr"][-1]),
        "predicted": float(thr[-1]),
        "lambda_max_late": late_median(list(c["sharpness"][ok])),
        "lambda_c_late": late_median([v for v in c["critical_sharpness"] if math.isfinite(v)]),
        "ratio": ratio,
        "n": int(ok.sum()),
    }
    row["verdict"] = "no threshold" if factor is None else ("met" if abs(ratio - 1.0) <= BAND else "not met")
    return row


def figure(data: StudyData, curves: dict[str, dict[str, np.ndarray]]) -> Figure:
    """One panel per trial: λ_max and λc against the step, the threshold and its ±BAND band."""
    ids = sorted(curves)
    ncols = min(3, len(ids))
    nrows = math.ceil(len(ids) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, tid in zip(axes, ids):
        c, t = curves[tid], data.trials[tid]
        hp = {k[3:]: v for k, v in t.items() if k.startswith("hp.") and v is not None}
        factor = threshold_factor(t["optimizer"], hp)
        ax.plot(c["step"], c["sharpness"], ".-", ms=3, lw=1, label="λ_max (Lanczos)")
        ax.plot(c["step"], c["critical_sharpness"], ".", ms=3, alpha=0.7, label="λc (critical)")
        if factor is not None:
            thr = factor / c["lr"]
            ax.plot(c["step"], thr, "k--", lw=1, label=f"{factor:g}/η")
            ax.fill_between(c["step"], thr * (1 - BAND), thr * (1 + BAND), color="k", alpha=0.08, lw=0)
        late = c["step"][len(c["step"]) - max(1, len(c["step"]) // 4)]
        ax.axvspan(late, c["step"][-1], color="tab:orange", alpha=0.07, lw=0)
        ax.set_title(f"{tid} (lr {render.fmt(float(c['lr'][-1]), 3)})", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("sharpness")
        ax.legend(fontsize=7)
    for ax in axes[len(ids) :]:
        ax.set_visible(False)
    return fig


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
        for k in ("trial", "optimizer", "lr", "predicted", "lambda_max_late", "lambda_c_late", "ratio", "n", "verdict")
    ]
    return [
        render.note(
            "Edge of stability (Cohen et al. 2021, arXiv:2103.00065): under gradient descent with step η "
            "(heavy-ball momentum β) λ_max rises to the threshold (2 + 2β)/η and hovers there. "
            f"Acceptance band: the median of λ_max / threshold over the late phase (the last quarter of "
            f"a trial's curvature rows, shaded) within ±{BAND:.0%} of 1 (met / not met). λc = 2/ηc "
            "along the update direction (Kalra et al. 2026, arXiv:2601.16979) is drawn beside it."
        ),
        render.figure(figure(data, curves), "sharpness against the stability threshold"),
        render.table(rows, cols),
    ]
