"""The report's tables: each a function of ``StudyData`` returning a list of row dicts.

Keys are stable (documented per function) so that recipes and tests can read the numbers;
``html.py`` renders them. Trials that diverged, failed, were stopped or are still running are
always counted (``status_table``) and never silently left out of a denominator: where a table
cannot use such a trial it says how many it could not use.
"""

from __future__ import annotations

import math

import numpy as np

from opt_study.measure.metrics import CLASSES
from opt_study.report import series, stats
from opt_study.report.data import STATUSES, StudyData, hp_text

# Per-trial statistics of the assumption table (arXiv:2407.01825, Tables 1-3; docs/METRICS.md
# §Aggregates).
ASSUMPTION_STATS: tuple[str, ...] = (
    *(f"frac_convexity_fwd_{k}" for k in CLASSES),
    *(f"frac_convexity_bwd_{k}" for k in CLASSES),
    "smoothness_ratio",
    "smoothness_local_median",
    "smoothness_local_max",
    "frac_descent_holds",
    "frac_progress_predicted",
    # beside ours: the authors' own aggregates over the trial (docs/METRICS.md §Authors' aggregates)
    "authors_gap_mean",
    "authors_gap_ema99",
    "authors_linear_over_loss_gap",
    "authors_convexity_excess",
    "authors_smoothness_max",
)


def status_table(data: StudyData) -> list[dict]:
    """One row per label and a final ``label = "all"`` row: ``trials`` and the count of each
    status in ``data.STATUSES`` (plus any other status seen, e.g. ``unknown`` for step rows
    without a trial record)."""
    seen = list(STATUSES) + sorted({t["status"] for t in data.trials.values()} - set(STATUSES))
    rows = []
    for label in [*data.labels(), "all"]:
        ts = [t for t in data.trials.values() if label in ("all", t["label"])]
        row = {"label": label, "trials": len(ts)}
        row.update({s: sum(t["status"] == s for t in ts) for s in seen})
        rows.append(row)
    return rows


def problem_trials(data: StudyData) -> list[dict]:
    """Every trial whose status is not ``completed``: ``trial_id, label, status, steps``
    (rows recorded), ``last_step``, ``final_loss`` and the first line of ``error``."""
    out, outcomes = [], data.outcomes()
    for t in sorted(data.trials.values(), key=lambda t: t["trial_id"]):
        if t["status"] == "completed":
            continue
        err = (t.get("error") or "").strip().splitlines()
        o = outcomes.get(t["trial_id"], {})
        out.append(
            {
                "trial_id": t["trial_id"],
                "label": t["label"],
                "status": t["status"],
                "steps": int(o.get("n_rows") or 0),
                "last_step": o.get("last_step"),
                "final_loss": o.get("final_loss"),
                "error": err[-1][:200] if err else "",
            }
        )
    return out


def _selected(data: StudyData, label: str, select: str) -> list[dict]:
    if select == "best":
        return [data.trials[t] for t in data.best.get(label, [])]
    if select == "all":
        return data.of_label(label)
    raise ValueError(f"select must be 'best' or 'all', got {select!r}")


def assumption_table(data: StudyData, select: str = "best", level: float = 0.95) -> list[dict]:
    """The assumption table of arXiv:2407.01825, one row per (label, workload).

    ``select="best"``: the label's best configuration (one trial per seed); ``"all"``: every
    trial of the label. For each statistic ``s`` of ``ASSUMPTION_STATS`` (per trial, over its
    measured steps: see ``data.trial_stats``), ``s`` is the mean over the selected trials and
    ``s_ci`` the half-width of the Student-t ``level`` interval (``stats.mean_ci``; NaN with
    one seed); ``s_n`` is how many trials had a finite value. Also: ``optimizer``, ``config``
    (hyperparameters, for ``best``), ``trials``, ``seeds``, ``statuses`` (e.g.
    ``"completed:3, diverged:1"``), ``n_measured`` and ``n_flagged`` (sums over trials).
    """
    rows = []
    for label in data.labels():
        ts = _selected(data, label, select)
        if not ts:
            continue
        counts: dict[str, int] = {}
        for t in ts:
            counts[t["status"]] = counts.get(t["status"], 0) + 1
        row = {
            "label": label,
            "optimizer": ts[0].get("optimizer"),
            "workload": ts[0].get("workload"),
            "config": hp_text(ts[0]) if select == "best" else "all",
            "trials": len(ts),
            "seeds": len({t.get("seed") for t in ts}),
            "statuses": ", ".join(f"{k}:{v}" for k, v in sorted(counts.items())),
            "n_measured": int(sum(t.get("n_measured") or 0 for t in ts)),
            "n_flagged": int(sum(t.get("n_flagged") or 0 for t in ts)),
        }
        for s in ASSUMPTION_STATS:
            mean, half, n = stats.mean_ci([t.get(s, math.nan) for t in ts], level)
            row[s], row[f"{s}_ci"], row[f"{s}_n"] = mean, half, n
        rows.append(row)
    return rows


def envelope_table(data: StudyData, q: float = 0.95) -> list[dict]:
    """The (L0, L1) envelope per label (best configuration, all its seeds' measured steps):
    ``label, L0, L1, q, n, frac_below`` (``stats.quantile_envelope``)."""
    return [
        {"label": label, **stats.quantile_envelope(g, L, q=q)}
        for label, (g, L) in series.smoothness_points(data).items()
    ]


def replay_table(data: StudyData) -> list[dict]:
    """Checkpoint replay (docs/METRICS.md §Aggregates), per (label, reference): ``snapshots``,
    ``sum_num`` = Σ⟨∇F(x_e), x_e − y⟩, ``sum_den`` = Σ(F(x_e) − F(y)), the primary statistic
    ``excess`` = Σ(num − den) (≥ 0 under convexity), ``ratio`` = Σnum/Σden (NaN if Σden = 0;
    the replay rows carry no noise floor), ``predicted`` (the direction convexity predicts:
    ``>= 1`` when Σden > 0, ``<= 1`` when Σden < 0) and ``consistent`` (whether it holds).
    Empty without a ``replay/`` dataset."""
    acc: dict[tuple, list] = {}
    for r in series.replay_sums(data):
        a = acc.setdefault((r["label"], r["reference"]), [0, 0.0, 0.0])
        a[0] += r["n"]
        a[1] += r["num"]
        a[2] += r["den"]
    rows = []
    for (label, ref), (n, num, den) in sorted(acc.items()):
        ratio = num / den if den != 0 else math.nan
        predicted = ">= 1" if den > 0 else ("<= 1" if den < 0 else "")
        consistent = (ratio >= 1) if den > 0 else ((ratio <= 1) if den < 0 else None)
        rows.append(
            {
                "label": label,
                "reference": ref,
                "snapshots": n,
                "sum_num": num,
                "sum_den": den,
                "excess": num - den,
                "ratio": ratio,
                "predicted": predicted,
                "consistent": consistent,
            }
        )
    return rows


def budget_values(data: StudyData) -> dict[str, dict[int, list[float]]]:
    """{label: {budget b: [best validation loss within the first b configurations, per seed]}}
    (Crowded Valley, Schmidt et al. 2021, https://arxiv.org/abs/2007.01547: the tuning budget is
    the number of configurations tried, in the plan's order). +inf where nothing finite yet."""
    out = {}
    for label in data.labels():
        per_seed: dict = {}
        for t in data.of_label(label):
            per_seed.setdefault(t.get("seed"), []).append(t.get("best_eval_loss"))
        runs = {seed: stats.best_so_far(vals) for seed, vals in per_seed.items()}
        n = max((len(v) for v in runs.values()), default=0)
        out[label] = {b: [r[min(b, len(r)) - 1] for r in runs.values()] for b in stats.budgets(n)}
    return out


def crowded_valley_table(data: StudyData) -> list[dict]:
    """Per label at its full budget: ``budget`` (configurations per seed), ``seeds``,
    ``median``, ``min``, ``max`` of the per-seed best validation loss, ``no_result`` (seeds
    without any finite validation loss), ``trials_without_loss`` (trials, of any status,
    without a finite validation loss: diverged, failed, pending or not yet evaluated)."""
    rows = []
    for label, by_budget in budget_values(data).items():
        if not by_budget:
            continue
        b = max(by_budget)
        vals = np.asarray(by_budget[b], dtype=float)
        fin = vals[np.isfinite(vals)]
        ts = data.of_label(label)
        rows.append(
            {
                "label": label,
                "budget": b,
                "seeds": int(vals.size),
                "median": float(np.median(fin)) if fin.size else math.nan,
                "min": float(fin.min()) if fin.size else math.nan,
                "max": float(fin.max()) if fin.size else math.nan,
                "no_result": int(vals.size - fin.size),
                "trials_without_loss": sum(1 for t in ts if not _finite(t.get("best_eval_loss"))),
            }
        )
    return rows


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


PROFILE_TAUS = tuple(np.linspace(1.0, 4.0, 301))  # AlgoPerf's τ_max = 4


def profile_table(studies: list[StudyData], taus=PROFILE_TAUS) -> dict:
    """Performance profiles across the workloads of ``studies`` (one problem per study).

    Returns ``{"rows", "scores", "taus", "curves"}``: ``rows`` per problem and label with
    ``problem`` (study/workload), ``target`` and ``steps`` (``series.time_to_target``);
    ``curves[label]`` = ρ(τ) on ``taus``; ``scores[label]`` the normalized area under it
    (``stats.profile_score``).
    """
    times, rows = {}, []
    for d in studies:
        target, costs = series.time_to_target(d)
        problem = f"{d.name}/{d.workload}"
        times[problem] = costs
        rows += [{"problem": problem, "label": k, "target": target, "steps": v} for k, v in sorted(costs.items())]
    curves = stats.performance_profile(times, taus)
    scores = {k: stats.profile_score(rho, taus) for k, rho in sorted(curves.items())}
    return {"rows": rows, "scores": scores, "taus": np.asarray(taus), "curves": curves}


def sensitivity_points(data: StudyData) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{label: {hyperparameter: [(value, best validation loss)] per trial}} for every numeric
    hyperparameter that takes more than one value within the label (the scan's axes). A trial
    without a finite validation loss (diverged, failed, not yet evaluated) has NaN."""
    out: dict[str, dict] = {}
    for label in data.labels():
        ts = data.of_label(label)
        names = sorted({k for t in ts for k in t if k.startswith("hp.")})
        by_hp = {}
        for name in names:
            pts = [(t[name], t.get("best_eval_loss")) for t in ts if _number(t.get(name))]
            if len({x for x, _ in pts}) > 1:
                by_hp[name[3:]] = [(float(x), math.nan if y is None else float(y)) for x, y in pts]
        if by_hp:
            out[label] = by_hp
    return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
