"""Early stopping is cooperative (Tune killing a worker-group trial leaks Ray Train V2's placement
group, ray-project/ray#54305): the per-optimizer ASHA wrapper turns ASHA's STOP into a stop file and
CONTINUE; the trial sees the file at its next step and ends itself as `stopped`. Both halves are
tested deterministically here (the e2e study shows them together when timing allows)."""

from __future__ import annotations

from types import SimpleNamespace

from ray.tune.schedulers import TrialScheduler

from opt_study.plan import TrialPlan
from opt_study.results.parquet import read_steps
from opt_study.storage.layout import stop_path
from opt_study.study.asha import per_optimizer_asha
from opt_study.trial.loop import run_trial


def _spec(spec_factory, **search):
    return spec_factory(
        study={"name": "stop"},
        workload={"dim": 8},
        scale={"workers": 1, "micro_batch_size": 4},
        training={"steps": 40, "eval_every": 10},
        optimizers=[{"name": "sgd", "params": {"lr": {"grid": [0.01, 0.1]}}}, {"name": "adam", "params": {"lr": 0.01}}],
        search=search,
    )


def _trial(tid, label):
    return SimpleNamespace(trial_id=tid, config={"trial": {"trial_id": tid, "label": label}})


def test_asha_stop_becomes_a_stop_file_and_continue(spec_factory):
    spec = _spec(spec_factory, asha={"grace_period": 1, "reduction_factor": 2})
    sched = per_optimizer_asha(spec)
    good, bad, other = _trial("sgd-000-s0", "sgd"), _trial("sgd-001-s0", "sgd"), _trial("adam-000-s0", "adam")
    for t in (good, bad, other):
        sched.on_trial_add(None, t)
    res = lambda loss: {"training_iteration": 1, "eval_loss": loss}  # noqa: E731
    assert sched.on_trial_result(None, good, res(1.0)) == TrialScheduler.CONTINUE
    # worse than the rung's cutoff: ASHA says STOP; the wrapper writes the file and continues
    assert sched.on_trial_result(None, bad, res(2.0)) == TrialScheduler.CONTINUE
    assert stop_path(spec.study_dir, "sgd-001-s0").exists()
    assert not stop_path(spec.study_dir, "sgd-000-s0").exists()
    # another optimizer is compared only with itself: a far worse loss is its rung's first result
    assert sched.on_trial_result(None, other, res(50.0)) == TrialScheduler.CONTINUE
    assert not stop_path(spec.study_dir, "adam-000-s0").exists()


def test_trial_ends_itself_as_stopped_when_asked(spec_factory):
    spec = _spec(spec_factory)
    plan = TrialPlan("sgd-001-s0", "sgd", "sgd", {"lr": 0.01}, seed=0, index=1)
    f = stop_path(spec.study_dir, plan.trial_id)
    f.parent.mkdir(parents=True)
    f.touch()
    reports = []
    final = run_trial(spec, plan, report=reports.append)
    assert final["status"] == "stopped" and final["step"] == 1
    rows = read_steps(spec.study_dir).to_pylist()
    # the stopping step is stored, evaluated and reported: nothing the scheduler saw is lost
    assert [r["step"] for r in rows] == [0] and rows[0]["eval_loss"] is not None
    assert reports[-1]["status"] == "stopped"
