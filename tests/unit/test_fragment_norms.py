"""Norms-only steps (hook.StepMeasurer._norms_only): an unmeasured step reads g_t and x_{t+1}
where the engine holds them (fused_sums.fragment_sums) and rolls x_t's buffer forward, instead of
copying x_t, g_t and x_{t+1}. Its sums must be bit-for-bit the copying path's, kernel and trial."""

from __future__ import annotations

import random

import pytest
import torch

from opt_study.measure import fused_sums
from opt_study.measure.hook import StepMeasurer
from opt_study.measure.names import SUM_NAMES
from opt_study.measure.sums import flat_sums, group_runs
from opt_study.plan import TrialPlan
from opt_study.results.parquet import read_steps
from opt_study.trial.loop import run_trial

pytestmark = pytest.mark.skipif(not fused_sums.available(), reason="the fused kernel is not built")
NORMS = ("sq_grad", "sq_update", "sq_param")


def _layout(rng: random.Random, gen: torch.Generator):
    """Fragments of awkward sizes (empty, shorter than a lane, block edges) in up to 3 groups."""
    sizes = [rng.choice([0, 1, 7, 255, 256, 257, 1000, 5000]) for _ in range(rng.randint(1, 12))]
    group_of = [rng.randint(0, 2) for _ in sizes]
    x = [torch.randn(n, generator=gen) * 3 for n in sizes]
    x_next = [v + 1e-3 * torch.randn(v.numel(), generator=gen) for v in x]
    return sizes, group_runs(sizes, group_of), x, x_next


def test_fragment_sums_equal_the_flat_kernel_bit_for_bit():
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    for _ in range(30):
        sizes, runs, x, x_next = _layout(rng, gen)
        flat_x, flat_next = torch.cat(x), torch.cat(x_next)
        ref = flat_sums({"x": flat_x, "g": flat_next, "delta": flat_next - flat_x}, runs, 3, only=NORMS)
        g_sq = fused_sums.fragment_sums(x_next, runs, 3)  # the fragments as g
        kept = flat_x.clone()
        moved = fused_sums.fragment_sums(x_next, runs, 3, kept=kept)  # as x_{t+1}, x_t in kept
        for name, got in (("sq_grad", g_sq), ("sq_update", moved), ("sq_param", moved)):
            i = SUM_NAMES.index(name)
            assert torch.equal(got[i], ref[i]), (sizes, name, got[i], ref[i])
        assert torch.equal(kept, flat_next)  # x_t's buffer now holds x_{t+1}
        others = [i for i, n in enumerate(SUM_NAMES) if n != "sq_grad"]
        assert torch.isnan(g_sq[others]).all()
        assert not torch.isnan(moved[[SUM_NAMES.index("sq_update"), SUM_NAMES.index("sq_param")]]).any()


def test_fragment_sums_decline_what_the_kernel_cannot_take(monkeypatch):
    runs = group_runs([4, 6], [0, 0])
    frags = [torch.ones(4), torch.ones(12)[::2]]  # the second is strided
    assert fused_sums.fragment_sums(frags, runs, 1) is None
    assert fused_sums.fragment_sums([torch.ones(4, dtype=torch.float64), torch.ones(6)], runs, 1) is None
    with pytest.raises(ValueError, match="kept must be 1-D"):
        fused_sums.fragment_sums([torch.ones(4), torch.ones(6)], runs, 1, kept=torch.zeros(9))
    monkeypatch.setenv(fused_sums.ENV, "0")
    assert fused_sums.fragment_sums([torch.ones(4), torch.ones(6)], runs, 1) is None


class Counting(StepMeasurer):
    """Counts the steps that took the norms-only path."""

    taken = 0

    def end(self, step, loss_local, loss_fn, **kw):
        row = super().end(step, loss_local, loss_fn, **kw)
        Counting.taken += self.g_sq is not None
        return row


class Copying(StepMeasurer):
    """The reference path: x_t, g_t and x_{t+1} copied on every step."""

    fragment_norms = False


@pytest.mark.parametrize("stage", [0, 2])
def test_norms_only_steps_store_the_copying_paths_rows(spec_factory, stage):
    """A trial measured every 4th step: its rows (norms of unmeasured steps, and every measured
    column, which reads the x_t a norms-only step left behind) equal the copying path's exactly."""
    rows = {}
    for cls in (Counting, Copying):
        spec = spec_factory(
            study={"name": f"n{stage}{cls.__name__}"},
            workload={"type": "mlp_classify", "dataset": "digits", "hidden": [32], "dropout": 0.1},
            scale={"workers": 1, "zero_stage": stage, "micro_batch_size": 16},
            training={"steps": 13, "eval_every": 13},
            optimizers=[{"name": "adamw", "params": {"lr": 0.01}}],
            measure={"every": 4},
        )
        Counting.taken = 0
        run_trial(spec, TrialPlan("t", "adamw", "adamw", {"lr": 0.01}, seed=0, index=0), lambda m: None, cls)
        rows[cls] = read_steps(spec.study_dir).drop_columns(["time_unix", "step_time_s", "units_per_s"]).to_pylist()
        if cls is Counting:
            # steps 3, 7, 11 and the evaluation step 12 measured, 2, 6, 10 keep Δ and g for the
            # next: 0, 1, 4, 5, 8, 9 are norms-only
            assert Counting.taken == 6
    assert [r["measured"] for r in rows[Counting]] == [s % 4 == 3 or s == 12 for s in range(13)]
    assert rows[Counting] == rows[Copying]


def test_an_evaluation_between_steps_makes_the_next_step_copy_x_t(spec_factory):
    """Schedule-Free evaluates at x and trains at y: the loop's eval_mode / train_mode round trip
    between two steps need not give y back bit for bit, so the x_{t+1} a norms-only step kept
    must not be reused after it (StepMeasurer.weights_moved). Never measured, evaluated every 3rd
    step: every step norms-only, the rows equal the copying path's."""
    rows = {}
    for cls in (Counting, Copying):
        spec = spec_factory(
            study={"name": f"sf{cls.__name__}"},
            workload={"type": "mlp_classify", "dataset": "digits", "hidden": [32]},
            scale={"workers": 1, "zero_stage": 0, "micro_batch_size": 16},
            training={"steps": 10, "eval_every": 3},
            optimizers=[{"name": "schedulefree_adamw", "params": {"lr": 0.05}}],
            measure={"every": 0},
        )
        Counting.taken = 0
        plan = TrialPlan("t", "sf", "schedulefree_adamw", {"lr": 0.05}, seed=0, index=0)
        run_trial(spec, plan, lambda m: None, cls)
        rows[cls] = read_steps(spec.study_dir).drop_columns(["time_unix", "step_time_s", "units_per_s"]).to_pylist()
        if cls is Counting:
            assert Counting.taken == 10
    assert [r["eval_loss"] is not None for r in rows[Counting]] == [s % 3 == 2 or s == 9 for s in range(10)]
    assert rows[Counting] == rows[Copying]
