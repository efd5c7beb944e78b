"""The report's figures: each a function returning a ``matplotlib.figure.Figure``.

Figures are built with the object API (``Figure`` + Agg on save), never ``pyplot``: no global
backend or figure registry is touched, so the library is safe inside other programs and
threads. Every axis is labelled; a figure without data says so in its axes instead of failing
(a study that is still running may have no measured step yet).
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from opt_study.report import series, stats, tables
from opt_study.report.data import StudyData

_LABELS = {
    "convexity_gap_fwd": ("forward convexity gap", "⟨g_t, Δ_t⟩ − δ_t  (≤ 0 if convex)"),
    "convexity_gap_bwd": ("backward convexity gap", "δ_t − ⟨g⁺_t, Δ_t⟩  (≤ 0 if convex)"),
    "smoothness_local": ("local smoothness", "L_t = ‖g⁺_t − g_t‖ / ‖Δ_t‖"),
    "smoothness_descent": ("descent-lemma smoothness", "L^DL_t = 2(δ_t − ⟨g_t, Δ_t⟩) / ‖Δ_t‖²"),
    "cos_update_prev": ("update correlation", "cos(Δ_t, Δ_{t−1})"),
    "cos_grad_update": ("gradient-update alignment", "cos(g_t, Δ_t)"),
}


def colors(labels) -> dict[str, str]:
    """One fixed colour per label (tab10 in sorted order), shared by every figure."""
    return {label: f"C{i % 10}" for i, label in enumerate(sorted(labels))}


def _empty(ax, text: str = "no data yet") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _symlog(ax, values: list[np.ndarray]) -> None:
    """Symmetric log scale for signed quantities spanning decades (the convexity gaps), linear
    within the 10th percentile of their magnitudes."""
    mags = np.abs(np.concatenate(values)) if values else np.array([])
    mags = mags[np.isfinite(mags) & (mags > 0)]
    if mags.size:
        ax.set_yscale("symlog", linthresh=float(np.quantile(mags, 0.1)))


def trajectory_figure(data: StudyData) -> Figure:
    """Convexity gaps, local and descent-lemma smoothness and update correlation over training,
    one line per label (best configuration, mean over seeds; arXiv:2407.01825, Figs. 1-4)."""
    fig = Figure(figsize=(13, 7.5), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    traj = series.trajectories(data)
    col = colors(data.labels())
    for ax, name in zip(axes, series.TRAJECTORY_COLUMNS):
        title, ylabel = _LABELS[name]
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        drawn = []
        for label, cols in traj.items():
            steps, vals = cols[name]
            ok = np.isfinite(vals)
            if ok.any():
                ax.plot(steps[ok], vals[ok], color=col[label], label=label, lw=1.2)
                drawn.append(vals[ok])
        if not drawn:
            _empty(ax)
            continue
        if name.startswith("convexity_gap"):
            ax.axhline(0.0, color="0.3", lw=0.7)
            _symlog(ax, drawn)
        ax.legend(fontsize=8)
    fig.suptitle(f"{data.name}: trajectories of the best configuration per optimizer")
    return fig


def smoothness_figure(data: StudyData, q: float = 0.95) -> Figure:
    """(L0, L1)-smoothness: L_t against ‖g_t‖ with the fitted envelope L0 + L1‖g‖
    (``stats.quantile_envelope``, Zhang et al. 2020, https://arxiv.org/abs/1905.11881)."""
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    ax.set(xlabel="gradient norm ‖g_t‖", ylabel="local smoothness L_t", title=f"(L0, L1)-smoothness, {q:.0%} envelope")
    col, any_points = colors(data.labels()), False
    for label, (g, L) in series.smoothness_points(data).items():
        if g.size == 0:
            continue
        any_points = True
        fit = stats.quantile_envelope(g, L, q=q)
        ax.scatter(g, L, s=9, alpha=0.5, color=col[label])
        if math.isfinite(fit["L0"]):
            xs = np.linspace(float(g.min()), float(g.max()), 100)
            ax.plot(
                xs,
                fit["L0"] + fit["L1"] * xs,
                color=col[label],
                label=f"{label}: L0={fit['L0']:.3g}, L1={fit['L1']:.3g}",
            )
    if not any_points:
        _empty(ax)
    else:
        ax.legend(fontsize=8)
    return fig


def replay_figure(data: StudyData) -> Figure | None:
    """Checkpoint replay: the convexity ratio Σnum/Σden against each reference point, summed
    over the snapshots up to each step (sums before ratios, docs/METRICS.md §Aggregates); None without a
    ``replay/`` dataset. Convexity predicts ≥ 1 where Σden > 0 and ≤ 1 where Σden < 0."""
    rows = series.replay_sums(data)
    if not rows:
        return None
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    ax.set(
        xlabel="step of the snapshot x_e",
        ylabel="Σ⟨∇F(x_e), x_e − y⟩ / Σ(F(x_e) − F(y))",
        title="convexity ratio against the reference y (cumulative)",
    )
    col = colors({r["label"] for r in rows})
    styles = ["-", "--", ":", "-."]
    refs = sorted({r["reference"] for r in rows})
    for label, ref in sorted({(r["label"], r["reference"]) for r in rows}):
        rs = [r for r in rows if r["label"] == label and r["reference"] == ref]
        num, den = np.cumsum([r["num"] for r in rs]), np.cumsum([r["den"] for r in rs])
        ratio = np.where(den != 0, num / np.where(den != 0, den, 1.0), np.nan)
        ax.plot(
            [r["step"] for r in rs], ratio, styles[refs.index(ref) % 4], color=col[label], label=f"{label} vs {ref}"
        )
    ax.axhline(1.0, color="0.3", lw=0.7)
    ax.legend(fontsize=8)
    return fig


def crowded_valley_figure(data: StudyData) -> Figure:
    """Best validation loss within a tuning budget, box plots over seeds, per label (Schmidt,
    Schneider, Hennig 2021, https://arxiv.org/abs/2007.01547, Fig. 4). Seeds without a finite
    loss at a budget cannot be drawn: the legend counts them."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    ax.set(
        xlabel="tuning budget (configurations tried per seed)",
        ylabel="best validation loss (per seed)",
        title="best validation loss vs tuning budget",
    )
    values = tables.budget_values(data)
    col = colors(values)
    budgets = sorted({b for v in values.values() for b in v})
    width = 0.8 / max(1, len(values))
    handles = []
    for j, (label, by_b) in enumerate(values.items()):
        pos, boxes, missing = [], [], 0
        for i, b in enumerate(budgets):
            v = np.asarray(by_b.get(b, []), dtype=float)
            missing = max(missing, int(np.sum(~np.isfinite(v))))
            if np.isfinite(v).any():
                pos.append(i + (j - (len(values) - 1) / 2) * width)
                boxes.append(v[np.isfinite(v)])
        if boxes:
            bp = ax.boxplot(
                boxes,
                positions=pos,
                widths=width * 0.9,
                patch_artist=True,
                manage_ticks=False,
                medianprops={"color": "black"},
            )
            for patch in bp["boxes"]:
                patch.set(facecolor=col[label], alpha=0.6)
        note = f" ({missing} seed(s) without a finite loss)" if missing else ""
        handles.append(Patch(color=col[label], alpha=0.6, label=label + note))
    if budgets:
        ax.set_xticks(range(len(budgets)), [str(b) for b in budgets])
        ax.legend(handles=handles, fontsize=8)
    else:
        _empty(ax)
    return fig


def profile_figure(profile: dict) -> Figure:
    """Performance profiles ρ(τ) (``tables.profile_table``'s result): the share of workloads on
    which an optimizer reaches the target within τ times the fastest one's steps."""
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    n = len({r["problem"] for r in profile["rows"]})
    ax.set(
        xlabel="τ (steps relative to the fastest optimizer)",
        ylabel="fraction of workloads within τ",
        title=f"performance profiles ({n} workload(s))",
        ylim=(-0.02, 1.02),
    )
    col = colors(profile["curves"])
    for label, rho in profile["curves"].items():
        ax.step(
            profile["taus"],
            rho,
            where="post",
            color=col[label],
            label=f"{label} (score {profile['scores'][label]:.3f})",
        )
    if profile["curves"]:
        ax.legend(fontsize=8)
    else:
        _empty(ax)
    return fig


def loss_curves_figure(data: StudyData) -> Figure:
    """Training loss (lines) and validation loss (markers) of each label's best configuration,
    mean over seeds."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    ax.set(xlabel="step", ylabel="loss", title="best configuration per optimizer")
    col, drawn = colors(data.labels()), False
    for label, curves in series.loss_curves(data).items():
        steps, loss = curves["loss"]
        if steps.size:
            ax.plot(steps, loss, color=col[label], lw=1.0, alpha=0.8, label=f"{label} train")
            drawn = True
        steps, ev = curves["eval_loss"]
        if steps.size:
            ax.plot(steps, ev, "o--", color=col[label], ms=4, label=f"{label} validation")
            drawn = True
    if drawn:
        ax.legend(fontsize=8)
    else:
        _empty(ax)
    return fig
