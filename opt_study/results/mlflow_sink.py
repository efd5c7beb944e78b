"""MLflow as the index of a study: one parent run per study, one child run per trial.

The Parquet dataset is the source of truth; MLflow holds what is needed to find and compare
trials (params, tags, summary metrics, curves downsampled to a few hundred points). It is
written once per trial when the trial ends (or at a few milestones), never per step: a
SQLite store takes about 150 single-point calls per second, and ``log_batch`` of 1000
points about 5,000 points per second (docs/STACK.md §MLflow).

Every call is idempotent, so a driver that restarts, or a trial that is retried, can log
again without duplicating anything:

- the parent run is found by tags ``opt_study.study=<study>`` and ``opt_study.role=parent``;
- a child is found by tags ``mlflow.parentRunId`` and ``opt_study.trial_id``;
- params already present are not logged again (a different value is an error: MLflow params
  are immutable);
- a curve point whose step is already in the metric's history is not logged again; a
  summary metric is logged again only if its value changed (at the next step, so that it
  becomes the run's latest value).

``import mlflow`` happens inside the methods: importing this module is cheap.
"""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path

from opt_study.results.trials import TERMINAL_STATUSES, TRIAL_STATUSES, flatten
from opt_study.storage import layout

# MLflow's limits (mlflow.utils.validation): values longer than these are refused.
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_TAGS_PER_BATCH = 100

TAG_STUDY = "opt_study.study"
TAG_ROLE = "opt_study.role"
TAG_TRIAL = "opt_study.trial_id"
TAG_STATUS = "opt_study.status"
TAG_PARENT = "mlflow.parentRunId"
TAG_NOTE = "mlflow.note.content"  # what the MLflow UI shows as a run's description
# When the trial started and ended (unix seconds, from the trial records): the child run's start
# and end time, so its duration is the trial's even when the write was queued and delivered late.
TAG_STARTED = "opt_study.started_unix"
TAG_ENDED = "opt_study.ended_unix"

# MLflow metric names, grouped by prefix so the UI's charts and filters sort them: every-step
# curves under train/ and eval/, measured-step curves under measure/, a trial's end-of-run numbers
# under summary/, numeric hyperparameters under hp/ (params are strings: `metrics.`hp/lr` < 0.01`
# filters, `params.hp.lr < 0.01` cannot), per-label bests on the parent under best/<label>/.
TRAIN_CURVES = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "update_norm": "train/update_norm",
    "eval_loss": "eval/loss",
}
MEASURE_CURVES = (
    "convexity_gap_fwd",
    "convexity_gap_bwd",
    "smoothness_local",
    "smoothness_descent",
    "cos_update_prev",
    "noise_floor",
    "sharpness",  # curvature steps only (measure.curvature_every)
    "sharpness_precond",
    "critical_sharpness",
    "nb_loss_gap",  # measure.next_batch only: the identity of the previous update on this batch
    "nb_convexity_gap",
)
BEST_METRICS = {"summary/best_eval_loss": "eval_loss", "summary/best_loss": "loss"}


def downsample(points: list[tuple[int, float]], max_points: int) -> list[tuple[int, float]]:
    """At most ``max_points`` of ``points`` (in their order), evenly spaced by index, always
    keeping the first and the last. ``max_points`` must be >= 2."""
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2 to keep the first and last, got {max_points}")
    n = len(points)
    if n <= max_points:
        return list(points)
    # Spacing (n-1)/(max_points-1) > 1, so the rounded indices are distinct and increasing.
    idx = [round(i * (n - 1) / (max_points - 1)) for i in range(max_points)]
    return [points[i] for i in idx]


def flatten_params(params: dict) -> dict[str, str]:
    """Nested dicts joined with dots; values ``str()``-ed and truncated to MLflow's limit."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, str(key)))
        else:
            flat[str(key)] = value
    return {k: str(v)[:_MAX_PARAM_VALUE] for k, v in flat.items()}


def trial_metrics(
    summary: dict, rows: list[dict], hparams: dict
) -> tuple[dict[str, float], dict[str, list[tuple[int, float]]]]:
    """A trial's MLflow metrics from its summary, its step rows and its hyperparameters:
    ``(single values, curves)`` named as above. Measured-step curves use the measured,
    unflagged rows (a flagged row has no meaningful gap); the sink downsamples every curve."""
    values = {f"summary/{k}": float(v) for k, v in summary.items()}
    values.update(
        {f"hp/{k}": float(v) for k, v in hparams.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    )
    curves = {name: [(r["step"], r[col]) for r in rows if r.get(col) is not None] for col, name in TRAIN_CURVES.items()}
    measured = [r for r in rows if r.get("measured") and not r.get("flag")]
    curves.update(
        {f"measure/{c}": [(r["step"], r[c]) for r in measured if r.get(c) is not None] for c in MEASURE_CURVES}
    )
    return values, {k: v for k, v in curves.items() if v}


def _ms(tags: dict, key: str) -> int | None:
    """A unix-seconds tag as MLflow's milliseconds, or None."""
    try:
        return int(float(tags[key]) * 1000)
    except (KeyError, TypeError, ValueError):
        return None


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def check_trial_args(trial_id: str, status: str, summary: dict, curves: dict) -> None:
    """What log_trial refuses, direct or queued: a bad id or status, or a name that is both a
    summary metric and a curve."""
    layout.check_name(trial_id, "trial id")
    if status not in TRIAL_STATUSES:
        raise ValueError(f"status {status!r} not in {sorted(TRIAL_STATUSES)}")
    clash = set(summary) & set(curves)
    if clash:
        raise ValueError(f"names both in summary and curves: {sorted(clash)}")


class MlflowSink:
    """Parent/child runs of a study in one experiment of one tracking store (a ``sink.Sink``).

    Uses its own ``MlflowClient`` (no global ``mlflow.set_tracking_uri`` state), so several
    sinks, or a sink and user code, do not interfere.
    """

    def __init__(self, tracking_uri: str, experiment_name: str, max_curve_points: int = 200):
        from mlflow.tracking import MlflowClient

        repoint_local_artifacts(tracking_uri)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.max_curve_points = max_curve_points
        self.experiment_id = self._experiment(experiment_name)

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self.client.create_experiment(name, artifact_location=self._artifact_root())
            except MlflowException:  # created meanwhile by another process
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            self.client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def _artifact_root(self) -> str | None:
        """Beside a SQLite store: `<storage>/mlartifacts` (MLflow's default, ./mlruns under
        whatever directory the process runs in, would scatter a study's artifacts); a tracking
        server decides for itself (None)."""
        uri = self.client.tracking_uri
        if uri.startswith("sqlite:///"):
            return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
        return None

    def _find(self, experiment_id: str, filter_string: str):
        # Oldest first: if two processes raced to create the same run, all agree on one.
        runs = self.client.search_runs(
            [experiment_id], filter_string=filter_string, order_by=["attributes.start_time ASC"], max_results=1
        )
        return runs[0] if runs else None

    def parent_run(self, study: str, params: dict, tags: dict) -> str:
        """The id of the study's parent run, created on first use; logs missing params and
        sets ``tags`` (ours, ``opt_study.study`` and ``opt_study.role``, take precedence)."""
        layout.check_name(study, "study name")
        ours = {TAG_STUDY: study, TAG_ROLE: "parent"}
        run = self._find(self.experiment_id, f"tags.`{TAG_STUDY}` = '{study}' AND tags.`{TAG_ROLE}` = 'parent'")
        if run is None:
            run = self.client.create_run(self.experiment_id, run_name=study, tags={**_str_tags(tags), **ours})
        self._log_params(run, params)
        self._set_tags(run.info.run_id, {**tags, **ours})
        return run.info.run_id

    def find_parent_run(self, study: str) -> str | None:
        """The id of the study's parent run if it exists (the oldest one), else None.
        Creates nothing: a delivery that only knows the study name resolves its parent here."""
        layout.check_name(study, "study name")
        run = self._find(self.experiment_id, f"tags.`{TAG_STUDY}` = '{study}' AND tags.`{TAG_ROLE}` = 'parent'")
        return None if run is None else run.info.run_id

    def end_parent(self, parent_run_id: str, status: str = "FINISHED") -> None:
        """Mark the parent run terminated (``FINISHED``, ``FAILED`` or ``KILLED``)."""
        self.client.set_terminated(parent_run_id, status=status)

    def log_trial(
        self,
        parent_run_id: str,
        trial_id: str,
        params: dict,
        tags: dict,
        summary: dict[str, float],
        curves: dict[str, list[tuple[int, float]]],
        status: str,
    ) -> str:
        """Create or reuse the trial's child run and log what it lacks; return its id.

        ``curves`` map a metric name to ``(step, value)`` points in step order; each is
        downsampled to ``max_curve_points`` (first and last kept). Summary and curve names
        must differ. A terminal ``status`` ends the run: FAILED for failed/diverged,
        FINISHED otherwise; pending/running leave it running. Tag ``opt_study.status`` is
        always set.
        """
        check_trial_args(trial_id, status, summary, curves)
        experiment_id = self.client.get_run(parent_run_id).info.experiment_id
        ours = {TAG_PARENT: parent_run_id, TAG_TRIAL: trial_id, TAG_STATUS: status, TAG_ROLE: "trial"}
        run = self._find(
            experiment_id, f"tags.`{TAG_PARENT}` = '{parent_run_id}' AND tags.`{TAG_TRIAL}` = '{trial_id}'"
        )
        if run is None:
            run = self.client.create_run(
                experiment_id,
                run_name=trial_id,
                start_time=_ms(tags, TAG_STARTED),
                tags={**_str_tags(tags), **ours},
            )
        run_id = run.info.run_id
        self._log_params(run, params)
        self._set_tags(run_id, {**tags, **ours})
        metrics = self._new_metrics(run, summary, curves)
        for batch in _chunks(metrics, _MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=batch)
        if status in TERMINAL_STATUSES:
            final = "FAILED" if status in ("failed", "diverged") else "FINISHED"
            self.client.set_terminated(run_id, status=final, end_time=_ms(tags, TAG_ENDED))
        elif run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        self._update_best(parent_run_id, str(tags.get("opt_study.label", "")), trial_id, summary)
        return run_id

    def _update_best(self, parent_run_id: str, label: str, trial_id: str, summary: dict) -> None:
        """The parent's ``best/<label>/eval_loss`` and ``best/<label>/loss``: the lowest over the
        label's trials so far (logged only when a trial beats it, so re-delivery changes nothing),
        and tag ``opt_study.best.<label>`` naming the trial that holds the best eval loss."""
        from mlflow.entities import Metric, RunTag

        if not label:
            return
        have = self.client.get_run(parent_run_id).data.metrics
        ts, new, tags = int(time.time() * 1000), [], []
        for key, short in BEST_METRICS.items():
            value, name = summary.get(key), f"best/{label}/{short}"
            if value is None or not math.isfinite(value) or (name in have and have[name] <= value):
                continue
            steps = [m.step for m in self.client.get_metric_history(parent_run_id, name)] if name in have else []
            new.append(Metric(name, float(value), ts, max(steps, default=-1) + 1))
            if short == "eval_loss":
                tags.append(RunTag(f"opt_study.best.{label}", trial_id))
        if new:
            self.client.log_batch(parent_run_id, metrics=new, tags=tags)

    def describe_parent(self, parent_run_id: str, text: str, files: list) -> None:
        """The parent run's description (the UI's run page shows it) and the study's own files
        (``spec.yaml``, ``plan.json``) as artifacts at its root; files that do not exist yet
        are skipped. Uploading again replaces them."""
        self.client.set_tag(parent_run_id, TAG_NOTE, text[:_MAX_TAG_VALUE])
        for path in files:
            if Path(path).is_file():
                self.client.log_artifact(parent_run_id, str(path))

    def log_artifacts(self, run_id: str, folder) -> None:
        """Upload every file under ``folder`` as artifacts of run ``run_id``, under the
        artifact path ``<folder's name>/`` (e.g. ``report/index.html``). Logging the folder
        again replaces files of the same name, so a report can be refreshed."""
        folder = Path(folder)
        if not folder.is_dir():
            raise NotADirectoryError(f"not a folder: {folder}")
        self.client.log_artifacts(run_id, str(folder), artifact_path=folder.name)

    def drain(self, force: bool = True) -> int:
        """Nothing waits: every write is made when it is called (``Sink``'s contract)."""
        return 0

    def _log_params(self, run, params: dict) -> None:
        from mlflow.entities import Param

        flat = flatten_params(params)
        have = run.data.params
        conflicts = sorted(k for k, v in flat.items() if k in have and have[k] != v)
        if conflicts:
            raise ValueError(
                f"run {run.info.run_id} already has different values for params "
                f"{conflicts} (MLflow params are immutable)"
            )
        new = [Param(k, v) for k, v in flat.items() if k not in have]
        for batch in _chunks(new, _MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run.info.run_id, params=batch)

    def _set_tags(self, run_id: str, tags: dict) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in _str_tags(tags).items()]
        for batch in _chunks(items, _MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=batch)

    def _new_metrics(self, run, summary: dict, curves: dict) -> list:
        """The Metric entities not yet in the run (see the module docstring)."""
        from mlflow.entities import Metric

        run_id, latest = run.info.run_id, run.data.metrics
        ts = int(time.time() * 1000)
        out = []
        for key, value in summary.items():
            value = float(value)
            if key not in latest:
                out.append(Metric(key, value, ts, 0))
            elif not _same(latest[key], value):
                steps = [m.step for m in self.client.get_metric_history(run_id, key)]
                out.append(Metric(key, value, ts, max(steps, default=-1) + 1))
        for key, points in curves.items():
            points = downsample(points, self.max_curve_points)
            have = set()
            if key in latest:
                have = {m.step for m in self.client.get_metric_history(run_id, key)}
            out.extend(Metric(key, float(v), ts, int(s)) for s, v in points if int(s) not in have)
        return out


def _str_tags(tags: dict) -> dict[str, str]:
    return {str(k): str(v)[:_MAX_TAG_VALUE] for k, v in tags.items()}


def experiment_link(tracking_uri: str, experiment_name: str, base_url: str) -> str:
    """The MLflow UI's page of the experiment's runs in its training (machine-learning) view, at
    ``base_url``; the UI's home page when the experiment cannot be read (no such experiment yet,
    a server that is down)."""
    from mlflow.tracking import MlflowClient

    base = base_url.rstrip("/")
    try:
        exp = MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name(experiment_name)
    except Exception:  # noqa: BLE001 - a link is a convenience: the UI is still where it is
        exp = None
    if exp is None:
        return f"{base}/"
    return f"{base}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"


def repoint_local_artifacts(tracking_uri: str) -> int:
    """Make a SQLite store's artifact locations follow the store when its storage root moved.

    MLflow records each experiment's and run's artifact location as an absolute URI
    (``file:///old/root/mlartifacts/...``) and has no API to change it. A location under an
    ``mlartifacts/`` folder that no longer exists is rewritten to the ``mlartifacts/`` beside the
    store's database; one that exists (another live store) is left alone. Returns how many
    locations were rewritten. Anything but a local SQLite store: nothing to do."""
    if not tracking_uri.startswith("sqlite:///"):
        return 0
    db = Path(tracking_uri[len("sqlite:///") :])
    if not db.is_file():
        return 0
    here = (db.parent / "mlartifacts").resolve().as_uri()
    con = sqlite3.connect(db, timeout=30)
    try:
        with con:
            locs = [row[0] for row in con.execute("SELECT artifact_location FROM experiments")]
            olds = {loc[: loc.index("/mlartifacts") + len("/mlartifacts")] for loc in locs if _moved_root(loc)}
            return sum(_rewrite(con, old, here) for old in olds - {here})
    except sqlite3.OperationalError:  # not (yet) an MLflow store: MLflow creates its tables
        return 0
    finally:
        con.close()


def _moved_root(loc: str | None) -> bool:
    from urllib.parse import unquote, urlparse

    if not loc or not loc.startswith("file://") or "/mlartifacts" not in loc:
        return False
    root = loc[: loc.index("/mlartifacts") + len("/mlartifacts")]
    return not Path(unquote(urlparse(root).path)).exists()


def _rewrite(con: sqlite3.Connection, old: str, new: str) -> int:
    n = 0
    for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
        n += con.execute(
            f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
            (new, len(old) + 1, len(old), old),
        ).rowcount
    return n
