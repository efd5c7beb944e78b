"""trainit's gradient-history cosine (docs/METRICS.md §Gradient history) on one rank's shard
against the float64 oracle; the multi-rank runs (tests/dist/harness.py, check_grad_history) check
it through real training at world 1/2/4 and ZeRO 0-3."""

from __future__ import annotations

import math

import pytest
import torch

from opt_study.measure import grad_history
from opt_study.measure.reference import reference_grad_history
from opt_study.measure.shards import FlatShard


def test_running_sum_of_every_step_matches_float64():
    gen = torch.Generator().manual_seed(0)
    sizes = [300, 7, 5000]
    h, past = grad_history.GradHistory(), []
    for step in range(6):
        g = FlatShard(torch.randn(sum(sizes), generator=gen), sizes)
        ip, sq = h.partials(g, step).tolist()
        got = grad_history.columns(ip, sq, float(g.flat.double() @ g.flat.double()))
        ref = reference_grad_history(g.flat, past)
        if step == 0:  # S_0 = 0: no cosine
            assert got == {"grad_history_ip": 0.0, "grad_history_sq": 0.0, "cos_grad_history": None}
        else:
            scale = float(g.flat.norm()) * math.sqrt(ref["grad_history_sq"])
            assert abs(got["grad_history_ip"] - ref["grad_history_ip"]) <= 1e-6 * scale
            assert got["grad_history_sq"] == pytest.approx(ref["grad_history_sq"], rel=1e-6)
            assert got["cos_grad_history"] == pytest.approx(ref["cos_grad_history"], abs=1e-6)
        h.add(g, step)  # every step, measured or not
        past.append(g.flat.clone())


def test_a_non_finite_gradient_is_skipped_and_a_resumed_attempt_has_no_history():
    g = FlatShard(torch.ones(4), [4])
    h = grad_history.GradHistory()
    h.add(g, 0)
    h.add(FlatShard(torch.tensor([1.0, math.inf, 0.0, 0.0]), [4]), 1)  # trainit's isfinite check
    assert h.sum.flat.tolist() == [1.0, 1.0, 1.0, 1.0]
    resumed = grad_history.GradHistory()  # an attempt that starts at step 40
    assert all(math.isnan(v) for v in resumed.partials(g, 40).tolist())
    assert grad_history.columns(math.nan, math.nan, 4.0) == dict.fromkeys(
        ("grad_history_ip", "grad_history_sq", "cos_grad_history")
    )
    assert grad_history.columns(-1.0000001, 1.0, 1.0)["cos_grad_history"] == -1.0  # clamped
