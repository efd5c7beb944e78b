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
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from opt_study.report import series, stats, tables
from opt_study.report.data import StudyData

# Axis labels in matplotlib's mathtext (no TeX needed): what each trajectory is.
_LABELS = {
    "convexity_gap_fwd": ("forward convexity gap", r"$\langle g_t, \Delta_t\rangle - \delta_t$  (≤ 0 if convex)"),
    "convexity_gap_bwd": ("backward convexity gap", r"$\delta_t - \langle g^+_t, \Delta_t\rangle$  (≤ 0 if convex)"),
    "smoothness_local": ("local smoothness", r"$L_t = \|g^+_t - g_t\| \,/\, \|\Delta_t\|$"),
    "smoothness_descent": (
        "descent-lemma smoothness",
        r"$L^{DL}_t = 2(\delta_t - \langle g_t, \Delta_t\rangle) \,/\, \|\Delta_t\|^2$",
    ),
    "cos_update_prev": ("update correlation", r"$\cos(\Delta_t, \Delta_{t-1})$"),
    "cos_grad_update": ("gradient-update alignment", r"$\cos(g_t, \Delta_t)$"),
}
# A quantity whose positive values span at least this ratio is drawn on a log axis.
DECADES_FOR_LOG = 30.0


def colors(labels) -> dict[str, str]:
    """One fixed colour per label (tab10 in sorted order), shared by every figure."""
    return {label: f"C{i % 10}" for i, label in enumerate(sorted(labels))}


def _empty(ax, text: str = "no data yet") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _symlog(ax, values: list[np.ndarray], linthresh: float | None = None) -> None:
    """Symmetric log scale for signed quantities spanning decades (the convexity gaps), linear
    within ``linthresh`` (the gap plots pass the noise floor, so the linear band around 0 is
    exactly where a gap is indeterminate), else within the 10th percentile of the magnitudes.
    Major ticks at 0 and at most three powers of ten on each side, all outside the linear band,
    so their labels never overlap."""
    mags = np.abs(np.concatenate(values)) if values else np.array([])
    mags = mags[np.isfinite(mags) & (mags > 0)]
    if not mags.size:
        return
    lin = linthresh if linthresh and math.isfinite(linthresh) and linthresh > 0 else float(np.quantile(mags, 0.1))
    ax.set_yscale("symlog", linthresh=lin)
    lo, hi = math.floor(math.log10(lin)) + 1, max(math.floor(math.log10(lin)) + 1, math.ceil(math.log10(mags.max())))
    every = max(1, math.ceil((hi - lo + 1) / 3))
    powers = [10.0**e for e in range(hi, lo - 1, -every)]
    ax.yaxis.set_major_locator(FixedLocator(sorted([-p for p in powers] + [0.0] + powers)))
    ax.yaxis.set_major_formatter(FuncFormatter(_power_label))
    ax.yaxis.set_minor_locator(NullLocator())


def _power_label(v: float, _pos=None) -> str:
    if v == 0:
        return "0"
    return f"${'-' if v < 0 else ''}10^{{{round(math.log10(abs(v)))}}}$"


def _log_if_spans(ax, values, axis: str = "y", ratio: float = DECADES_FOR_LOG) -> bool:
    """A log axis where the values are all positive and their largest is at least ``ratio``
    times their smallest (a quadratic's loss going from 550 to 1 is a flat line on a linear
    axis)."""
    v = np.concatenate([np.asarray(x, dtype=float).ravel() for x in values]) if values else np.array([])
    v = v[np.isfinite(v)]
    if v.size and v.min() > 0 and v.max() / v.min() >= ratio:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
        return True
    return False


def trajectory_figure(data: StudyData) -> Figure:
    """Convexity gaps, local and descent-lemma smoothness and update correlation over training,
    one line per label (best configuration, mean over seeds; arXiv:2407.01825, Figs. 1-4). On
    the gap panels a shaded band ±noise floor per label: a gap inside it is indeterminate
    (docs/METRICS.md §Noise floor)."""
    fig = Figure(figsize=(13, 7.5), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    traj = series.trajectories(data, series.TRAJECTORY_COLUMNS + ("noise_floor",))
    col = colors(data.labels())
    for ax, name in zip(axes, series.TRAJECTORY_COLUMNS):
        title, ylabel = _LABELS[name]
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        drawn, floors = [], []
        for label, cols in traj.items():
            steps, vals = cols[name]
            ok = np.isfinite(vals)
            if ok.any():
                ax.plot(steps[ok], vals[ok], color=col[label], label=label, lw=1.2)
                drawn.append(vals[ok])
                if name.startswith("convexity_gap"):
                    floors.append(_noise_band(ax, cols["noise_floor"], col[label]))
        if not drawn:
            _empty(ax)
            continue
        handles = ax.get_legend_handles_labels()[0]
        if name.startswith("convexity_gap"):
            ax.axhline(0.0, color="0.3", lw=0.7)
            floors = [f for f in floors if math.isfinite(f)]
            _symlog(ax, drawn, linthresh=float(np.median(floors)) if floors else None)
            handles.append(Patch(color="0.5", alpha=0.3, label="± noise floor (indeterminate)"))
        elif not (name.startswith("smoothness") and _log_if_spans(ax, drawn)):
            ax.ticklabel_format(axis="y", useOffset=False)  # "1e-8 − 1" above a cosine near −1 reads as noise
        ax.legend(handles=handles, fontsize=8)
    fig.suptitle(f"{data.name}: trajectories of the best configuration per optimizer")
    return fig


def _noise_band(ax, noise: tuple[np.ndarray, np.ndarray], color: str) -> float:
    """The band ±noise floor over the steps; its median (NaN without one)."""
    steps, nf = noise
    ok = np.isfinite(nf)
    if not ok.any():
        return math.nan
    ax.fill_between(steps[ok], -nf[ok], nf[ok], color=color, alpha=0.2, lw=0)
    return float(np.median(nf[ok]))


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
        if boxes and max(len(b) for b in boxes) == 1:  # one seed: a box of one value is a line; draw the point
            ax.scatter(pos, [b[0] for b in boxes], color=col[label], s=36, zorder=3)
        elif boxes:
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
    """Training loss (lines) and validation loss (markers) of each label's best configuration:
    the mean over seeds, shaded between the lowest and highest seed. A log axis when the loss
    spans decades."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    ax.set(xlabel="step", ylabel="loss", title="best configuration per optimizer (band: min–max over seeds)")
    col, drawn = colors(data.labels()), []
    for label, curves in series.loss_curves(data).items():
        seeds = len(data.best.get(label, []))
        for key, style, what in (("loss", "-", "train"), ("eval_loss", "o--", "validation")):
            steps, mean, lo, hi = curves[key]
            if not steps.size:
                continue
            ax.plot(steps, mean, style, color=col[label], lw=1.0, ms=4, label=f"{label} {what}")
            if seeds > 1:
                ax.fill_between(steps, lo, hi, color=col[label], alpha=0.15, lw=0)
            drawn += [mean, lo]
    if drawn:
        _log_if_spans(ax, drawn)
        ax.legend(fontsize=8)
    else:
        _empty(ax)
    return fig


def sensitivity_figure(data: StudyData) -> Figure | None:
    """The hyperparameter scan: each trial's best validation loss against each numeric
    hyperparameter, one row of panels per optimizer (label), one point per trial and a line
    through the mean over seeds; log axes where the values span decades. None without a
    numeric hyperparameter that varies."""
    points = tables.sensitivity_points(data)
    rows = [(label, hp) for label, by_hp in points.items() for hp in by_hp]
    if not rows:
        return None
    labels = list(points)
    ncols = max(len(by_hp) for by_hp in points.values())
    fig = Figure(figsize=(max(6.5, 4.2 * ncols), 3.2 * len(labels)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(labels), ncols, squeeze=False))
    col = colors(data.labels())
    for i, label in enumerate(labels):
        for j in range(ncols):
            ax = axes[i, j]
            hps = list(points[label])
            if j >= len(hps):
                ax.set_visible(False)
                continue
            _sensitivity_panel(ax, points[label][hps[j]], hps[j], label, col[label])
    fig.suptitle(f"{data.name}: best validation loss against each hyperparameter")
    return fig


def _sensitivity_panel(ax, pts: list[tuple[float, float]], hp: str, label: str, color: str) -> None:
    ax.set(xlabel=hp, ylabel="best validation loss", title=label)
    xs = np.array([p[0] for p in pts], dtype=float)
    ys = np.array([p[1] for p in pts], dtype=float)
    ok = np.isfinite(ys)
    ax.scatter(xs[ok], ys[ok], color=color, s=18, alpha=0.7)
    ux = np.unique(xs[ok])
    ax.plot(ux, [ys[ok][xs[ok] == x].mean() for x in ux], color=color, lw=1.2)
    if (~ok).any():  # diverged or no evaluation: marked at the top, never dropped silently
        ax.scatter(xs[~ok], np.full((~ok).sum(), 1.0), marker="x", color="red", transform=ax.get_xaxis_transform())
    _log_if_spans(ax, [xs], axis="x", ratio=3.0)  # scans are log-spaced: lr 1e-3, 3e-3, 1e-2
    _log_if_spans(ax, [ys[ok]])


def distribution_figure(data: StudyData) -> Figure:
    """Distributions over the measured steps of each optimizer's best configuration (all seeds)
    of the two convexity gaps and the local smoothness, as in the paper's per-optimizer box plots
    (arXiv:2407.01825): box = quartiles, whiskers = 5th-95th percentile."""
    fig = Figure(figsize=(13, 4.5), layout="constrained")
    axes = fig.subplots(1, 3)
    vals = series.measured_values(data)
    col = colors(data.labels())
    labels = [lab for lab in vals if any(v.size for v in vals[lab].values())]
    for ax, name in zip(axes, ("convexity_gap_fwd", "convexity_gap_bwd", "smoothness_local")):
        title, ylabel = _LABELS[name]
        ax.set(title=title, xlabel="optimizer", ylabel=ylabel)
        data_ = [vals[lab][name] for lab in labels]
        if not any(d.size for d in data_):
            _empty(ax)
            continue
        bp = ax.boxplot(
            [d if d.size else [np.nan] for d in data_],
            whis=(5, 95),
            showfliers=False,
            patch_artist=True,
            medianprops={"color": "black"},
        )
        for patch, lab in zip(bp["boxes"], labels):
            patch.set(facecolor=col[lab], alpha=0.6)
        ax.set_xticks(range(1, len(labels) + 1), labels)
        if name.startswith("convexity_gap"):  # linear within the noise floor, as on the trajectories
            ax.axhline(0.0, color="0.3", lw=0.7)
            floors = np.concatenate([vals[lab]["noise_floor"] for lab in labels])
            _symlog(ax, [d for d in data_ if d.size], linthresh=float(np.median(floors)) if floors.size else None)
        else:
            _log_if_spans(ax, [d for d in data_ if d.size])
    fig.suptitle(f"{data.name}: distributions over measured steps (best configuration, all seeds)")
    return fig
