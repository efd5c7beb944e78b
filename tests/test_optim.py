"""Optimizer registry and LR schedules: every entry trains the quadratic from its defaults,
hyperparameters are checked by name and type, and lr_factor matches closed forms."""
from __future__ import annotations

import math

import pytest
import torch

from opt_study import optim
from opt_study.workloads import QuadraticConfig, make_workload

ALL = sorted(optim.OPTIMIZERS)


def test_registry_contents():
    assert set(ALL) == {"sgd", "momentum", "nesterov", "adam", "adamw", "radam", "nadam",
                        "adagrad", "rmsprop", "adadelta"}
    for name, e in optim.OPTIMIZERS.items():
        assert e.name == name and "lr" in e.defaults and e.paper.startswith("https://")
        assert e.zero_stages == frozenset({0, 1, 2, 3}) and e.elementwise
    with pytest.raises(ValueError, match="known: adadelta, adagrad, adam"):
        optim.optimizer_entry("lion")


@pytest.mark.parametrize("name", ALL)
def test_defaults_reduce_the_quadratic(name):
    w = make_workload("quadratic", QuadraticConfig(), 0)
    model = w.build_model()
    opt = optim.build_optimizer(name, model.parameters(), {})
    assert opt.param_groups[0]["lr"] == optim.OPTIMIZERS[name].defaults["lr"]
    before = w.full_loss(model.X)
    for step in range(50):
        opt.zero_grad()
        w.loss(model, w.train_batch(step, 0, 16)).backward()
        opt.step()
    # 50 steps from the defaults: the slowest (radam, lr 1e-3, 5 unrectified steps) ends at ~0.94
    assert w.full_loss(model.X) < 0.95 * before


def test_hyperparameters_reach_torch():
    p = [torch.nn.Parameter(torch.zeros(3))]
    g = optim.build_optimizer("adam", p, {"lr": 0.1, "beta1": 0.8, "beta2": 0.95}).param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["amsgrad"]) == (0.1, (0.8, 0.95), 1e-8, False)
    g = optim.build_optimizer("adamw", p, {"betas": [0.5, 0.6]}).param_groups[0]
    assert g["betas"] == (0.5, 0.6) and g["weight_decay"] == 0.01
    g = optim.build_optimizer("nesterov", p, {"momentum": 0.5}).param_groups[0]
    assert g["nesterov"] and g["momentum"] == 0.5 and g["dampening"] == 0.0
    g = optim.build_optimizer("sgd", p, {}).param_groups[0]
    assert g["momentum"] == 0.0 and not g["nesterov"]
    g = optim.build_optimizer("rmsprop", p, {"centered": True, "alpha": 0.9}).param_groups[0]
    assert g["centered"] is True and g["alpha"] == 0.9


def test_resolve_hparams_overlays_and_rejects():
    r = optim.resolve_hparams("adam", {"lr": 3, "beta2": 0.98})
    assert r == {"lr": 3.0, "beta1": 0.9, "beta2": 0.98, "eps": 1e-8, "weight_decay": 0.0,
                 "amsgrad": False}
    assert isinstance(r["lr"], float)
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) betaa, momentum .*allowed: amsgrad"):
        optim.resolve_hparams("adam", {"betaa": 0.9, "momentum": 0.9})
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        optim.resolve_hparams("sgd", {"momentum": 0.9})  # plain SGD has no momentum knob
    with pytest.raises(ValueError, match="either betas or beta1/beta2"):
        optim.resolve_hparams("adam", {"betas": (0.9, 0.99), "beta1": 0.8})
    with pytest.raises(ValueError, match="betas must be a pair"):
        optim.resolve_hparams("adam", {"betas": 0.9})
    with pytest.raises(ValueError, match="must be true or false"):
        optim.resolve_hparams("adam", {"amsgrad": 1})
    with pytest.raises(ValueError, match="must be a finite number"):
        optim.resolve_hparams("adam", {"lr": "0.1"})
    with pytest.raises(ValueError, match="must be a finite number"):
        optim.resolve_hparams("sgd", {"lr": math.nan})
    with pytest.raises(ValueError, match="unknown optimizer"):
        optim.resolve_hparams("shampoo", {})


# ------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("step, total, kind, warmup, min_ratio, expected", [
    (0, 100, "constant", 0, 0.0, 1.0),
    (99, 100, "constant", 0, 0.5, 1.0),
    (0, 100, "constant", 10, 0.0, 0.1),  # warm-up starts at 1/warmup, not 0
    (4, 100, "cosine", 10, 0.0, 0.5),
    (9, 100, "linear", 10, 0.0, 1.0),  # the last warm-up step reaches 1
    (10, 100, "linear", 10, 0.0, 1.0),  # decay starts at 1
    (0, 100, "linear", 0, 0.1, 1.0),
    (50, 100, "linear", 0, 0.1, 0.55),  # 0.1 + 0.9 * (1 - 0.5)
    (55, 100, "linear", 10, 0.0, 0.5),  # p = 45 / 90
    (100, 100, "linear", 0, 0.1, 0.1),
    (250, 100, "linear", 0, 0.1, 0.1),
    (60, 100, "cosine", 20, 0.0, 0.5),  # p = 1/2: ½(1 + cos(π/2))
    (40, 100, "cosine", 20, 0.2, 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4))),
    (100, 100, "cosine", 20, 0.2, 0.2),
    (9, 10, "cosine", 10, 0.3, 1.0),  # all warm-up
    (10, 10, "cosine", 10, 0.3, 0.3),
])
def test_lr_factor_closed_forms(step, total, kind, warmup, min_ratio, expected):
    assert optim.lr_factor(step, total, kind, warmup, min_ratio) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_lr_factor_shape(kind):
    f = [optim.lr_factor(s, 50, kind, 5, 0.1) for s in range(51)]
    assert all(a < b for a, b in zip(f[:5], f[1:5]))  # warm-up rises
    assert all(a >= b for a, b in zip(f[5:], f[6:])) and f[5] > f[49] > 0.1 == f[50]


def test_lr_factor_rejects_bad_arguments():
    for args in [(0, 10, "step", 0, 0.0), (-1, 10, "linear", 0, 0.0), (0, 0, "linear", 0, 0.0),
                 (0, 10, "linear", 11, 0.0), (0, 10, "linear", 0, 1.5)]:
        with pytest.raises(ValueError):
            optim.lr_factor(*args)
