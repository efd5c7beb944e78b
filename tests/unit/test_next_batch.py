"""The next-batch identity of the previous update (docs/METRICS.md §Next-batch gap;
opt_study.measure.next_batch): on the quadratic f(X; B) = mean ½ tr((X − C_i)ᵀA(X − C_i)), whose
Hessian is H = A ⊗ I for every batch, f(x_{t−1}; B_t) = f(x_t; B_t) − ⟨g_t, Δ_{t−1}⟩ + ½Δ_{t−1}ᵀHΔ_{t−1}
exactly, so nb_convexity_gap = −½Δ_{t−1}ᵀHΔ_{t−1} and nb_loss_gap = ⟨g_t, Δ_{t−1}⟩ − ½Δ_{t−1}ᵀHΔ_{t−1};
the training trajectory does not change; and the columns are null where Δ_{t−1} was not kept.
The multi-rank harness (tests/dist/harness.py) checks the same columns against the float64
oracle at world 1/2/4 and ZeRO 0-3."""

from __future__ import annotations

import pytest
import torch

from opt_study.measure import names
from opt_study.measure.hook import StepMeasurer
from opt_study.measure.reference import reference_next_batch
from opt_study.plan import TrialPlan
from opt_study.results.parquet import read_steps
from opt_study.trial.loop import run_trial
from opt_study.workloads import make_workload

QUADRATIC = {"type": "quadratic", "dim": 8, "cols": 2, "noise": 0.1, "lambda_min": 0.5, "lambda_max": 4.0}
U = 2.0**-24


class Recording(StepMeasurer):
    """Keeps x_t and g_t of every step (one rank, ZeRO-0: the shard is the whole vector)."""

    log: dict = {}

    def end(self, step, loss_local, loss_fn, **kw):
        x, g = self.x_t.flat.double().clone(), self.g_t.flat.double().clone()
        row = super().end(step, loss_local, loss_fn, **kw)
        Recording.log[step] = (x, g)
        return row


def _run(spec_factory, name: str, opt: str, measure: dict, steps: int = 6):
    spec = spec_factory(
        study={"name": name},
        workload=QUADRATIC,
        scale={"workers": 1, "zero_stage": 0, "micro_batch_size": 8},
        training={"steps": steps, "eval_every": steps},
        optimizers=[{"name": opt, "params": {"lr": 0.05}}],
        measure=measure,
    )
    plan = TrialPlan("t", opt, opt, {"lr": 0.05}, seed=0, index=0)
    run_trial(spec, plan, report=lambda m: None, measurer_cls=Recording)
    return spec, read_steps(spec.study_dir).to_pylist()


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_next_batch_gap_on_the_quadratic_is_its_closed_form(spec_factory, opt):
    Recording.log = {}
    spec, rows = _run(spec_factory, f"nb{opt}", opt, {"every": 1, "next_batch": True})
    wl = make_workload("quadratic", spec.workload.params, 0)
    a = wl.A  # float64 copy of the model's float32 A
    plain = wl.build_model()  # a plain fp32 copy of the model, set to x_{t−1} below
    assert rows[0]["measured"] and all(rows[0][k] is None for k in names.NEXT_BATCH_NAMES)  # nothing kept
    for r in rows[1:]:
        t = r["step"]
        (x_prev, _), (x, g) = Recording.log[t - 1], Recording.log[t]
        d = x - x_prev  # Δ_{t−1}, exact in float64 from the fp32 iterates
        dm = d.reshape(QUADRATIC["dim"], QUADRATIC["cols"])
        curv = float((dm * (a @ dm)).sum())  # Δ_{t−1}ᵀHΔ_{t−1}
        ip = float(g @ d)
        # fp32 losses, dots and the points: docs/METRICS.md's quadratic bound with u = 1e-6
        tol = 1e-6 * (abs(r["loss"]) + float(g.norm() * d.norm()))
        assert r["nb_ip_grad_update"] == pytest.approx(ip, abs=tol), t
        assert r["nb_convexity_gap"] == pytest.approx(-0.5 * curv, abs=tol), t
        assert r["nb_loss_gap"] == pytest.approx(ip - 0.5 * curv, abs=tol), t
        assert r["nb_loss_gap"] == pytest.approx(r["loss"] - r["nb_loss_prev"], rel=1e-15), t
        assert r["nb_convexity_gap"] < 0  # a convex function, far above the rounding here
        # nb_loss_prev is f(x_{t−1}; B_t): the plain model at x_{t−1} on step t's batch
        torch.nn.utils.vector_to_parameters(x_prev.float(), plain.parameters())
        with torch.no_grad():
            direct = float(wl.loss(plain, wl.train_batch(t, 0, 8)))
        assert r["nb_loss_prev"] == pytest.approx(direct, rel=1e-6), t
        ref = reference_next_batch(r["loss"], r["nb_loss_prev"], g, d, x=x, loss_prev_scale=r["nb_loss_prev_scale"])
        for k in names.NEXT_BATCH_NAMES:
            if ref[k] is None:  # the quadratic is not a covered cross-entropy: no M
                assert r[k] is None, (t, k)
                continue
            assert r[k] == pytest.approx(ref[k], rel=1e-6, abs=tol), (t, k)
        # the gap's floor and class (a convex function: never violated)
        assert r["nb_noise_floor"] == pytest.approx(ref["nb_noise_floor"], rel=1e-9), t
        assert r[names.NEXT_BATCH_CLASS] == ref[names.NEXT_BATCH_CLASS] != "violated", t


def test_next_batch_leaves_the_trajectory_bit_for_bit(spec_factory):
    """The forward at x_{t−1} writes x_{t−1} into the shards and x_{t+1} back: same losses and
    iterates as a run without it; without next_batch the columns are null."""
    _, on = _run(spec_factory, "on", "adamw", {"every": 2, "next_batch": True})
    _, off = _run(spec_factory, "off", "adamw", {"every": 2})
    assert [r["step"] for r in on if r["nb_loss_gap"] is not None] == [1, 3, 5]
    assert all(r[k] is None for r in off for k in names.NEXT_BATCH_NAMES)
    for a, b in zip(on, off):
        assert (a["loss"], a["param_norm"], a["update_norm"]) == (b["loss"], b["param_norm"], b["update_norm"])
