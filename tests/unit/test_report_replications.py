"""The report logic of the issue 14 reproductions on fixed numbers: λc against λ_max
(opt_study.report.critical), the seed paper's two claims on the assumption table
(opt_study.report.seed_claims), and the replication configs that state their bands."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from opt_study.report import critical, eos, seed_claims
from opt_study.validate import load_study

ROOT = Path(__file__).resolve().parents[2]


def _curves(lmax, lc, lr=0.2):
    n = len(lmax)
    return {
        "step": np.arange(n, dtype=float) * 20,
        "lr": np.full(n, lr),
        "sharpness": np.asarray(lmax, dtype=float),
        "sharpness_precond": np.full(n, math.nan),
        "critical_sharpness": np.asarray(lc, dtype=float),
    }


def test_band_verdict_is_inclusive_and_says_when_there_is_no_data():
    assert eos.band_verdict(0.9, 0.9, 1.1) == "met" and eos.band_verdict(1.1, 0.9, 1.1) == "met"
    assert eos.band_verdict(1.1001, 0.9, 1.1) == "not met" and eos.band_verdict(math.nan, 0.9, 1.1) == "no data"
    assert eos.band_verdict(math.inf, 10.0, math.inf) == "met"


def test_critical_sharpness_tracks_lambda_max_only_in_the_late_phase():
    gd = {"trial_id": "t", "optimizer": "sgd", "hp.lr": 0.2}
    # λc far below λ_max before the edge (ratio 0.01), then at it: late ratios 0.98, 1.0, 0.95, 1.02
    lmax = [2, 3, 4, 5, 6, 8, 9, 10, 10, 10, 10, 10, 10, 10, 10, 10]
    lc = [0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.09, 0.1, 5, 9, 9.9, 10.1, 9.8, 10, 9.5, 10.2]
    row = critical.tracking_row(gd, _curves(lmax, lc))
    assert row["n_both"] == 16 and row["ratio_early"] == pytest.approx(0.01)
    assert row["ratio_late"] == pytest.approx((0.98 + 1.0) / 2) and row["verdict"] == "met"
    low = critical.tracking_row(gd, _curves([10, 10, 10, 10], [1, 2, 8, 8.5]))  # late: 0.85
    assert low["ratio_late"] == pytest.approx(0.85) and low["verdict"] == "not met"
    # a NaN λc is skipped, not counted; Adam gets its ratios and no verdict
    gaps = critical.tracking_row(gd, _curves([10, 10, 10], [math.nan, 10, 10]))
    assert gaps["n_both"] == 2 and gaps["verdict"] == "met"
    adam = critical.tracking_row({**gd, "optimizer": "adam"}, _curves([10, 10], [200, 190]))
    assert adam["ratio_late"] == pytest.approx(19.0) and adam["verdict"].startswith("no claim")
    assert critical.tracking_row(gd, _curves([10.0], [math.nan]))["verdict"] == "no data"
    # a diverged trial's last rows can sit in the band: it does not meet it
    gone = {**gd, "status": "diverged"}
    assert critical.tracking_row(gone, _curves([10, 10], [10, 10]))["verdict"] == "not met (diverged)"
    assert eos.verdict_row(gone, _curves([9.9, 10.0], [1, 1]))["verdict"] == "not met (diverged)"


def _row(**kw):
    base = {
        "label": "adamw",
        "n_measured": 200,
        "frac_convexity_fwd_holds": 0.8,
        "frac_convexity_bwd_holds": 0.7,
        "smoothness_local_max": 50.0,
        "smoothness_ratio": 2.0,
        "frac_progress_predicted": 0.1,
    }
    return {**base, **kw}


def test_seed_claims_met_and_not_met():
    row = seed_claims.claim_row(_row())
    assert row["convexity_most_steps"] == "met" and row["L_hat_over_ratio"] == pytest.approx(25.0)
    assert row["smoothness_loose"] == "met"
    # exactly half is not "most"; one side failing fails the claim
    assert seed_claims.claim_row(_row(frac_convexity_bwd_holds=0.5))["convexity_most_steps"] == "not met"
    tight = seed_claims.claim_row(_row(smoothness_local_max=15.0))  # 7.5× < 10×
    assert tight["L_hat_over_ratio"] == pytest.approx(7.5) and tight["smoothness_loose"] == "not met"
    # effective ratio ≤ 0: the loss changed by at most its linear term, any L̂ > 0 overstates it
    assert seed_claims.claim_row(_row(smoothness_ratio=-0.3))["smoothness_loose"] == "met"
    none = seed_claims.claim_row(_row(frac_convexity_fwd_holds=None, smoothness_ratio=None))
    assert none["convexity_most_steps"] == "no data" and none["smoothness_loose"] == "no data"


@pytest.mark.parametrize(
    "name, band",
    [
        ("eos_momentum_cpu", "±10% of the predicted threshold (2 + 2β)/η"),
        ("eos_adam_cpu", "±10% of the predicted threshold 38/η"),
        ("tzc_tiny_lm_cpu", "frac_convexity_fwd_holds > 0.5"),
    ],
)
def test_replication_configs_state_their_band_and_validate(name, band):
    path = ROOT / "configs" / "replications" / f"{name}.yaml"
    assert band in path.read_text()
    spec = load_study(path)
    if name.startswith("eos"):
        s = spec.scale
        assert s.micro_batch_size * s.workers * s.grad_accum == spec.workload.params.full_batch  # full batch
        assert spec.measure.curvature_every > 0 and spec.measure.lanczos_steps >= 20
    else:
        assert spec.training.steps >= 2000 and spec.measure.every == 10
        assert {o.name for o in spec.optimizers} == {"momentum", "adamw"}
