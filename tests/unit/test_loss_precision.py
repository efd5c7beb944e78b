"""The noise floor when ℓ, ℓ⁺ were re-evaluated in fp32 but g, g⁺ come from a bf16 backward
(metrics.noise_floor's `loss_precision`), against the formula by hand and the reference; and the
step-row column that records it. The runs themselves (fp32 re-evaluation through DeepSpeed at
ZeRO 1-3) are tests/multirank/test_multirank.py's bf16 cases."""

from __future__ import annotations

import math

import pytest
import torch

from opt_study.measure import metrics
from opt_study.measure.reference import reference_metrics
from opt_study.results.schema import COLUMN_NAMES, STEP_SCHEMA

U32, U16 = 2.0**-24, 2.0**-8
SUMS = {"sq_grad": 4.0, "sq_grad_probe": 9.0, "sq_update": 0.25, "sq_param": 100.0, "sq_grad_diff": 1.0}
# the weight-rounding sums Σ|g||x|, Σ|g⁺||x|, Σ|g⁺||Δ|: W = 7 + 11 + |s|·2 (metrics.weight_rounding)
SUMS.update({"abs_grad_param": 7.0, "abs_probe_param": 11.0, "abs_probe_update": 2.0})


def test_floor_splits_loss_and_gradient_precision():
    # fp32 losses at exact fp32 points (s = 1): u32 on the losses, u_bf16 on ⟨g, sΔ⟩, no loss point
    # term; the bf16 gradients' rounded points add u_bf16·(‖g⁺ − g‖(2‖x‖ + ‖sΔ‖) + W)
    got = metrics.noise_floor(SUMS, 1.0, -2.0, 1.0, "bf16", loss_precision="fp32")
    assert got == 4 * (U32 * 3.0 + U16 * (2 + 3) * 0.5 + U16 * 1 * 20.5 + U16 * 20.0)
    # s = 0.5: the rounded fp32 point x_t + sΔ adds u32·(‖g‖ + ‖g⁺‖)(2‖x‖ + ‖sΔ‖)
    got = metrics.noise_floor(SUMS, 1.0, -2.0, 0.5, "bf16", loss_precision="fp32")
    assert got == 4 * (U32 * 3.0 + U16 * 5 * 0.25 + U32 * 5 * (20 + 0.25) + U16 * 1 * 20.25 + U16 * 19.0)
    # bf16 losses (no re-evaluation): the single-precision formula, bf16 point term included
    assert (
        metrics.noise_floor(SUMS, 1.0, -2.0, 1.0, "bf16", loss_precision="bf16")
        == metrics.noise_floor(SUMS, 1.0, -2.0, 1.0, "bf16")
        == 4 * U16 * (3.0 + 2.5 + 102.5 + 20.5 + 20.0)
    )
    with pytest.raises(ValueError):
        metrics.noise_floor(SUMS, 1.0, 1.0, 1.0, "bf16", loss_precision="int8")


@pytest.mark.parametrize("s", [1.0, 0.37, 2.5])
def test_derive_and_reference_agree_on_mixed_precision(s):
    g = torch.Generator().manual_seed(3)
    t = {k: torch.randn(300, generator=g, dtype=torch.float64) for k in ("x", "g", "delta", "g_plus")}
    sums = {
        "sq_grad": float(t["g"] @ t["g"]),
        "sq_grad_probe": float(t["g_plus"] @ t["g_plus"]),
        "sq_update": float(t["delta"] @ t["delta"]),
        "sq_param": float(t["x"] @ t["x"]),
        "ip_grad_update": float(t["g"] @ t["delta"]),
        "ip_probe_update": float(t["g_plus"] @ t["delta"]),
        "sq_grad_diff": float((t["g_plus"] - t["g"]) @ (t["g_plus"] - t["g"])),
        "abs_grad_param": float(t["g"].abs() @ t["x"].abs()),
        "abs_probe_param": float(t["g_plus"].abs() @ t["x"].abs()),
        "abs_probe_update": float(t["g_plus"].abs() @ t["delta"].abs()),
    }
    got = metrics.derive(sums, 3.0, 2.9, s, "bf16", loss_precision="fp32")
    ref = reference_metrics(
        t["x"], t["g"], t["delta"], t["g_plus"], 3.0, 2.9, s, precision="bf16", loss_precision="fp32"
    )
    assert got["noise_floor"] == pytest.approx(ref["noise_floor"], rel=1e-12)
    assert got["cls_convexity_fwd"] == ref["cls_convexity_fwd"]
    # re-evaluating the losses in fp32 is what shrinks the floor (bf16 losses: u = 2^-8 on |ℓ|)
    bf16_loss = metrics.derive(sums, 3.0, 2.9, s, "bf16")["noise_floor"]
    assert bf16_loss > got["noise_floor"] and math.isfinite(got["noise_floor"])


def test_step_rows_have_a_loss_precision_column():
    assert "loss_precision" in COLUMN_NAMES
    assert str(STEP_SCHEMA.field("loss_precision").type) == "string"
    assert STEP_SCHEMA.field("loss_precision").nullable
