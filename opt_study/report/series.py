"""The step series behind the figures, fetched with SQL from the ``steps`` and ``replay`` views.

Every series is about each label's best configuration (``StudyData.best``) and is the mean over
its seeds at each step (seeds share their measured steps: the cadence depends on the step only).
Flagged measured rows (zero update, no probe) and non-finite values are left out of the means.
"""

from __future__ import annotations

import math

import numpy as np

from opt_study.report.data import StudyData

TRAJECTORY_COLUMNS: tuple[str, ...] = (
    "convexity_gap_fwd",
    "convexity_gap_bwd",
    "smoothness_local",
    "smoothness_descent",
    "cos_update_prev",
    "cos_grad_update",
)


def ids_sql(ids) -> str:
    """A SQL list literal of trial ids, for ``trial_id IN (...)`` (ids are quoted)."""
    return "(" + ", ".join("'" + str(i).replace("'", "''") + "'" for i in ids) + ")" if ids else "(NULL)"


def _label_of(data: StudyData) -> dict[str, str]:
    return {tid: label for label, ids in data.best.items() for tid in ids}


def _split(cols: dict, value_keys) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """{label: {key: (steps, values)}} from columns label, step, <keys> (rows sorted by step)."""
    out: dict[str, dict] = {}
    for label in sorted(set(cols["label"])) if len(cols["label"]) else []:
        sel = cols["label"] == label
        out[label] = {k: (cols["step"][sel], cols[k][sel]) for k in value_keys}
    return out


def trajectories(data: StudyData, columns=TRAJECTORY_COLUMNS) -> dict:
    """{label: {column: (steps, mean over seeds)}} of the measured, unflagged rows."""
    label_of = _label_of(data)
    if not label_of:
        return {}
    means = ", ".join(f"avg({c}) FILTER (isfinite({c})) AS {c}" for c in columns)
    cases = " ".join(
        f"WHEN '{t}' THEN '{lab}'"
        for t, lab in ((t.replace("'", "''"), lab.replace("'", "''")) for t, lab in label_of.items())
    )
    cols = data.db.columns(
        f"SELECT CASE trial_id {cases} END AS label, step, {means} FROM steps "
        f"WHERE measured AND coalesce(flag, '') = '' AND trial_id IN {ids_sql(label_of)} "
        "GROUP BY ALL ORDER BY label, step"
    )
    return _split(cols, columns)


def smoothness_points(data: StudyData) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{label: (‖g_t‖, L_t)} over the measured, unflagged rows of the best configuration."""
    out = {}
    for label, ids in data.best.items():
        cols = data.db.columns(
            "SELECT grad_norm, smoothness_local FROM steps WHERE measured "
            f"AND coalesce(flag, '') = '' AND trial_id IN {ids_sql(ids)} "
            "AND isfinite(grad_norm) AND isfinite(smoothness_local) ORDER BY trial_id, step"
        )
        out[label] = (cols["grad_norm"], cols["smoothness_local"])
    return out


def loss_curves(data: StudyData) -> dict[str, dict[str, tuple[np.ndarray, ...]]]:
    """{label: {"loss" | "eval_loss": (steps, mean, min, max over seeds)}} of the label's best
    configuration (min and max: the seed band). A non-finite loss (divergence) is kept out;
    the status table counts it."""
    out = {}
    for label, ids in data.best.items():
        curves = {}
        for col in ("loss", "eval_loss"):
            c = data.db.columns(
                f"SELECT step, avg({col}) AS v, min({col}) AS lo, max({col}) AS hi FROM steps WHERE "
                f"trial_id IN {ids_sql(ids)} AND isfinite({col}) "
                "GROUP BY step ORDER BY step"
            )
            curves[col] = (c["step"], c["v"], c["lo"], c["hi"])
        out[label] = curves
    return out


def measured_values(
    data: StudyData, columns=("convexity_gap_fwd", "convexity_gap_bwd", "smoothness_local", "noise_floor")
) -> dict:
    """{label: {column: values}}: every measured, unflagged, finite value of the label's best
    configuration (all seeds), for the distribution figures."""
    out = {}
    for label, ids in data.best.items():
        cols = data.db.columns(
            f"SELECT {', '.join(columns)} FROM steps WHERE measured AND coalesce(flag, '') = '' "
            f"AND trial_id IN {ids_sql(ids)} ORDER BY trial_id, step"
        )
        out[label] = {c: cols[c][np.isfinite(cols[c].astype(float))] for c in columns}
    return out


def time_to_target(data: StudyData) -> tuple[float, dict[str, float]]:
    """``(target, {label: steps})`` for the performance profile of this study's workload.

    The target is the lowest, over labels, of the validation loss that every seed of the
    label's best configuration reached (its worst seed's best); a label's cost is the first
    step by which every seed of its best configuration had an eval loss ≤ target (+inf if some
    seed never did). So the label that sets the target has a finite cost by construction.
    """
    worst = {}
    for label, ids in data.best.items():
        vals = [data.trials[t].get("best_eval_loss") for t in ids]
        vals = [math.inf if v is None or not math.isfinite(v) else v for v in vals]
        worst[label] = max(vals, default=math.inf)
    target = min(worst.values(), default=math.inf)
    if not math.isfinite(target):
        return target, {label: math.inf for label in data.best}
    costs = {}
    for label, ids in data.best.items():
        rows = data.db.rows(
            f"SELECT trial_id, min(step) FILTER (eval_loss <= ?) AS first "
            f"FROM steps WHERE trial_id IN {ids_sql(ids)} GROUP BY trial_id",
            [target],
        )
        firsts = {r["trial_id"]: r["first"] for r in rows}
        reached = [firsts.get(t) for t in ids]
        # A step number counts steps done: the row of step k is written after k + 1 steps.
        costs[label] = math.inf if any(v is None for v in reached) else float(max(reached) + 1)
    return target, costs


def replay_sums(data: StudyData) -> list[dict]:
    """Per (label, reference, step) of the replayed trials: Σ num and Σ den over the trials of
    the label at that snapshot (num = ⟨∇F(x_e), x_e − y⟩, den = F(x_e) − F(y)), step-sorted.
    Empty if the study has no ``replay/`` dataset."""
    if not data.db.has_replay:
        return []
    labels = {tid: t["label"] for tid, t in data.trials.items()}
    rows = data.db.rows(
        "SELECT trial_id, reference, step, ip_grad_dist, loss_gap FROM replay "
        "WHERE isfinite(ip_grad_dist) AND isfinite(loss_gap) "
        "ORDER BY reference, step, trial_id"
    )
    acc: dict[tuple, list[float]] = {}
    for r in rows:
        key = (labels.get(r["trial_id"], "?"), str(r["reference"]), int(r["step"]))
        s = acc.setdefault(key, [0.0, 0.0, 0])
        s[0] += r["ip_grad_dist"]
        s[1] += r["loss_gap"]
        s[2] += 1
    return [
        {"label": k[0], "reference": k[1], "step": k[2], "num": v[0], "den": v[1], "n": v[2]}
        for k, v in sorted(acc.items())
    ]
