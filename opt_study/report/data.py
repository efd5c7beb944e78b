"""What the report reads from a study, once: trial facts, per-trial statistics, best configs.

Everything goes through ``opt_study.results.query`` (DuckDB views over the Parquet record and the
trial records); nothing here imports pyarrow or MLflow. The per-trial statistics are the
window aggregates of docs/METRICS.md §Aggregates, with the window = the trial's measured steps,
computed in one SQL pass so that they scale to millions of rows. They are, on purpose, the
same numbers as ``opt_study.measure.metrics.summarize`` (the tests check it row for row):

- rows with a ``flag`` count in ``n_measured``/``n_flagged`` only;
- class fractions use the classes stored by ``metrics.classify`` (``cls_convexity_*``), over
  the unflagged rows that have one;
- the effective smoothness ratio sums before it divides:
  Σ(δ_t − ⟨g_t, s_tΔ_t⟩) / (½Σ‖s_tΔ_t‖²), over rows where both terms are finite;
- L̂ = max L_t over the window, and the descent-lemma gap δ_t − (⟨g_t, s_tΔ_t⟩ + (L̂/2)‖s_tΔ_t‖²)
  is classified against the stored noise floor with ``classify``'s rule (holds if gap < −floor,
  violated if gap > floor); "progress predicted" counts steps whose bound is below −floor;
- the authors' own aggregates (``authors_*``, docs/METRICS.md §Authors' aggregates) come from
  ``query.authors_aggregates``, the same ``measure.authors.aggregate`` that summarize calls;
- the online curvature's ``sharpness_late_median``, ``sharpness_max``,
  ``sharpness_precond_late_median`` and ``critical_sharpness_late_median`` from
  ``metrics.curvature_summary`` on the curvature rows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from opt_study.config import ConfigError, Spec, study_folder_spec
from opt_study.measure.metrics import CLASSES, curvature_summary
from opt_study.measure.names import AUTHORS_NAMES
from opt_study.results.query import StudyDB, authors_aggregates, open_study

STATUSES = ("pending", "running", "completed", "stopped", "diverged", "failed")

_CLS = ", ".join(
    f"count(*) FILTER (ok AND {c} = '{k}') AS {side}_{k}" for side, c in (("fwd", "cf"), ("bwd", "cb")) for k in CLASSES
)
_DL = ", ".join(
    f"count(*) FILTER (ok AND {cond}) AS dl_{k}"
    for k, cond in (
        ("holds", "dl_gap < -nf"),
        ("violated", "dl_gap > nf"),
        ("indeterminate", "dl_gap BETWEEN -nf AND nf"),
    )
)

# Training outcome per trial: a full scan, used by the status listing only (``outcomes``).
OUTCOME_SQL = """
SELECT trial_id, count(*) AS n_rows, max(step) AS last_step,
       arg_max(loss, step) FILTER (loss IS NOT NULL) AS final_loss
FROM steps GROUP BY trial_id
"""

# One scan for everything the tables need: the measured rows and the evaluation rows, read once
# (MATERIALIZED) for both passes: L̂ per trial, then the aggregates of the module docstring and
# the validation losses. (One scan, not two: at ~0.5 ms per file and query, the per-file cost
# is what dominates a study of many small chunks.)
STATS_SQL = f"""
WITH m AS MATERIALIZED (
  SELECT trial_id, step, measured, eval_loss, measured AND coalesce(flag, '') = '' AS ok,
         cls_convexity_fwd AS cf, cls_convexity_bwd AS cb, smoothness_local AS L,
         noise_floor AS nf,
         (loss_probe - loss) - probe_s * ip_grad_update AS sr_n,
         0.5 * probe_s * probe_s * sq_update AS sr_d,
         probe_s * ip_grad_update AS ipg, loss_probe - loss AS delta
  FROM steps WHERE measured OR eval_loss IS NOT NULL),
lhat AS (SELECT trial_id, max(L) FILTER (ok AND isfinite(L)) AS L_hat FROM m GROUP BY trial_id),
r AS (SELECT m.*, l.L_hat, delta - (ipg + l.L_hat * sr_d) AS dl_gap,
             ipg + l.L_hat * sr_d AS dl_bound
      FROM m JOIN lhat l USING (trial_id))
SELECT trial_id,
       min(eval_loss) FILTER (isfinite(eval_loss)) AS best_eval_loss,
       arg_max(eval_loss, step) FILTER (eval_loss IS NOT NULL) AS final_eval_loss,
       count(eval_loss) AS n_eval,
       count(*) FILTER (measured) AS n_measured, count(*) FILTER (measured AND NOT ok) AS n_flagged,
       count(cf) FILTER (ok) AS n_fwd, count(cb) FILTER (ok) AS n_bwd, {_CLS},
       sum(sr_n) FILTER (ok AND isfinite(sr_n) AND isfinite(sr_d)) AS sr_num,
       sum(sr_d) FILTER (ok AND isfinite(sr_n) AND isfinite(sr_d)) AS sr_den,
       median(L) FILTER (ok AND isfinite(L)) AS L_median, any_value(L_hat) AS L_max,
       count(*) FILTER (ok AND isfinite(dl_gap) AND isfinite(nf)) AS n_dl, {_DL},
       count(*) FILTER (ok AND isfinite(dl_gap) AND isfinite(nf) AND dl_bound < -nf)
         AS dl_progress
FROM r GROUP BY trial_id
"""


def _ratio(a, b) -> float:
    """a / b as in metrics: NaN if b is 0, missing or either is not finite."""
    if a is None or b is None or b == 0 or not (math.isfinite(a) and math.isfinite(b)):
        return math.nan
    return a / b


def trial_stats(db: StudyDB) -> dict[str, dict]:
    """trial id -> validation and measurement statistics (see the SQL above), with fractions
    ``frac_convexity_{fwd,bwd}_{holds,violated,indeterminate}``, ``smoothness_ratio``,
    ``smoothness_local_median``, ``smoothness_local_max`` (= L̂) and
    ``frac_descent_{holds,violated,indeterminate}``, ``frac_progress_predicted``."""
    out: dict[str, dict] = {}
    for r in db.rows(STATS_SQL):
        s = out[r["trial_id"]] = dict(r)
        for side in ("fwd", "bwd"):
            for k in CLASSES:
                s[f"frac_convexity_{side}_{k}"] = _ratio(float(r[f"{side}_{k}"]), float(r[f"n_{side}"]))
        for k in CLASSES:
            s[f"frac_descent_{k}"] = _ratio(float(r[f"dl_{k}"]), float(r["n_dl"]))
        s["frac_progress_predicted"] = _ratio(float(r["dl_progress"]), float(r["n_dl"]))
        s["smoothness_ratio"] = _ratio(r["sr_num"], r["sr_den"])
        s["smoothness_local_median"] = _nan(r["L_median"])
        s["smoothness_local_max"] = _nan(r["L_max"])
    for a in authors_aggregates(db):  # window = the trial, as metrics.summarize's authors_*
        if a["trial_id"] in out:
            out[a["trial_id"]].update({f"authors_{k}": a[k] for k in AUTHORS_NAMES})
    curv: dict[str, list[dict]] = {}
    for r in db.rows(CURVATURE_SQL):
        curv.setdefault(r["trial_id"], []).append(r)
    for tid, s in out.items():  # the online curvature's late-phase medians, as summarize's
        s.update(curvature_summary(curv.get(tid, [])))
    return out


# The curvature rows of each trial (measured steps with a sharpness column), for curvature_summary.
CURVATURE_SQL = """
SELECT trial_id, step, sharpness, sharpness_precond, critical_sharpness FROM steps
WHERE measured AND (sharpness IS NOT NULL OR critical_sharpness IS NOT NULL) ORDER BY trial_id, step
"""


def _nan(v) -> float:
    return math.nan if v is None else float(v)


def config_key(trial: dict) -> str:
    """Trials that differ only in their seed share this key (label + hyperparameters)."""
    hp = {k[3:]: v for k, v in trial.items() if k.startswith("hp.") and v is not None}
    return f"{trial.get('label') or trial.get('optimizer')}|{json.dumps(hp, sort_keys=True, default=str)}"


def hp_text(trial: dict) -> str:
    """``lr=0.001, momentum=0.9``: the hyperparameters of a trial, for tables and legends."""
    return ", ".join(
        f"{k[3:]}={v:.4g}" if isinstance(v, float) else f"{k[3:]}={v}"
        for k, v in sorted(trial.items())
        if k.startswith("hp.") and v is not None
    )


@dataclass
class StudyData:
    """A study as the report sees it. ``trials``: trial id -> trial row (the ``trials`` view)
    merged with ``trial_stats``; ``best``: label -> the trial ids (one per seed) of the label's
    best configuration (``best_configs``)."""

    db: StudyDB
    name: str
    workload: str
    tracking_uri: str | None
    trials: dict[str, dict]
    best: dict[str, list[str]] = field(default_factory=dict)
    _outcomes: dict[str, dict] | None = field(default=None, repr=False)

    def outcomes(self) -> dict[str, dict]:
        """trial id -> ``n_rows, last_step, final_loss`` (a full scan: computed on first use)."""
        if self._outcomes is None:
            self._outcomes = {r["trial_id"]: r for r in self.db.rows(OUTCOME_SQL)}
        return self._outcomes

    def labels(self) -> list[str]:
        return sorted({t["label"] for t in self.trials.values()})

    def of_label(self, label: str) -> list[dict]:
        return sorted(
            (t for t in self.trials.values() if t["label"] == label),
            key=lambda t: (t.get("index") or 0, t.get("seed") or 0, t["trial_id"]),
        )


def best_configs(trials: dict[str, dict]) -> dict[str, list[str]]:
    """label -> trial ids of its best configuration: the lowest mean over seeds of the best
    validation loss, a seed without a finite one (diverged, failed, not yet evaluated)
    counting as +inf. Ties and all-inf labels fall to the configuration first in the budget
    order (index). Running trials take part with their loss so far."""
    by_cfg: dict[str, list[dict]] = {}
    for t in trials.values():
        by_cfg.setdefault(config_key(t), []).append(t)
    best: dict[str, tuple] = {}
    for members in by_cfg.values():
        vals = [_nan(t.get("best_eval_loss")) for t in members]
        score = math.inf if any(not math.isfinite(v) for v in vals) else sum(vals) / len(vals)
        label = members[0]["label"]
        key = (score, min(t.get("index") or 0 for t in members))
        if label not in best or key < best[label][0]:
            best[label] = (key, sorted(t["trial_id"] for t in members))
    return {label: ids for label, (_, ids) in sorted(best.items())}


def _spec(study_dir: Path) -> Spec | None:
    """The spec the study folder was started from (structure only: no torch), or None for a
    results folder without a readable ``spec.yaml`` (the report still renders its data)."""
    try:
        return study_folder_spec(study_dir)
    except (ConfigError, ValueError):
        return None


def tracking_uri_for(study_dir: Path, spec: Spec | None) -> str | None:
    """The study's MLflow store: the spec's ``study.mlflow_uri``, else ``mlflow.db`` beside the
    study folder (the storage root, wherever the folder now lies); None if that file is absent."""
    if spec is not None and spec.study.mlflow_uri:
        return spec.study.mlflow_uri
    db = Path(study_dir).resolve().parent / "mlflow.db"
    return f"sqlite:///{db}" if db.is_file() else None


def load(study_dir, threads: int | None = None) -> StudyData:
    """Open ``study_dir`` and compute everything the tables and figures share."""
    study_dir = Path(study_dir)
    spec = _spec(study_dir)
    db = open_study(study_dir, threads=threads)
    workload = spec.workload.type if spec is not None else "workload"
    stats = trial_stats(db)
    trials = {}
    for t in db.rows("SELECT * FROM trials"):
        t["label"] = t.get("label") or t.get("optimizer") or "?"
        t["workload"] = t.get("workload") or workload
        trials[t["trial_id"]] = {**t, **stats.get(t["trial_id"], {})}
    for tid, s in stats.items():  # rows of a trial without a record: keep them, say so
        if tid not in trials:
            trials[tid] = {
                "trial_id": tid,
                "label": "?",
                "optimizer": "?",
                "status": "unknown",
                "workload": workload,
                **s,
            }
    name = spec.study.name if spec is not None else study_dir.resolve().name
    return StudyData(db, name, workload, tracking_uri_for(study_dir, spec), trials, best_configs(trials))
