"""The authors' aggregates (opt_study/measure/authors.py; docs/METRICS.md §Authors' aggregates) on
fixed rows with hand-computed values, through the query layer per window, and in the trial summary
that MLflow receives."""

from __future__ import annotations

import math

import pytest

from opt_study.measure import authors, metrics, names
from opt_study.results.parquet import StepWriter
from opt_study.results.query import authors_aggregates, open_study
from opt_study.results.schema import STEP_SCHEMA

# Three measured steps: δ_t = ℓ⁺ − ℓ, ⟨g⁺, sΔ⟩ = s·ip_probe_update, gap_t = δ_t − ⟨g⁺, sΔ⟩.
#   step 0: δ = −0.1,  lin = −0.2  -> gap =  0.1,  L = 2
#   step 1: δ = −0.05, lin = −0.03 -> gap = −0.02, L = 3
#   step 2: flagged (skipped)
#   step 3: s = 0.5, δ = 0.02, lin = 0.5·0.08 = 0.04 -> gap = −0.02, L = 1
ROWS = [
    dict(step=0, loss=1.0, loss_probe=0.9, probe_s=1.0, ip_probe_update=-0.2, smoothness_authors=2.0, flag=None),
    dict(step=1, loss=0.9, loss_probe=0.85, probe_s=1.0, ip_probe_update=-0.03, smoothness_authors=3.0, flag=None),
    dict(step=2, loss=0.8, loss_probe=5.0, probe_s=1.0, ip_probe_update=0.0, smoothness_authors=9.0, flag="no_probe"),
    dict(step=3, loss=0.8, loss_probe=0.82, probe_s=0.5, ip_probe_update=0.08, smoothness_authors=1.0, flag=None),
]


def test_aggregate_by_hand():
    a = authors.aggregate(ROWS)
    assert tuple(a) == names.AUTHORS_NAMES
    assert a["n"] == 3
    assert a["gap_mean"] == pytest.approx((0.1 - 0.02 - 0.02) / 3, rel=1e-12)
    # e1 = 0.01·0.1 = 0.001; e2 = 0.99·0.001 + 0.01·(−0.02) = 0.00079; e3 = 0.99·0.00079 − 0.0002
    assert a["gap_ema99"] == pytest.approx(0.99 * 0.00079 - 0.0002, rel=1e-12)
    e = 0.0
    for g in (0.1, -0.02, -0.02):
        e = 0.9999 * e + 0.0001 * g
    assert a["gap_ema9999"] == pytest.approx(e, rel=1e-12)
    # Σ⟨g⁺, sΔ⟩ = −0.2 − 0.03 + 0.04 = −0.19; Σδ = −0.1 − 0.05 + 0.02 = −0.13
    assert a["linear_over_loss_gap"] == pytest.approx(0.19 / 0.13, rel=1e-12)
    assert a["convexity_excess"] == pytest.approx(-0.19 + 0.13, rel=1e-12)
    assert a["smoothness_max"] == 3.0  # the flagged row's 9 is not counted
    assert a["smoothness_ema99"] == pytest.approx(0.99 * (0.99 * 0.02 + 0.03) + 0.01, rel=1e-12)


def test_aggregate_undefined():
    a = authors.aggregate([])
    assert a["n"] == 0 and all(math.isnan(a[k]) for k in names.AUTHORS_NAMES if k != "n")
    zero = authors.aggregate([dict(loss=1.0, loss_probe=1.0, probe_s=1.0, ip_probe_update=0.5)])
    assert math.isnan(zero["linear_over_loss_gap"]) and zero["convexity_excess"] == 0.5  # Σδ = 0
    assert math.isnan(zero["smoothness_max"])  # no smoothness_authors column (older rows)


def test_trial_summary_carries_them():
    """metrics.summarize (the trial summary, logged to MLflow as summary/authors_*)."""
    s = metrics.summarize([{**r, "cls_convexity_fwd": None} for r in ROWS])
    assert tuple(s) == names.SUMMARY_NAMES
    for k, v in authors.aggregate(ROWS).items():
        assert s[f"authors_{k}"] == pytest.approx(v, rel=1e-15, nan_ok=True)


def test_query_windows(tmp_path):
    """Per trial, whole run and windows of 2 steps (reset at steps 0, 2), from stored rows."""
    study = tmp_path / "s"
    stored = [{k: v for k, v in r.items() if k in STEP_SCHEMA.names} for r in ROWS]
    with StepWriter(study, "t1", 0, 0, rows_per_chunk=3) as w:
        for r in stored:
            w.append({**r, "measured": True, "time_unix": 1.0})
        w.append({"step": 4, "loss": 0.7, "time_unix": 1.0})  # not measured: not read
    db = open_study(study)
    (whole,) = authors_aggregates(db)
    assert (whole["trial_id"], whole["first_step"], whole["last_step"]) == ("t1", 0, 3)
    for k, v in authors.aggregate(stored).items():
        assert whole[k] == pytest.approx(v, rel=1e-12, nan_ok=True), k
    w0, w1 = authors_aggregates(db, window=2)
    assert (w0["window"], w0["first_step"], w0["last_step"], w0["n"]) == (0, 0, 1, 2)
    assert (w1["window"], w1["first_step"], w1["last_step"], w1["n"]) == (1, 2, 3, 1)
    assert w0["gap_mean"] == pytest.approx(0.04, rel=1e-12)
    assert w1["gap_ema99"] == pytest.approx(0.01 * -0.02, rel=1e-12)  # the EMA restarts from 0
    with pytest.raises(ValueError, match="window"):
        authors_aggregates(db, window=0)
