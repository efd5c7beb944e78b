"""bench_floor_classes' `first_floor`, the first version's noise floor (cfea46a) that the issue 13
table recomputes the old classes with: at fp32 and s = 1 the current metrics.noise_floor without
loss scales reduces to it, and at bf16 it is the first version's u_bf16·(|ℓ| + |ℓ⁺| + G·(2‖x‖ + 2‖Δ‖))."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from opt_study.measure import metrics

_SPEC = importlib.util.spec_from_file_location(
    "bench_floor_classes", Path(__file__).resolve().parents[2] / "benchmarks" / "bench_floor_classes.py"
)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)

# ‖g‖ = 3, ‖g⁺‖ = 2, ‖Δ‖ = 0.5, ‖x‖ = 10
SUMS = {"sq_grad": 9.0, "sq_grad_probe": 4.0, "sq_update": 0.25, "sq_param": 100.0, "sq_grad_diff": 1.0}


def test_first_floor_is_the_current_floor_without_loss_scales_at_fp32():
    got = bench.first_floor(SUMS, 0.7, -0.6, 1.0, "fp32")
    assert got == pytest.approx(metrics.noise_floor(SUMS, 0.7, -0.6, 1.0, "fp32"), rel=1e-15)
    assert got == pytest.approx(4 * 2.0**-24 * (0.7 + 0.6 + 5 * 0.5), rel=1e-15)


def test_first_floor_at_bf16_adds_the_evaluation_points_with_one_roundoff():
    got = bench.first_floor(SUMS, 0.7, 0.6, 1.0, "bf16")
    assert got == pytest.approx(4 * 2.0**-8 * (0.7 + 0.6 + 5 * 0.5 + 5 * (20 + 0.5)), rel=1e-15)
