"""The steps-to-target protocol's result table (opt_study.plan.protocols.plan_steps_to_target),
scored with opt_study.report.significance.

Per optimizer, over its confirm-phase trials (one per rerun seed): steps to the target per seed,
counted only at evaluations after the schedule's decay ended (``significance.decay_end``); the
mean and the 95% Student-t interval of those steps (when every seed reached the target) and of
the final validation loss; and the verdict of the one-sided t-test at ``search.alpha``. A second
table says, for each ordered pair, whether A beats B in steps and in final loss (Welch).
``add_views`` gives both tables to ``opt-study query`` as the views ``steps_to_target`` and
``steps_to_target_pairs``.
"""

from __future__ import annotations

import math

from opt_study.config import Spec
from opt_study.report import significance, stats
from opt_study.report.data import StudyData, _spec
from opt_study.report.series import ids_sql

PHASE = "confirm"
RESULT_COLUMNS = [
    "label", "config", "seeds", "reached", "steps", "steps_ci", "final_eval_loss", "final_eval_loss_ci",
    "sd", "margin", "target", "verdict",
]  # fmt: skip
PAIR_COLUMNS = ["A", "B", "fewer_steps", "lower_final_loss"]
VIEWS = ("steps_to_target", "steps_to_target_pairs")


def confirm_trials(data: StudyData) -> dict[str, list[dict]]:
    """label -> its confirm-phase trial rows, by seed."""
    out: dict[str, list[dict]] = {}
    for t in sorted(data.trials.values(), key=lambda t: (t.get("seed") or 0, t["trial_id"])):
        if t.get("phase") == PHASE:
            out.setdefault(t["label"], []).append(t)
    return dict(sorted(out.items()))


def eval_points(data: StudyData, ids: list[str]) -> dict[str, list[tuple[int, float]]]:
    """trial id -> [(step, eval_loss)] of its evaluations (the steps view keeps a restarted
    trial's last attempt)."""
    rows = data.db.rows(
        f"SELECT trial_id, step, eval_loss AS v FROM steps WHERE eval_loss IS NOT NULL AND trial_id IN {ids_sql(ids)}"
    )
    out: dict[str, list[tuple[int, float]]] = {t: [] for t in ids}
    for r in rows:
        out[r["trial_id"]].append((int(r["step"]), float(r["v"])))
    return out


def result_table(data: StudyData, spec: Spec) -> tuple[list[dict], dict[str, dict]]:
    """(rows, per-label values) of the protocol's result; per-label values hold the per-seed
    ``steps`` and ``final`` lists for the pairwise table."""
    target, alpha = spec.search.target.value, spec.search.alpha
    counted_from = significance.decay_end(spec.training.schedule, spec.training.steps)
    rows, values = [], {}
    for label, ts in confirm_trials(data).items():
        pts = eval_points(data, [t["trial_id"] for t in ts])
        steps = [significance.steps_to_target(pts[t["trial_id"]], target, counted_from) for t in ts]
        final = [math.inf if t.get("status") != "completed" else _num(t.get("final_eval_loss")) for t in ts]
        values[label] = {"steps": steps, "final": final}
        reached = sum(math.isfinite(s) for s in steps)
        s_mean, s_ci, _ = stats.mean_ci(steps) if reached == len(steps) else (math.inf, math.nan, 0)
        f_mean, f_ci, n_f = stats.mean_ci(final)
        sd = _sd(final)
        rows.append(
            {
                "label": label,
                "config": ts[0].get("index"),
                "seeds": len(ts),
                "reached": f"{reached}/{len(ts)}",
                "steps": s_mean,
                "steps_ci": s_ci,
                "final_eval_loss": f_mean,
                "final_eval_loss_ci": f_ci,
                "sd": sd,
                "margin": significance.reach_margin(n_f, sd, alpha),
                "target": target,
                "verdict": "reaches" if significance.reaches(final, target, alpha) else "not shown",
            }
        )
    return rows, values


def pairwise_table(values: dict[str, dict], alpha: float) -> list[dict]:
    """Every ordered pair (A, B), A ≠ B, where A beats B in steps or in final loss."""
    rows = []
    for a, va in values.items():
        for b, vb in values.items():
            fewer = significance.beats(va["steps"], vb["steps"], alpha)
            lower = significance.beats(va["final"], vb["final"], alpha)
            if a != b and (fewer or lower):
                rows.append({"A": a, "B": b, "fewer_steps": fewer, "lower_final_loss": lower})
    return rows


def add_views(data: StudyData) -> None:
    """Register the result table and the pairwise table as the views of ``VIEWS`` on
    ``data.db``; ``QueryError`` for a study under another protocol."""
    from opt_study.results.query import QueryError

    spec = _spec(data.db.study_dir)
    if spec is None or spec.search.protocol != "steps_to_target":
        raise QueryError(f"{VIEWS[0]}: {data.db.study_dir} is not a steps_to_target study (search.protocol)")
    rows, values = result_table(data, spec)
    data.db.add_view(VIEWS[0], rows, RESULT_COLUMNS)
    data.db.add_view(VIEWS[1], pairwise_table(values, spec.search.alpha), PAIR_COLUMNS)


def section(data: StudyData) -> list[str]:
    """The report's parts for this protocol (a note for a study under another protocol)."""
    from opt_study.report import render

    spec = _spec(data.db.study_dir)
    if spec is None or spec.search.protocol != "steps_to_target":
        return [render.note("Not a steps_to_target study (search.protocol): no protocol result.")]
    rows, values = result_table(data, spec)
    alpha, s = spec.search.alpha, spec.training.schedule
    counted = significance.decay_end(s, spec.training.steps)
    cols = ["label", "config", "seeds", "reached", "steps", "final_eval_loss", "sd", "margin", "target", "verdict"]
    return [
        render.note(
            f"Per optimizer, its best tuned configuration (index config) rerun with each confirmation seed. "
            f"steps: steps done at the first evaluation with validation loss ≤ {spec.search.target.value} "
            f"counted from step {counted} on (schedule {s.type}: its decay has ended), mean ± 95% "
            f"Student-t interval (∞ unless every seed reached it). verdict 'reaches': mean final loss + "
            f"margin < target, margin = t(1−α, n−1)·sd/√n with α = {alpha} (the one-sided t-test "
            "of modded-nanogpt's record rule)."
        ),
        render.table(rows, [(k, k) for k in cols], ci=True, empty="No confirmation trial yet."),
        render.note(
            f"A beats B: mean(B) − mean(A) > t(1−α, ν)·√(sd_A²/n_A + sd_B²/n_B) (Welch, α = {alpha}), "
            "in steps to the target (every seed of both reached it) or in final validation loss."
        ),
        render.table(
            pairwise_table(values, alpha),
            [(k, k) for k in ("A", "B", "fewer_steps", "lower_final_loss")],
            empty="No optimizer beats another at this significance level.",
        ),
    ]


def _num(v) -> float:
    return math.inf if v is None or not math.isfinite(v) else float(v)


def _sd(x: list[float]) -> float:
    f = [v for v in x if math.isfinite(v)]
    if len(f) < 2:
        return math.nan
    m = sum(f) / len(f)
    return math.sqrt(sum((v - m) ** 2 for v in f) / (len(f) - 1))
