"""A trial that dies after a checkpoint and is run again resumes from it: every step is stored
exactly once ("last attempt wins"), and the resumed trajectory is bit-for-bit the uninterrupted
one (data, LR and dropout masks are pure functions of the step; optimizer state is in the
DeepSpeed checkpoint). Real DeepSpeed, one process (the multi-process kill is in test_faults)."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest

from opt_study.plan import TrialPlan
from opt_study.results.parquet import read_steps
from opt_study.trial import checkpoint
from opt_study.trial.loop import run_trial


class Crash(RuntimeError):
    pass


def _spec(spec_factory, name, stage):
    return spec_factory(
        study={"name": name},
        workload={"type": "tiny_lm", "layers": 1, "heads": 2, "width": 32, "context": 16, "dropout": 0.1},
        scale={"workers": 1, "zero_stage": stage, "micro_batch_size": 4, "grad_accum": 2},
        training={"steps": 8, "eval_every": 2, "checkpoint_every": 2},
        optimizers=[{"name": "adamw", "params": {"lr": 0.01}}],
        measure={"every": 2},
    )


PLAN = TrialPlan("t", "adamw", "adamw", {"lr": 0.01}, seed=3, index=0)


@pytest.mark.parametrize("stage", [0, 2])
def test_crash_then_resume_is_exact_and_stores_each_step_once(spec_factory, stage):
    clean = _spec(spec_factory, f"clean{stage}", stage)
    run_trial(clean, PLAN, report=lambda m: None)
    ref = read_steps(clean.study_dir).to_pylist()

    spec = _spec(spec_factory, f"crash{stage}", stage)
    reports = []

    def dying(m):  # the process "dies" at the second report, after the step-4 checkpoint
        reports.append(m)
        if len(reports) == 2:
            raise Crash

    with pytest.raises(Crash):
        run_trial(spec, PLAN, report=dying)
    assert checkpoint.latest_step(spec.study_dir, PLAN.trial_id) == 4
    final = run_trial(spec, PLAN, report=lambda m: None)
    assert final["status"] == "completed" and final["step"] == 8

    table = read_steps(spec.study_dir)
    rows = table.to_pylist()
    assert [r["step"] for r in rows] == list(range(8))
    assert [r["attempt"] for r in rows] == [0] * 4 + [1] * 4
    for a, b in zip(rows, ref):  # bit-for-bit the uninterrupted trajectory
        for k in ("loss", "grad_norm", "param_norm", "update_norm", "loss_probe", "eval_loss"):
            assert a[k] == b[k], (a["step"], k, a[k], b[k])
    # the trial keeps its checkpoints (the driver removes them once it has recorded the trial
    # finished): the two newest committed ones; the raw dataset still holds the dead attempt's
    # committed rows, superseded at read time
    assert checkpoint.complete_steps(spec.study_dir, PLAN.trial_id) == [6, 4]
    assert not (spec.study_dir / "checkpoints" / PLAN.trial_id / "latest").exists()  # DeepSpeed's: never written
    assert pc.max(table["attempt"]).as_py() == 1


def test_same_seed_same_losses_step_for_step(spec_factory):
    """Reproducibility: the same seed and config give the same losses on CPU, bit for bit."""
    a, b = _spec(spec_factory, "repro_a", 1), _spec(spec_factory, "repro_b", 1)
    run_trial(a, PLAN, report=lambda m: None)
    run_trial(b, PLAN, report=lambda m: None)
    ra, rb = read_steps(a.study_dir).to_pylist(), read_steps(b.study_dir).to_pylist()
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    assert [r["param_norm"] for r in ra] == [r["param_norm"] for r in rb]
    other = TrialPlan("t", "adamw", "adamw", {"lr": 0.01}, seed=4, index=0)
    c = _spec(spec_factory, "repro_c", 1)
    run_trial(c, other, report=lambda m: None)
    assert [r["loss"] for r in read_steps(c.study_dir).to_pylist()] != [r["loss"] for r in ra]


@pytest.mark.parametrize("lr,factor", [(50.0, None), (3.0, 10.0)])
def test_divergence_ends_the_trial_as_data(spec_factory, lr, factor):
    """A NaN/inf loss, or one above divergence_factor x the first loss, ends the trial as
    `diverged` at that step; its rows up to and including that step are stored."""
    spec = spec_factory(
        study={"name": f"div{int(lr)}"},
        workload={"dim": 8, "lambda_max": 10.0},
        scale={"workers": 1, "micro_batch_size": 4},
        training={"steps": 60, "eval_every": 20, "divergence_factor": factor},
        optimizers=[{"name": "sgd", "params": {"lr": lr}}],
    )
    plan = TrialPlan("d", "sgd", "sgd", {"lr": lr}, seed=0, index=0)
    final = run_trial(spec, plan, report=lambda m: None)
    rows = read_steps(spec.study_dir).to_pylist()
    assert final["status"] == "diverged" and final["step"] == len(rows) < 60
    last = rows[-1]["loss"]
    if factor is None:
        assert last != last or last in (float("inf"), float("-inf"))  # NaN or inf
    else:
        assert last > factor * rows[0]["loss"] and all(r["loss"] <= factor * rows[0]["loss"] for r in rows[:-1])


def test_probe_restores_batchnorm_buffers_bit_for_bit(tmp_path, spec_factory):
    """BatchNorm running statistics are module buffers the probe's train-mode forward updates:
    a ResNet trial measured at every step ends exactly like one never measured."""
    from test_paper_workloads import write_cifar

    data = tmp_path / "cifar"
    write_cifar(data, per_file=16, n_test=16)
    runs = {}
    for every in (1, 0):
        spec = spec_factory(
            study={"name": f"bn{every}"},
            workload={
                "type": "resnet_cifar",
                "data_dir": str(data),
                "blocks": [1, 1, 1, 1],
                "width": 8,
                "eval_samples": 16,
            },
            scale={"workers": 1, "zero_stage": 0, "micro_batch_size": 4},
            training={"steps": 4, "eval_every": 2},
            optimizers=[{"name": "momentum", "params": {"lr": 0.05}}],
            measure={"every": every},
        )
        plan = TrialPlan("bn", "momentum", "momentum", {"lr": 0.05}, seed=0, index=0)
        run_trial(spec, plan, report=lambda m: None)
        runs[every] = read_steps(spec.study_dir).to_pylist()
    assert sum(r["measured"] for r in runs[1]) == 4
    for a, b in zip(runs[1], runs[0]):
        assert (a["loss"], a["param_norm"], a["eval_loss"]) == (b["loss"], b["param_norm"], b["eval_loss"])
