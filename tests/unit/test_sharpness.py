"""Online curvature (docs/METRICS.md §Online curvature): the critical-step line search and the
windowed Lanczos against closed forms, and in-process single-rank trials on the quadratic, whose
Hessian is A ⊗ I: the online sharpness equals λ_max(A), the critical sharpness its closed form
dᵀHd/⟨d, g⟩ with d = −Δ/η, and a run measuring curvature ends bit-for-bit equal to one that
does not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opt_study.measure import curvature, metrics
from opt_study.measure.hook import StepMeasurer
from opt_study.plan import TrialPlan
from opt_study.results.parquet import read_steps
from opt_study.trial.loop import run_trial
from opt_study.workloads import make_workload

QUADRATIC = {"type": "quadratic", "dim": 8, "cols": 2, "noise": 0.1, "lambda_min": 0.5, "lambda_max": 4.0}


def _spd(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n))
    return a @ a.T / n


@pytest.mark.parametrize("scale,rel", [(0.01, 2e-2), (0.3, 1e-5), (1.0, 1e-5), (1.9, 1e-5), (3.0, 1e-5), (100.0, 1e-5)])
def test_critical_step_is_the_closed_form_on_a_quadratic(scale, rel):
    """φ(τ) = ½(x + τΔ)ᵀA(x + τΔ): τc = −2⟨Ax, Δ⟩/ΔᵀAΔ, within 10 evaluations, from far above and
    below the real update τ = 1 (τc ≈ 300 spends 6 of them on the bracket: 2% left)."""
    a = _spd(30, 0)
    x = np.random.default_rng(1).standard_normal(30)
    d = -(a @ x) * scale / np.linalg.eigvalsh(a).max()
    calls = []

    def phi(tau):
        calls.append(tau)
        p = x + tau * d
        return 0.5 * p @ a @ p

    tau_c, n = curvature.critical_step(phi, 10)
    exact = -2 * (a @ x) @ d / (d @ a @ d)
    assert n == len(calls) <= 10 and calls[0] == 0.0
    assert tau_c == pytest.approx(exact, rel=rel)


def test_critical_step_without_a_bracket_is_none():
    assert curvature.critical_step(lambda t: t * t + t, 10) == (None, 10)  # ascent at every step
    assert curvature.critical_step(lambda t: -t, 10) == (None, 10)  # descent at every step tried
    # a non-finite loss counts as an increase; the bracket is then bisected
    assert curvature.critical_step(lambda t: math.nan if t > 2 else -t, 10)[0] == pytest.approx(2.0, rel=5e-3)


def test_windowed_lanczos_finds_the_top_eigenvalue():
    """The three-term Lanczos (window 2, constant memory) and the fully re-orthogonalised one give
    the dense λ_max; the local parts of a 'sharded' vector give the same as the whole."""
    a = torch.tensor(_spd(60, 2))
    top = float(torch.linalg.eigvalsh(a).max())
    v0 = torch.randn(60, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for window in (None, 2):
        ritz, k = curvature.lanczos(lambda v: a @ v, v0, 25, lambda t: t, window)
        assert k == 25 and ritz[0] == pytest.approx(top, rel=1e-10), window


class Recording(StepMeasurer):
    """Keeps x_t, g_t, Δ_t of every step and, for Adam, P = √v̂ + ε after it (one rank, ZeRO-0:
    the shard is the whole vector, the optimizer is torch's own)."""

    log: dict = {}

    def end(self, step, loss_local, loss_fn, **kw):
        x, g = self.x_t.flat.double().clone(), self.g_t.flat.double().clone()
        row = super().end(step, loss_local, loss_fn, **kw)
        opt = self.engine.optimizer
        p = None
        if isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
            st = opt.state[self.view.named[0][1]]
            (_, beta2), eps = opt.param_groups[0]["betas"], opt.param_groups[0]["eps"]
            vhat = st["exp_avg_sq"].double().reshape(-1) / (1 - beta2 ** int(st["step"]))
            p = vhat.sqrt() + eps
        Recording.log[step] = (x, g, self.view.clone_params().flat.double() - x, p)
        return row


FIXED = {"size": 16, "seed": 3}  # measure.curvature_batch: a fixed batch of 16 centres


def _run(spec_factory, name, opt, curvature_every, measurer=StepMeasurer, steps=6, batch="step"):
    measure = {"every": 0, "curvature_every": curvature_every, "preconditioned_sharpness": True}
    spec = spec_factory(
        study={"name": name},
        workload=QUADRATIC,
        scale={"workers": 1, "zero_stage": 0, "micro_batch_size": 8},
        training={"steps": steps, "eval_every": steps},
        optimizers=[{"name": opt, "params": {"lr": 0.05}}],
        measure={**measure, **({"curvature_batch": batch} if curvature_every else {})},
    )
    run_trial(
        spec, TrialPlan("t", opt, opt, {"lr": 0.05}, seed=0, index=0), report=lambda m: None, measurer_cls=measurer
    )
    return spec, read_steps(spec.study_dir).to_pylist()


@pytest.mark.parametrize("opt,batch", [("sgd", "step"), ("adamw", "step"), ("sgd", FIXED), ("adamw", FIXED)])
def test_online_curvature_on_the_quadratic_is_its_closed_form(spec_factory, opt, batch):
    """With a fixed curvature batch, λc's closed form takes the gradient on that batch,
    A(X − C̄) with C̄ the mean of its centres: matching it at steps 1, 3 and 5 shows every
    measurement used the same batch (the step's gradient gives another value)."""
    Recording.log = {}
    spec, rows = _run(spec_factory, f"q{opt}{batch == FIXED}", opt, 2, Recording, batch=batch)
    wl = make_workload("quadratic", spec.workload.params, 0)
    a = wl.A  # float64 copy of the model's float32 A; H = A ⊗ I on X [dim, cols]
    shape = (QUADRATIC["dim"], QUADRATIC["cols"])
    curv = [r for r in rows if r["sharpness"] is not None]
    assert [r["step"] for r in curv] == [1, 3, 5] and all(r["measured"] for r in curv)
    label = "step" if batch == "step" else "fixed:size=16,seed=3"
    assert [r["curvature_batch"] for r in rows] == [label if r in curv else None for r in rows]
    # the fixed batch: the training batch of a virtual step past every real one (curvature_batch.py)
    centres = wl.train_batch(2**32 + FIXED["seed"], 0, FIXED["size"])[0].double().mean(0)
    moved = 0.0
    for r in curv:
        # FD Hessian-vector products of fp32 gradients: docs/METRICS.md's 2e-3
        assert r["sharpness"] == pytest.approx(float(wl.spectrum.max()), rel=2e-3), r["step"]
        x, g, delta, p = Recording.log[r["step"]]
        if batch != "step":  # ∇f(x_t; fixed batch) instead of the step's g_t
            g_step, g = g, (a @ (x.reshape(shape) - centres)).reshape(-1)
            moved = max(moved, float((g - g_step).norm() / g.norm()))
        d = -delta / r["lr"]
        dm = d.reshape(shape)
        closed = float((dm * (a @ dm)).sum() / (d @ g))  # λc = dᵀHd / ⟨d, g⟩
        assert r["critical_sharpness"] == pytest.approx(closed, rel=1e-4), r["step"]
        assert 0 < r["curvature_time_s"] < 10
        if opt == "sgd":  # d = g: the Rayleigh quotient along the gradient, ≤ λ_max
            assert r["critical_sharpness"] <= r["sharpness"] * (1 + 2e-3)
            assert r["sharpness_precond"] is None  # no second moment
        else:  # λ_max(P⁻¹H) = λ_max(P^{-1/2} (A ⊗ I) P^{-1/2}), P = √v̂ + ε from the optimizer
            h = torch.kron(a, torch.eye(QUADRATIC["cols"], dtype=torch.float64))  # X row-major
            root = p.rsqrt()
            dense = float(torch.linalg.eigvalsh(root[:, None] * h * root[None, :]).max())
            assert r["sharpness_precond"] == pytest.approx(dense, rel=2e-3), r["step"]
    assert batch == "step" or moved > 1e-2  # the two batches' gradients do differ
    summary = metrics.summarize([r for r in rows if r["measured"]])
    assert summary["sharpness_late_median"] == curv[-1]["sharpness"]
    assert summary["sharpness_max"] == max(r["sharpness"] for r in curv)


@pytest.mark.parametrize("batch", ["step", FIXED])
def test_measuring_curvature_leaves_the_trajectory_bit_for_bit(spec_factory, batch):
    _, on = _run(spec_factory, "on", "adamw", 1, batch=batch)
    _, off = _run(spec_factory, "off", "adamw", 0)
    assert all(r["sharpness"] is not None for r in on) and all(r["sharpness"] is None for r in off)
    for a, b in zip(on, off):
        assert (a["loss"], a["param_norm"], a["update_norm"]) == (b["loss"], b["param_norm"], b["update_norm"])


def test_fixed_curvature_batch_is_one_global_batch_at_every_world_size():
    """curvature_batch.draw: the ranks' micro-batches, concatenated in (rank, micro-batch) order,
    are the whole batch drawn in one piece at world 1, 2 and 4 (the slow reference: one
    train_batch call), the RNG states are the same on every call, and drawing leaves the global
    generator where it was."""
    from opt_study.config.spec import CurvatureBatch, ScaleConfig
    from opt_study.measure import curvature_batch

    wl = make_workload("quadratic", None, 0)
    fixed = CurvatureBatch(size=16, seed=3)
    whole = wl.train_batch(curvature_batch.VIRTUAL_STEP + 3, 0, 16)[0]
    before = torch.get_rng_state()
    for world, gas in ((1, 1), (1, 2), (2, 2), (4, 1), (4, 2)):
        parts, states = [], []
        for rank in range(world):
            b, st = curvature_batch.draw(wl, fixed, rank, world, ScaleConfig(grad_accum=gas), "cpu")
            assert len(b) == len(st) == gas and all(x[0].shape[0] == 16 // (world * gas) for x in b)
            parts += [x[0] for x in b]
            states.append(st)
        assert torch.equal(torch.cat(parts), whole), (world, gas)
        again = curvature_batch.draw(wl, fixed, 0, world, ScaleConfig(grad_accum=gas), "cpu")[1]
        assert all(torch.equal(a[0], b[0]) for a, b in zip(again, states[0]))
    assert torch.equal(torch.get_rng_state(), before)
    assert curvature_batch.draw(wl, None, 0, 1, ScaleConfig(), "cpu") is None
    assert curvature_batch.label(None) == "step" and curvature_batch.label(fixed) == "fixed:size=16,seed=3"
