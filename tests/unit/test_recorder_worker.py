"""The recorder's per-trial I/O runs on one worker thread, off Tune's loop (issue 16): in order,
each trial's record, and a failed job's exception reaches the loop's next step and `join`."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from opt_study.plan import TrialPlan
from opt_study.results.parquet import StepWriter
from opt_study.results.sink import NullSink
from opt_study.results.trials import read_trial_records
from opt_study.storage import layout
from opt_study.study.recorder import StudyRecorder


def _trial(plan: TrialPlan, status: str = "completed"):
    return SimpleNamespace(config={"trial": plan.as_dict()}, last_result={"status": status, "nodes": "n0"})


def test_records_of_many_trials_land_in_order_after_join(spec_factory):
    spec = spec_factory(study={"name": "worker"})
    plans = [TrialPlan(f"sgd-{i:03d}-s0", "sgd", "sgd", {"lr": 0.01}, seed=0, index=i) for i in range(5)]
    out = io.StringIO()
    rec = StudyRecorder(spec, plans, {}, NullSink(), None, out=out)
    for i, p in enumerate(plans):
        rec.on_trial_start(0, [], _trial(p))
        with StepWriter(spec.study_dir, p.trial_id, 0, 0) as w:
            for s in range(3):
                w.append({"step": s, "loss": float(i + 1) / (s + 1), "eval_loss": 2.0 - s})
        rec.on_trial_complete(0, [], _trial(p))
    rec.join()
    records = read_trial_records(spec.study_dir)
    assert [r["status"] for r in records] == ["completed"] * 5  # the start's record never overtakes the end's
    assert [r["summary"]["final_loss"] for r in records] == pytest.approx([(i + 1) / 3 for i in range(5)])
    assert all(r["started"] < r["ended"] and r["nodes"] == "n0" for r in records)
    assert rec.n_done == 5 and out.getvalue().count("COMPLETED") == 5


def test_a_failed_job_stops_the_loop_and_join(spec_factory, monkeypatch):
    spec = spec_factory(study={"name": "workerfail"})
    plan = TrialPlan("sgd-000-s0", "sgd", "sgd", {"lr": 0.01}, seed=0, index=0)
    rec = StudyRecorder(spec, [plan], {}, NullSink(), None, out=io.StringIO())

    def full(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("opt_study.results.trials.write_trial_record", full)
    rec.on_trial_start(0, [], _trial(plan))
    rec._wait()
    with pytest.raises(OSError, match="No space left"):
        rec.on_step_end(0, [])  # Tune's loop: the worker's error surfaces at its next step
    rec.on_trial_complete(0, [], _trial(plan))
    with pytest.raises(OSError, match="No space left"):
        rec.join()
    rec.join()  # reported once each


def test_a_rerun_that_finishes_removes_the_failed_attempts_traceback(spec_factory):
    spec = spec_factory(study={"name": "rerun"})
    plan = TrialPlan("sgd-000-s0", "sgd", "sgd", {"lr": 0.01}, seed=0, index=0)
    kept = layout.trial_error_path(spec.study_dir, plan.trial_id)
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text("Failure # 1\nRuntimeError: exploded\n")  # what the failed first run left
    rec = StudyRecorder(spec, [plan], {}, NullSink(), None, out=io.StringIO())
    rec.on_trial_start(0, [], _trial(plan))
    with StepWriter(spec.study_dir, plan.trial_id, 1, 0) as w:
        w.append({"step": 0, "loss": 1.0, "eval_loss": 1.0})
    rec.on_trial_complete(0, [], _trial(plan))
    rec.join()
    (record,) = read_trial_records(spec.study_dir)
    assert record["status"] == "completed" and record.get("error") is None
    assert not kept.exists()
