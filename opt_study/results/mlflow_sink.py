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
        ours = {TAG_PARENT: parent_run_id, TAG_TRIAL: trial_id, TAG_STATUS: status}
        run = self._find(
            experiment_id, f"tags.`{TAG_PARENT}` = '{parent_run_id}' AND tags.`{TAG_TRIAL}` = '{trial_id}'"
        )
        if run is None:
            run = self.client.create_run(experiment_id, run_name=trial_id, tags={**_str_tags(tags), **ours})
        run_id = run.info.run_id
        self._log_params(run, params)
        self._set_tags(run_id, {**tags, **ours})
        metrics = self._new_metrics(run, summary, curves)
        for batch in _chunks(metrics, _MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=batch)
        if status in TERMINAL_STATUSES:
            final = "FAILED" if status in ("failed", "diverged") else "FINISHED"
            self.client.set_terminated(run_id, status=final)
        elif run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        return run_id

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
