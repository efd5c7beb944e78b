"""The MLflow sink against a real MLflow SQLite store in a temporary directory.

One store per module (creating its tables takes about a second); each test uses its own
experiment, so the tests stay independent."""

from __future__ import annotations

import math

import pytest

from opt_study.results.mlflow_sink import MlflowSink, downsample


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('store').resolve() / 'mlflow.db'}"


@pytest.fixture
def sink(tracking_uri, request):
    return MlflowSink(tracking_uri, experiment_name=request.node.name)


def _children(sink, parent_id, trial_id=None):
    filt = f"tags.`mlflow.parentRunId` = '{parent_id}'"
    if trial_id is not None:
        filt += f" AND tags.`opt_study.trial_id` = '{trial_id}'"
    return sink.client.search_runs([sink.experiment_id], filter_string=filt)


def _curve(n, scale=1.0):
    return [(s, scale / (s + 1)) for s in range(n)]


def test_parent_run_is_idempotent(sink):
    params = {"optimizer": {"name": "adamw", "lr": 1e-3}, "trials": 4}
    first = sink.parent_run("study1", params, {"owner": "me"})
    assert sink.parent_run("study1", params, {"owner": "me"}) == first
    other = sink.parent_run("study2", {}, {})
    assert other != first
    runs = sink.client.search_runs([sink.experiment_id], "tags.`opt_study.role` = 'parent'")
    assert sorted(r.info.run_id for r in runs) == sorted([first, other])
    run = sink.client.get_run(first)
    assert run.data.params == {"optimizer.name": "adamw", "optimizer.lr": "0.001", "trials": "4"}
    assert run.data.tags["opt_study.study"] == "study1" and run.data.tags["owner"] == "me"
    with pytest.raises(ValueError, match="trials"):
        sink.parent_run("study1", {"trials": 5}, {})  # params are immutable in MLflow
    with pytest.raises(ValueError, match="study name"):
        sink.parent_run("x' OR '1'='1", {}, {})


def test_child_per_trial_with_params_and_tags(sink):
    parent = sink.parent_run("s", {}, {})
    ids = {}
    for i, status in enumerate(["completed", "diverged"]):
        ids[status] = sink.log_trial(
            parent,
            f"t{i}",
            params={"lr": 10.0**-i, "opt": {"beta": 0.9}, "note": "x" * 7000},
            tags={"optimizer": "sgd"},
            summary={"final_loss": 0.5 + i},
            curves={"loss": _curve(50)},
            status=status,
        )
    assert len(_children(sink, parent)) == 2
    done = sink.client.get_run(ids["completed"])
    assert done.data.params["lr"] == "1.0" and done.data.params["opt.beta"] == "0.9"
    assert len(done.data.params["note"]) == 6000  # truncated to MLflow's limit
    assert done.data.tags["opt_study.trial_id"] == "t0"
    assert done.data.tags["mlflow.parentRunId"] == parent
    assert done.data.tags["optimizer"] == "sgd"
    assert done.data.tags["opt_study.status"] == "completed"
    assert done.info.status == "FINISHED"
    failed = sink.client.get_run(ids["diverged"])
    assert failed.info.status == "FAILED" and failed.data.tags["opt_study.status"] == "diverged"
    assert failed.data.metrics["final_loss"] == 1.5


def test_log_trial_twice_logs_each_history_once(sink):
    parent = sink.parent_run("s", {}, {})
    kwargs = dict(
        params={"lr": 0.1},
        tags={},
        status="completed",
        summary={"final_loss": 0.25, "best": math.nan},
        curves={"loss": _curve(1000), "lr": [(s, 0.1) for s in range(0, 30, 3)]},
    )
    first = sink.log_trial(parent, "t0", **kwargs)
    second = sink.log_trial(parent, "t0", **kwargs)
    assert first == second and len(_children(sink, parent, "t0")) == 1
    keys = ("loss", "lr", "final_loss", "best")
    hist = {k: sink.client.get_metric_history(first, k) for k in keys}
    assert {k: len(v) for k, v in hist.items()} == {"loss": 200, "lr": 10, "final_loss": 1, "best": 1}
    steps = [m.step for m in hist["loss"]]
    assert steps[0] == 0 and steps[-1] == 999 and len(set(steps)) == 200
    assert math.isnan(hist["best"][0].value)  # NaN is kept, not dropped


def test_retried_trial_updates_summary_and_fills_curve(sink):
    parent = sink.parent_run("s", {}, {})
    run_id = sink.log_trial(parent, "t0", {}, {}, {"final_loss": 2.0}, {"loss": _curve(10)}, "failed")
    assert sink.client.get_run(run_id).info.status == "FAILED"
    again = sink.log_trial(parent, "t0", {}, {}, {"final_loss": 1.0}, {"loss": _curve(15)}, "running")
    assert again == run_id and sink.client.get_run(run_id).info.status == "RUNNING"
    sink.log_trial(parent, "t0", {}, {}, {"final_loss": 1.0}, {"loss": _curve(15)}, "completed")
    run = sink.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["final_loss"] == 1.0
    assert [m.value for m in sink.client.get_metric_history(run_id, "final_loss")] == [2.0, 1.0]
    assert sorted(m.step for m in sink.client.get_metric_history(run_id, "loss")) == list(range(15))


def test_log_trial_rejects_bad_input(sink):
    parent = sink.parent_run("s", {}, {})
    with pytest.raises(ValueError, match="status"):
        sink.log_trial(parent, "t0", {}, {}, {}, {}, "finished")
    with pytest.raises(ValueError, match="loss"):
        sink.log_trial(parent, "t0", {}, {}, {"loss": 1.0}, {"loss": [(0, 1.0)]}, "completed")
    with pytest.raises(ValueError, match="trial id"):
        sink.log_trial(parent, "a/b", {}, {}, {}, {}, "completed")
    assert _children(sink, parent) == []


@pytest.mark.parametrize("n,max_points", [(1000, 200), (201, 200), (7, 3), (10, 2)])
def test_downsample_keeps_first_and_last(n, max_points):
    points = _curve(n)
    out = downsample(points, max_points)
    assert len(out) == max_points
    assert out[0] == points[0] and out[-1] == points[-1]
    steps = [s for s, _ in out]
    assert steps == sorted(set(steps))  # a subsequence, no repeats
    assert all(p in points for p in out)


def test_downsample_short_and_invalid():
    assert downsample(_curve(5), 200) == _curve(5)
    assert downsample([], 10) == []
    with pytest.raises(ValueError, match="max_points"):
        downsample(_curve(5), 1)
