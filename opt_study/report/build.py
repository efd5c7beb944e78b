"""``write_report``: one HTML page with every table and figure of a study, logged to MLflow.

The page is ``<study>/report/index.html``, one self-contained file: its figures are PNGs inside
it (``data:`` URIs), so it renders from disk, copied anywhere, and in MLflow's artifact viewer
(which shows HTML from a ``blob:`` URL, where relative links to files beside it cannot resolve).
It reads a snapshot of the study, so it works while trials are still running, and it counts every
trial by status: diverged, failed, stopped, running and pending trials are listed, never silently
dropped.
"""

from __future__ import annotations

import datetime as _dt
import warnings
from pathlib import Path

from opt_study.report import critical, eos, figures, render, seed_claims, steps_to_target, tables
from opt_study.report.data import StudyData, load
from opt_study.storage import layout

SECTIONS: tuple[tuple[str, str], ...] = (
    ("overview", "Overview"),
    ("status", "Trials and their status"),
    ("assumptions", "Assumption table"),
    ("trajectories", "Trajectories"),
    ("distributions", "Distributions per optimizer"),
    ("sensitivity", "Hyperparameter sensitivity"),
    ("smoothness", "(L0, L1)-smoothness"),
    ("replay", "Checkpoint replay"),
    ("crowded-valley", "Crowded Valley: best loss vs tuning budget"),
    ("profiles", "Steps to target"),
    ("steps-to-target", "Steps-to-target protocol: confirmation over seeds"),
    ("edge-of-stability", "Edge of stability: sharpness against 2/η"),
    ("critical-sharpness", "Critical sharpness against λ_max"),
    ("loss-curves", "Loss curves"),
    ("query", "Query the data"),
)
# PNG files that reports before the page embedded its figures wrote beside it: removed.
OLD_FIGURE_FILES: tuple[str, ...] = (
    "trajectories",
    "smoothness",
    "replay",
    "crowded_valley",
    "profiles",
    "loss_curves",
)

_ASSUMPTION_COLUMNS = [
    ("label", "optimizer"),
    ("workload", "workload"),
    ("config", "best configuration"),
    ("seeds", "seeds"),
    ("statuses", "status"),
    ("n_measured", "measured steps"),
    ("n_flagged", "flagged"),
    ("frac_convexity_fwd_holds", "fwd holds"),
    ("frac_convexity_fwd_violated", "fwd violated"),
    ("frac_convexity_fwd_indeterminate", "fwd indet."),
    ("frac_convexity_bwd_holds", "bwd holds"),
    ("frac_convexity_bwd_violated", "bwd violated"),
    ("frac_convexity_bwd_indeterminate", "bwd indet."),
    ("smoothness_ratio", "eff. smoothness ratio"),
    ("smoothness_local_median", "median L_t"),
    ("smoothness_local_max", "max L_t (L̂)"),
    ("frac_descent_holds", "descent lemma holds (L̂)"),
    ("frac_progress_predicted", "progress predicted"),
    ("authors_gap_mean", "authors: mean inst. gap"),
    ("authors_gap_ema99", "authors: gap EMA 0.99"),
    ("authors_linear_over_loss_gap", "authors: Σ⟨g⁺,Δ⟩/Σδ"),
    ("authors_convexity_excess", "authors: Σ(⟨g⁺,Δ⟩ − δ)"),
    ("authors_smoothness_max", "authors: max L (per tensor)"),
]

_CLAIM_COLUMNS = [
    (k, k)
    for k in (
        "label",
        "n_measured",
        "fwd_holds",
        "bwd_holds",
        "convexity_most_steps",
        "L_hat",
        "eff_smoothness_ratio",
        "L_hat_over_ratio",
        "smoothness_loose",
        "progress_predicted",
    )
]


def _overview(data: StudyData, counts: dict) -> list[str]:
    open_ = counts.get("running", 0) + counts.get("pending", 0)
    parts = [
        render.note(
            f"Study folder {data.db.study_dir.resolve()}; workload {data.workload}; "
            f"{render.plural(len(data.trials), 'trial')}: "
            + ", ".join(f"{k} {v}" for k, v in counts.items() if v)
            + "."
        )
    ]
    if open_:
        parts.append(
            render.note(
                f"The study is still running ({render.plural(open_, 'trial')} pending or running): "
                "this page is a snapshot; their steps so far are included.",
                warn=True,
            )
        )
    bad = sum(counts.get(k, 0) for k in ("diverged", "failed", "stopped", "unknown"))
    if bad:
        parts.append(
            render.note(
                f"{render.plural(bad, 'trial')} diverged, failed, were stopped or lack a record: "
                "they are listed under Status and counted in every table.",
                warn=True,
            )
        )
    return parts


def _sections(data: StudyData, out: Path, q: float) -> dict[str, list[str]]:
    status = tables.status_table(data)
    counts = {k: v for k, v in status[-1].items() if k not in ("label", "trials")}
    s: dict[str, list[str]] = {"overview": _overview(data, counts)}
    cols = [(k, k) for k in status[0]]
    s["status"] = [
        render.table(status, cols),
        render.table(
            tables.problem_trials(data),
            [(k, k) for k in ("trial_id", "label", "status", "steps", "last_step", "final_loss", "error")],
            empty="Every trial completed.",
        ),
    ]
    assumption = tables.assumption_table(data)
    s["assumptions"] = [
        render.note(
            "Per optimizer, its best configuration (lowest mean best validation loss over "
            "seeds); each cell is the mean over seeds ± the half-width of the 95% Student-t "
            "interval (no interval from one seed). Fractions are over measured, unflagged "
            "steps, classified against the noise floor (arXiv:2407.01825; "
            "docs/METRICS.md §Noise floor)."
        ),
        render.table(assumption, _ASSUMPTION_COLUMNS, ci=True),
        render.note(seed_claims.NOTE),
        render.table(seed_claims.claim_rows(assumption), _CLAIM_COLUMNS),
    ]
    s["trajectories"] = [render.figure(figures.trajectory_figure(data), "trajectories")]
    s["distributions"] = [render.figure(figures.distribution_figure(data), "distributions per optimizer")]
    sens = figures.sensitivity_figure(data)
    s["sensitivity"] = [
        render.figure(sens, "hyperparameter sensitivity")
        if sens is not None
        else render.note("No numeric hyperparameter takes more than one value within an optimizer: nothing to scan.")
    ]
    env = tables.envelope_table(data, q=q)
    s["smoothness"] = [
        render.figure(figures.smoothness_figure(data, q=q), "(L0, L1)-smoothness"),
        render.table(env, [(k, k) for k in ("label", "L0", "L1", "q", "n", "frac_below")]),
    ]
    rep = figures.replay_figure(data)
    s["replay"] = (
        [
            render.figure(rep, "replay"),
            render.table(
                tables.replay_table(data),
                [
                    (k, k)
                    for k in (
                        "label",
                        "reference",
                        "snapshots",
                        "sum_num",
                        "sum_den",
                        "excess",
                        "ratio",
                        "predicted",
                        "consistent",
                    )
                ],
            ),
        ]
        if rep is not None
        else [
            render.note(
                "No replay/ dataset in this study: checkpoint-replay results appear "
                "here once a replay job has written replay/*.parquet."
            )
        ]
    )
    s["crowded-valley"] = _crowded_valley(data)
    s["profiles"] = _profiles(data)
    s["steps-to-target"] = steps_to_target.section(data)
    s["edge-of-stability"] = eos.section(data)
    s["critical-sharpness"] = critical.section(data)
    s["loss-curves"] = [render.figure(figures.loss_curves_figure(data), "loss curves")]
    s["query"] = [
        render.note(
            "Every number here comes from SQL over the study's Parquet record; "
            "views: steps, trials, steps_hp, groups, replay."
        ),
        f'<pre>opt-study query {data.db.study_dir} "SELECT optimizer, count(*) FROM '
        'steps_hp WHERE measured GROUP BY optimizer"\n'
        f"opt-study ui {data.db.study_dir}</pre>",
    ]
    return s


def _crowded_valley(data: StudyData) -> list[str]:
    rows = tables.crowded_valley_table(data)
    parts = []
    if rows and max(r["seeds"] for r in rows) == 1:
        parts.append(
            render.note(
                "One seed per configuration: each point is that seed's best validation loss; "
                "with several seeds each budget shows a box over seeds."
            )
        )
    parts += [
        render.figure(figures.crowded_valley_figure(data), "Crowded Valley"),
        render.table(
            rows,
            [(k, k) for k in ("label", "budget", "seeds", "median", "min", "max", "no_result", "trials_without_loss")],
        ),
    ]
    return parts


def _profiles(data: StudyData) -> list[str]:
    """A performance profile needs several workloads; a study has one, so the page shows each
    optimizer's steps to the target relative to the fastest instead of a profile (whose score
    would say 0 for an optimizer only a few percent slower)."""
    prof = tables.profile_table([data])
    finite = [r["steps"] for r in prof["rows"] if r["steps"] is not None and r["steps"] < float("inf")]
    fastest = min(finite, default=None)
    rows = [{**r, "relative": r["steps"] / fastest if fastest else None} for r in prof["rows"]]
    return [
        render.note(
            "One workload in a study, so no performance profile here: pass several studies to "
            "analysis/crowded_valley.py for profiles across workloads. Steps = steps until every "
            "seed of the best configuration reached the target (the lowest validation loss that "
            "all seeds of some optimizer reached); relative = steps / the fastest optimizer's "
            "(∞: never reached)."
        ),
        render.table(
            rows,
            [(k, k) for k in ("label", "target", "steps", "relative")],
            empty="No optimizer has a validation loss yet.",
        ),
    ]


def _mlflow_parent(data: StudyData, out: Path) -> tuple[str | None, str]:
    """The parent run id (or None) and a sentence saying where the report is logged."""
    from opt_study.results.query import parent_run_id

    if data.tracking_uri is None:
        return None, "MLflow: no tracking store found beside the study; not logged."
    try:
        run_id = parent_run_id(data.tracking_uri, data.name)
    except Exception as e:  # noqa: BLE001 - the page must be written even if MLflow is down
        return None, f"MLflow: not logged ({type(e).__name__}: {e})."
    if run_id is None:
        return None, f"MLflow: the study has no parent run in {data.tracking_uri}; not logged."
    return run_id, f"Logged as artifacts {out.name}/ of the study's MLflow parent run {run_id}."


def write_report(study_dir, out=None, *, mlflow: bool = True, threads: int | None = None, q: float = 0.95) -> Path:
    """Write ``<out>/index.html`` (default ``out = <study_dir>/report``) and its PNG figures;
    log the folder as artifacts of the study's MLflow parent run (``mlflow=False``: don't);
    return the page's path. ``q``: quantile of the (L0, L1) envelope; ``threads``: DuckDB's."""
    out = Path(out) if out is not None else layout.report_dir(study_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in OLD_FIGURE_FILES:  # PNGs of an older report: the page embeds its figures now
        layout.remove_tree(out / f"{name}.png")
    data = load(study_dir, threads=threads)
    try:
        run_id, where = _mlflow_parent(data, out) if mlflow else (None, "MLflow: not requested.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # glyph / tight-layout chatter
            parts = _sections(data, out, q)
        body = "\n".join(render.section(sid, title, parts[sid]) for sid, title in SECTIONS)
        now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        page = render.page(f"opt_study report: {data.name}", f"Generated {now}. {where}", list(SECTIONS), body)
        path = out / "index.html"
        # a browser reloading the page never sees half of it; the page reaches the object store
        # when the study's root is one (atomic_write uploads it)
        layout.atomic_write_bytes(path, page.encode("utf-8"))
        if run_id is not None:
            from opt_study.results.mlflow_sink import MlflowSink
            from opt_study.results.query import experiment_name

            MlflowSink(data.tracking_uri, experiment_name(data.name)).log_artifacts(run_id, out)
    finally:
        data.db.close()
    return path
