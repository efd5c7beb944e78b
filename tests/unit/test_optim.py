"""Optimizer registry and LR schedules: every entry trains the quadratic from its defaults,
hyperparameters are checked by name and type, and lr_factor matches closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from opt_study import optim
from opt_study.config import FieldError, ScheduleConfig

ALL = sorted(optim.OPTIMIZERS)


def test_registry_contents():
    crowded_valley = {
        "sgd",
        "momentum",
        "nesterov",
        "adam",
        "adamw",
        "nadam",
        "radam",
        "amsgrad",
        "adabelief",
        "adabound",
        "amsbound",
        "adadelta",
        "adagrad",
        "rmsprop",
        "lookahead_momentum",
        "lookahead_radam",
    }
    contenders = {
        "lamb",
        "novograd",
        "lion",
        "schedulefree_adamw",
        "schedulefree_sgd",
        "muon",
        "soap",
        "shampoo",
        "sophia",
    }
    recent = {"ademamix", "adopt", "cautious_adamw", "mars", "psgd_kron", "normuon", "scion", "splus"}
    assert set(ALL) == crowded_valley | contenders | recent
    for name, e in optim.OPTIMIZERS.items():
        assert e.name == name and "lr" in e.defaults and e.paper.startswith("https://")
        assert e.source.split()[0] in ("torch", "pytorch-optimizer", "schedulefree", "heavyball"), e.source
    with pytest.raises(ValueError, match="known: adabelief, adabound, adadelta"):
        optim.optimizer_entry("adamax")


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


def test_recent_hyperparameters_reach_the_libraries():
    p = [torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(3))]
    g = optim.build_optimizer("ademamix", p, {"beta3": 0.999}).param_groups[0]
    assert g["betas"] == (0.9, 0.999, 0.999) and g["t_alpha_beta3"] is None and g["alpha"] == 5.0
    g = optim.build_optimizer("ademamix", p, {"t_alpha_beta3": 1000}).param_groups[0]
    assert g["t_alpha_beta3"] == 1000
    g = optim.build_optimizer("mars", p, {"beta1_1d": 0.8, "lr_1d": 1e-3}).param_groups[0]
    assert (g["betas"], g["betas_1d"], g["mars_type"], g["lr_1d"]) == ((0.95, 0.99), (0.8, 0.95), "adamw", 1e-3)
    gs = optim.build_optimizer("normuon", p, {"muon_beta2": 0.9, "beta2": 0.99}).param_groups
    assert [(g["use_muon"], g["lr"]) for g in gs] == [(True, 0.02), (False, 3e-4)]
    assert gs[0]["beta2"] == 0.9 and gs[1]["betas"] == (0.9, 0.99)
    g = optim.build_optimizer("cautious_adamw", p, {"beta2": 0.95}).param_groups[0]
    assert g["caution"] is True and g["betas"] == (0.9, 0.95) and g["weight_decay"] == 0.01
    g = optim.build_optimizer("psgd_kron", p, {"momentum": 0.5}).param_groups[0]
    assert g["momentum"] == 0.5 and g["pre_conditioner_update_probability"] is None  # the library's schedule


def test_resolve_hparams_overlays_and_rejects():
    r = optim.resolve_hparams("adam", {"lr": 3, "beta2": 0.98})
    assert r == {"lr": 3.0, "beta1": 0.9, "beta2": 0.98, "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False}
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
        optim.resolve_hparams("adamax", {})


def test_hparams_keep_the_defaults_types():
    r = optim.resolve_hparams("lookahead_momentum", {"k": 3.0, "alpha": 1})
    assert r["k"] == 3 and type(r["k"]) is int and r["alpha"] == 1.0 and type(r["alpha"]) is float
    with pytest.raises(ValueError, match="k must be an integer"):
        optim.resolve_hparams("lookahead_momentum", {"k": 2.5})
    with pytest.raises(ValueError, match="update_period must be an integer"):
        optim.resolve_hparams("sophia", {"update_period": True})
    la = optim.build_optimizer("lookahead_radam", [torch.nn.Parameter(torch.zeros(2))], {"k": 7, "beta2": 0.9})
    assert la.k == 7 and la.param_groups[0]["betas"] == (0.9, 0.9)


# ------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize(
    "step, total, kind, warmup, min_ratio, expected",
    [
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
        (0, 100, "wsd", 10, 0.0, 0.1),  # warm-up as for every kind
        (79, 100, "wsd", 10, 0.0, 1.0),  # stable until the last 20 steps
        (80, 100, "wsd", 10, 0.0, 1.0),  # decay starts at 1
        (90, 100, "wsd", 10, 0.0, 0.5),
        (90, 100, "wsd", 10, 0.1, 0.55),
        (99, 100, "trapezoidal", 10, 0.0, 0.05),
        (100, 100, "wsd", 10, 0.1, 0.1),
    ],
)
def test_lr_factor_closed_forms(step, total, kind, warmup, min_ratio, expected):
    assert optim.lr_factor(step, total, kind, warmup, min_ratio) == pytest.approx(expected, abs=1e-12)


# SGDR (https://arxiv.org/abs/1608.03983, Eq. 5): cycle i lasts period * mult**i steps.
@pytest.mark.parametrize(
    "step, warmup, min_ratio, period, mult, expected",
    [
        (0, 0, 0.0, 10, 1.0, 1.0),
        (5, 0, 0.0, 10, 1.0, 0.5),
        (10, 0, 0.0, 10, 1.0, 1.0),  # restart
        (25, 0, 0.0, 10, 1.0, 0.5),
        (20, 0, 0.0, 10, 2.0, 0.5),  # cycles [0, 10), [10, 30), [30, 70)
        (30, 0, 0.0, 10, 2.0, 1.0),
        (50, 0, 0.0, 10, 2.0, 0.5),
        (4, 5, 0.0, 10, 2.0, 1.0),  # last warm-up step
        (25, 5, 0.0, 10, 2.0, 0.5),  # t = 20: middle of the second cycle
        (2, 0, 0.2, 8, 1.0, 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4))),
        (13, 0, 0.0, 4, 1.5, 0.75),  # cycles of 4, 6, 9 steps: t_cur = 3 of 9, cos(π/3) = ½
        (10**6 + 3, 0, 0.0, 4, 1.0, 0.5 * (1 + math.cos(math.pi * 3 / 4))),
    ],
)
def test_cosine_restarts_closed_forms(step, warmup, min_ratio, period, mult, expected):
    got = optim.lr_factor(step, 100, "cosine_restarts", warmup, min_ratio, period=period, mult=mult)
    assert got == pytest.approx(expected, abs=1e-12)


def test_wsd_rounds_and_clips_its_decay():
    # round(0.5 * 7) = 4 decay steps: start at 3, halfway at 5
    assert optim.lr_factor(5, 7, "wsd", 0, 0.0, decay_fraction=0.5) == pytest.approx(0.5)
    # decay_fraction 1 without warm-up is the linear schedule
    for s in range(0, 31):
        assert optim.lr_factor(s, 30, "wsd", 0, 0.2, decay_fraction=1.0) == pytest.approx(
            optim.lr_factor(s, 30, "linear", 0, 0.2)
        )
    # the decay never eats into warm-up: 9 warm-up steps of 10 leave one decay step
    assert [optim.lr_factor(s, 10, "wsd", 9, 0.0, decay_fraction=0.5) for s in (8, 9, 10)] == [1.0, 1.0, 0.0]
    # a tiny fraction still decays over one step
    assert optim.lr_factor(99, 100, "wsd", 0, 0.0, decay_fraction=1e-9) == 1.0
    assert optim.lr_factor(100, 100, "wsd", 0, 0.0, decay_fraction=1e-9) == 0.0


def test_schedule_config_fields_reach_lr_factor():
    # every name the config accepts is a schedule lr_factor implements (one list, no drift)
    for kind in ScheduleConfig.TYPES:
        extra = {"period": 3} if kind == "cosine_restarts" else {}
        assert optim.schedule_factor(9, 10, ScheduleConfig(type=kind, **extra)) <= 1.0
    cfg = ScheduleConfig(type="cosine_restarts", warmup_steps=2, min_ratio=0.1, period=6, mult=2.0)
    assert [optim.schedule_factor(s, 50, cfg) for s in range(40)] == [
        optim.lr_factor(s, 50, "cosine_restarts", 2, 0.1, period=6, mult=2.0) for s in range(40)
    ]
    cfg = ScheduleConfig(type="wsd", decay_fraction=0.5)
    assert optim.schedule_factor(15, 20, cfg) == pytest.approx(0.5)
    assert optim.schedule_factor(7, 20, ScheduleConfig(type="cosine")) == optim.lr_factor(7, 20, "cosine", 0, 0.0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"type": "cosine_restarts"}, "period"),
        ({"type": "cosine_restarts", "period": 0}, "period"),
        ({"type": "cosine", "period": 10}, "period"),
        ({"type": "cosine_restarts", "period": 5, "mult": 0.5}, "mult"),
        ({"type": "linear", "mult": 2.0}, "mult"),
        ({"type": "wsd", "decay_fraction": 0.0}, "decay_fraction"),
        ({"type": "wsd", "decay_fraction": 1.5}, "decay_fraction"),
        ({"type": "step"}, "type"),
    ],
)
def test_schedule_config_rejects(kwargs, field):
    with pytest.raises(FieldError) as e:
        ScheduleConfig(**kwargs)
    assert e.value.field == field


@pytest.mark.parametrize("kind", ["linear", "cosine", "wsd"])
def test_lr_factor_shape(kind):
    f = [optim.lr_factor(s, 50, kind, 5, 0.1) for s in range(51)]
    assert all(a < b for a, b in zip(f[:5], f[1:5]))  # warm-up rises
    assert all(a >= b for a, b in zip(f[5:], f[6:])) and f[5] > f[49] > 0.1 == f[50]


def test_lr_factor_rejects_bad_arguments():
    for args in [
        (0, 10, "step", 0, 0.0),
        (-1, 10, "linear", 0, 0.0),
        (0, 0, "linear", 0, 0.0),
        (0, 10, "linear", 11, 0.0),
        (0, 10, "linear", 0, 1.5),
    ]:
        with pytest.raises(ValueError):
            optim.lr_factor(*args)
    for kwargs, match in [
        ({"period": None}, "period"),
        ({"period": 2.0}, "period"),
        ({"period": 3, "mult": 0.9}, "mult"),
        ({"period": 3, "mult": math.inf}, "mult"),
    ]:
        with pytest.raises(ValueError, match=match):
            optim.lr_factor(0, 10, "cosine_restarts", 0, 0.0, **kwargs)
    with pytest.raises(ValueError, match="decay_fraction"):
        optim.lr_factor(0, 10, "wsd", 0, 0.0, decay_fraction=0.0)
