"""The MLflow sinks share one protocol: MlflowSink, QueuedSink and NullSink have exactly the
methods of ``Sink`` with the same parameters (names, kinds, defaults), and the driver's recording
path runs with a NullSink (no MLflow at all)."""

from __future__ import annotations

import inspect
import io
from types import SimpleNamespace

import pytest

from opt_study.plan import TrialPlan
from opt_study.results.mlflow_queue import QueuedSink
from opt_study.results.mlflow_sink import MlflowSink
from opt_study.results.parquet import StepWriter
from opt_study.results.sink import NullSink, Sink
from opt_study.results.trials import read_trial_records

METHODS = ("parent_run", "log_trial", "end_parent", "log_artifacts", "drain")


def _params(fn) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_the_protocol_is_what_the_driver_calls():
    assert sorted(n for n, v in vars(Sink).items() if inspect.isfunction(v) and not n.startswith("_")) == sorted(
        METHODS
    )


@pytest.mark.parametrize("cls", [MlflowSink, QueuedSink, NullSink])
@pytest.mark.parametrize("method", METHODS)
def test_every_sink_has_the_protocols_signatures(cls, method):
    assert _params(getattr(cls, method)) == _params(getattr(Sink, method))


def test_null_sink_satisfies_the_protocol_and_does_nothing(tmp_path):
    sink = NullSink()
    assert isinstance(sink, Sink)
    assert sink.parent_run("s", {"a": 1}, {}) is None
    assert sink.log_trial(None, "t", {}, {}, {"loss": 1.0}, {"lr": [(0, 0.1)]}, "completed") is None
    sink.end_parent(None)
    sink.log_artifacts(None, tmp_path)
    assert sink.drain() == 0
    assert list(tmp_path.iterdir()) == []


def test_recorder_finishes_a_trial_with_a_null_sink(spec_factory):
    from opt_study.study.recorder import StudyRecorder
    from opt_study.study.run import flush_mlflow

    spec = spec_factory(study={"name": "nullsink"})
    plan = TrialPlan("sgd-000-s0", "sgd", "sgd", {"lr": 0.01}, seed=0, index=0)
    with StepWriter(spec.study_dir, plan.trial_id, 0, 0) as w:
        for s in range(3):
            w.append({"step": s, "loss": 1.0 / (s + 1), "eval_loss": 2.0 - s})
    out = io.StringIO()
    recorder = StudyRecorder(spec, [plan], {}, NullSink(), None, out=out)
    trial = SimpleNamespace(config={"trial": plan.as_dict()}, last_result={"status": "completed"})
    recorder.on_trial_complete(0, [trial], trial)
    recorder.join()  # the record is written by the recorder's worker thread
    (rec,) = read_trial_records(spec.study_dir)
    assert rec["status"] == "completed" and rec["summary"]["best_eval_loss"] == 0.0
    assert "COMPLETED" in out.getvalue()
    flush_mlflow(NullSink(), spec, out)  # nothing queued: says nothing
    assert "MLflow" not in out.getvalue()


def test_study_params_name_the_curvature_batch(spec_factory):
    """The parent run's params say on which batch the sharpness columns were measured."""
    from opt_study.study.run import _study_params

    step = _study_params(spec_factory(measure={"every": 2, "curvature_every": 4}))
    assert (step["curvature_every"], step["curvature_batch"]) == (4, "step")
    fixed = _study_params(spec_factory(measure={"every": 2, "curvature_every": 4, "curvature_batch": {"size": 8}}))
    assert fixed["curvature_batch"] == "fixed:size=8,seed=0"
