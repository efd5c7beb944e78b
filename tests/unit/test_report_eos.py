"""The report's edge-of-stability section (opt_study.report.eos): the stability threshold of each
optimizer, the late-phase verdict against the ±10% band, and the replication config that uses it
(configs/replications/eos_gd_cpu.yaml)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from opt_study.report import eos
from opt_study.validate import load_study

ROOT = Path(__file__).resolve().parents[2]


def test_thresholds_are_two_plus_two_beta_and_38_for_adam():
    assert eos.threshold("sgd", {"lr": 0.1}) == ("sharpness", 2.0)
    assert eos.threshold_factor("momentum", {"lr": 0.1, "momentum": 0.5}) == pytest.approx(3.0)
    assert eos.threshold_factor("momentum", {"lr": 0.1}) == pytest.approx(3.8)  # the entry's default β = 0.9
    col, c = eos.threshold("adamw", {"lr": 1e-3})  # on λ_max(P⁻¹H): (2 + 2β1)/(1 − β1) = 38 at β1 = 0.9
    assert col == "sharpness_precond" and c == pytest.approx(38.0)
    assert eos.threshold("lion", {"lr": 1e-4}) is None


def _curves(values, lr=0.2, precond=None):
    n = len(values)
    return {
        "step": np.arange(n, dtype=float) * 10,
        "lr": np.full(n, lr),
        "sharpness": np.asarray(values, dtype=float),
        "sharpness_precond": np.full(n, math.nan) if precond is None else np.asarray(precond, dtype=float),
        "critical_sharpness": np.full(n, math.nan),
    }


def test_verdict_uses_the_median_of_the_last_quarter():
    trial = {"trial_id": "t", "optimizer": "sgd", "hp.lr": 0.2}
    # sharpening to 2/η = 10, then hovering: the last quarter (4 of 16) is 9.5, 10.5, 9.8, 10.2
    row = eos.verdict_row(trial, _curves([2, 3, 4, 5, 6, 7, 8, 9, 9.5, 10, 10.3, 9.9, 9.5, 10.5, 9.8, 10.2]))
    assert row["predicted"] == pytest.approx(10.0) and row["n"] == 16
    assert row["lambda_max_late"] == pytest.approx(10.0) and row["verdict"] == "met"
    low = eos.verdict_row(trial, _curves([2, 3, 4, 5, 6, 7, 8, 8.5]))  # last 2: 8, 8.5 -> 0.825
    assert low["ratio"] == pytest.approx(0.825) and low["verdict"] == "not met"
    assert eos.verdict_row({**trial, "optimizer": "lion"}, _curves([1.0, 2.0]))["verdict"] == "no threshold"
    # Adam: the preconditioned sharpness against 38/η (η = 0.2: 190)
    adam = eos.verdict_row({**trial, "optimizer": "adamw"}, _curves([1.0, 2.0, 3.0, 4.0], precond=[50, 150, 185, 195]))
    assert adam["compared"] == "sharpness_precond" and adam["predicted"] == pytest.approx(190.0)
    assert adam["ratio"] == pytest.approx(195 / 190) and adam["verdict"] == "met"
    assert eos.verdict_row({**trial, "optimizer": "adamw"}, _curves([1.0, 2.0]))["verdict"] == "no threshold"


def test_the_replication_config_states_its_band_and_validates():
    path = ROOT / "configs" / "replications" / "eos_gd_cpu.yaml"
    text = path.read_text()
    assert "±10% of the predicted threshold 2/η" in text and "arxiv.org/abs/2103.00065" in text
    spec = load_study(path)
    assert spec.measure.curvature_every > 0 and spec.workload.params.full_batch == 1000
    s = spec.scale
    assert s.micro_batch_size * s.workers * s.grad_accum == spec.workload.params.full_batch  # full batch
    assert len(spec.optimizers) == 1 and len(spec.optimizers[0].space["lr"].values) >= 3


def test_full_batch_is_the_same_subset_every_step_and_mse_is_half_the_squared_error():
    from opt_study.workloads import MLPClassifyConfig, make_workload

    cfg = MLPClassifyConfig(hidden=(8,), activation="tanh", loss="mse", full_batch=100)
    wl = make_workload("mlp_classify", cfg, 0)
    parts = [wl.train_batch(step, i, 25) for step in (0, 7) for i in range(4)]
    x = torch.cat([p[0] for p in parts[:4]])
    assert torch.equal(x, wl.train_x[:100]) and torch.equal(x, torch.cat([p[0] for p in parts[4:]]))
    model = wl.build_model()
    assert any(isinstance(m, torch.nn.Tanh) for m in model)
    z = model(x).detach()
    onehot = torch.nn.functional.one_hot(wl.train_y[:100], 10).float()
    assert float(wl.loss(model, (x, wl.train_y[:100])).detach()) == pytest.approx(
        float(0.5 * ((z - onehot) ** 2).sum(1).mean())
    )
