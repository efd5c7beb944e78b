"""What a user finds in MLflow (docs/DESIGN.md §MLflow and the report), on a real SQLite store:
prefixed metric names, numeric hyperparameters as metrics, child runs timed by the trial records,
the parent's per-label bests and description (the e2e version: tests/e2e/test_report_in_browser.py)."""

from __future__ import annotations

import json
import math

import pytest

from opt_study.results.mlflow_sink import TAG_ENDED, TAG_STARTED, MlflowSink, repoint_local_artifacts, trial_metrics

ROWS = [
    {"step": s, "loss": 10.0 - s, "lr": 0.1, "grad_norm": 1.0, "eval_loss": 9.0 - s if s % 2 else None}
    | ({"measured": True, "convexity_gap_fwd": -0.5, "smoothness_local": 2.0 + s} if s % 3 == 0 else {})
    for s in range(7)
]
ROWS[6]["flag"] = "zero_update"  # a flagged measured row: no measure/ point


def test_trial_metrics_names_by_prefix():
    values, curves = trial_metrics({"best_eval_loss": 4.0}, ROWS, {"lr": 0.1, "nesterov": True, "betas": "x"})
    assert values == {"summary/best_eval_loss": 4.0, "hp/lr": 0.1}  # bools and strings are params only
    assert curves["train/loss"] == [(s, 10.0 - s) for s in range(7)]
    assert curves["eval/loss"] == [(1, 8.0), (3, 6.0), (5, 4.0)]
    assert curves["measure/smoothness_local"] == [(0, 2.0), (3, 5.0)]
    assert set(curves) == {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "eval/loss",
        "measure/convexity_gap_fwd",
        "measure/smoothness_local",
    }


def _log(sink, parent, tid, label, best, status, started=1000.0, ended=None):
    values, curves = trial_metrics({"best_eval_loss": best}, ROWS if ended else [], {"lr": 0.1})
    tags = {"opt_study.label": label, TAG_STARTED: str(started), TAG_ENDED: "" if ended is None else str(ended)}
    return sink.log_trial(parent, tid, {"optimizer": label}, tags, values, curves, status)


def test_child_runs_are_timed_by_the_trial_and_the_parent_keeps_the_bests(tmp_path):
    sink = MlflowSink(f"sqlite:///{tmp_path / 'mlflow.db'}", "opt_study/lay")
    parent = sink.parent_run("lay", {}, {})
    run = _log(sink, parent, "a", "sgd", math.nan, "running")  # at trial start
    info = sink.client.get_run(run).info
    assert info.status == "RUNNING" and info.start_time == 1_000_000
    assert _log(sink, parent, "a", "sgd", 3.0, "completed", ended=1012.5) == run  # at trial end: same run
    _log(sink, parent, "b", "sgd", 2.0, "completed", ended=1020.0)
    _log(sink, parent, "c", "sgd", 5.0, "completed", ended=1030.0)  # worse: the best stays b's
    _log(sink, parent, "d", "adamw", 4.0, "diverged", ended=1040.0)
    info = sink.client.get_run(run).info
    assert (info.start_time, info.end_time, info.status) == (1_000_000, 1_012_500, "FINISHED")
    p = sink.client.get_run(parent).data
    assert p.metrics["best/sgd/eval_loss"] == 2.0 and p.tags["opt_study.best.sgd"] == "b"
    assert p.metrics["best/adamw/eval_loss"] == 4.0 and p.tags["opt_study.best.adamw"] == "d"
    hist = sink.client.get_metric_history(parent, "best/sgd/eval_loss")
    assert [(m.step, m.value) for m in hist] == [(0, 3.0), (1, 2.0)]  # improvements only, in order
    _log(sink, parent, "b", "sgd", 2.0, "completed", ended=1020.0)  # re-delivery changes nothing
    assert len(sink.client.get_metric_history(parent, "best/sgd/eval_loss")) == 2
    roles = {r.data.tags["opt_study.role"] for r in sink.client.search_runs([sink.experiment_id])}
    assert roles == {"parent", "trial"}
    sgd = sink.client.search_runs([sink.experiment_id], "metrics.`hp/lr` < 0.5 AND tags.`opt_study.label` = 'sgd'")
    assert sorted(r.info.run_name for r in sgd) == ["a", "b", "c"]


def test_describe_parent(tmp_path):
    sink = MlflowSink(f"sqlite:///{tmp_path / 'mlflow.db'}", "opt_study/desc")
    parent = sink.parent_run("desc", {}, {})
    (tmp_path / "spec.yaml").write_text("study: {name: desc}\n")
    sink.describe_parent(parent, "**a study**", [tmp_path / "spec.yaml", tmp_path / "plan.json"])  # no plan yet
    assert sink.client.get_run(parent).data.tags["mlflow.note.content"] == "**a study**"
    assert [f.path for f in sink.client.list_artifacts(parent)] == ["spec.yaml"]


@pytest.mark.parametrize("n", [3, 199, 200, 5000])
def test_queue_entries_hold_downsampled_curves(tmp_path, n):
    from opt_study.results.mlflow_queue import QueuedSink

    q = QueuedSink(tmp_path / "s", "sqlite:////nonexistent/dir/mlflow.db", "opt_study/s", study="s")
    q._failed_at, q.retry_interval_s = 0.0, 1e9  # keep the entry queued: read what was written
    q.log_trial(None, "t", {}, {}, {}, {"train/loss": [(s, float(s)) for s in range(n)]}, "running")
    [entry] = q.pending()
    pts = json.loads(entry.read_text())["args"]["curves"]["train/loss"]
    assert len(pts) == min(n, 200) and pts[0] == [0, 0.0] and pts[-1] == [n - 1, float(n - 1)]


def test_a_moved_store_keeps_its_artifacts(tmp_path):
    """MLflow records absolute artifact locations; a storage root moved elsewhere is re-pointed
    to the mlartifacts/ beside its database when a sink (or `opt-study ui`) opens it."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    sink = MlflowSink(f"sqlite:///{old / 'mlflow.db'}", "opt_study/moved")
    parent = sink.parent_run("moved", {}, {})
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "index.html").write_text("<p>hi</p>")
    sink.log_artifacts(parent, tmp_path / "report")
    del sink
    old.rename(new)
    moved = MlflowSink(f"sqlite:///{new / 'mlflow.db'}", "opt_study/moved")
    assert moved.client.get_run(parent).info.artifact_uri.startswith((new / "mlartifacts").as_uri())
    local = moved.client.download_artifacts(parent, "report/index.html", str(tmp_path))
    assert open(local).read() == "<p>hi</p>"
    assert repoint_local_artifacts(f"sqlite:///{new / 'mlflow.db'}") == 0  # nothing left to move
