"""Optimizer and learning-rate-schedule registry.

Every optimizer is an `OptimizerEntry`: a factory taking the parameters and FLAT scalar
hyperparameters (one name per searchable value: Adam's `betas` are `beta1` and `beta2`), the
full defaults, the paper, and the ZeRO stages under which the update rule stays correct. The
training loop builds optimizers through `build_optimizer` and never branches on a name.

ZeRO stages 1-3 hand the optimizer flat, arbitrarily cut partitions of the parameters, so only
rules that act element by element (or on scalars such as the step count) are correct there;
a rule that needs a parameter's matrix shape (Shampoo, Muon) must list only stage 0.

`lr_factor` is the schedule: a pure function of the step that multiplies the base lr.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch

ALL_STAGES = frozenset({0, 1, 2, 3})
SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class OptimizerEntry:
    name: str
    factory: Callable[..., torch.optim.Optimizer]  # factory(params, **resolved hparams)
    defaults: Mapping[str, Any]  # full default hyperparameters (lr included), flat scalars
    paper: str  # link to the paper that defines the update rule
    zero_stages: frozenset[int]  # ZeRO stages under which the rule is correct
    elementwise: bool  # True: the update is element-wise (safe on flat ZeRO partitions)


# ------------------------------------------------------------------------------ factories
def _sgd(nesterov: bool, with_momentum: bool) -> Callable[..., torch.optim.Optimizer]:
    def factory(params, lr, weight_decay, momentum=0.0, dampening=0.0):
        if not with_momentum:
            momentum = 0.0
        return torch.optim.SGD(params, lr=lr, momentum=momentum, dampening=dampening,
                               weight_decay=weight_decay, nesterov=nesterov)
    return factory


def _with_betas(cls: type[torch.optim.Optimizer]) -> Callable[..., torch.optim.Optimizer]:
    """Adam-family factory: flat beta1/beta2 -> torch's `betas` tuple."""
    def factory(params, beta1, beta2, **rest):
        return cls(params, betas=(beta1, beta2), **rest)
    return factory


def _plain(cls: type[torch.optim.Optimizer]) -> Callable[..., torch.optim.Optimizer]:
    def factory(params, **hparams):
        return cls(params, **hparams)
    return factory


_ADAM_BASE = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
SUTSKEVER_2013 = "https://proceedings.mlr.press/v28/sutskever13.html"


def _entry(name, factory, defaults, paper) -> OptimizerEntry:
    # Every torch.optim rule registered here is element-wise, hence correct under ZeRO 0-3.
    return OptimizerEntry(name, factory, dict(defaults), paper, ALL_STAGES, True)


OPTIMIZERS: dict[str, OptimizerEntry] = {e.name: e for e in (
    # Robbins & Monro 1951, "A Stochastic Approximation Method".
    _entry("sgd", _sgd(nesterov=False, with_momentum=False), {"lr": 0.01, "weight_decay": 0.0},
           "https://doi.org/10.1214/aoms/1177729586"),
    # Heavy-ball momentum as used for deep nets: Sutskever, Martens, Dahl & Hinton 2013.
    _entry("momentum", _sgd(nesterov=False, with_momentum=True),
           {"lr": 0.01, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0}, SUTSKEVER_2013),
    # Nesterov's accelerated gradient in the momentum form of Sutskever et al. 2013 (torch's
    # nesterov=True; torch requires dampening = 0 for it, so dampening is not a knob here).
    _entry("nesterov", _sgd(nesterov=True, with_momentum=True),
           {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0}, SUTSKEVER_2013),
    _entry("adam", _with_betas(torch.optim.Adam),
           {"lr": 1e-3, **_ADAM_BASE, "weight_decay": 0.0, "amsgrad": False},
           "https://arxiv.org/abs/1412.6980"),
    _entry("adamw", _with_betas(torch.optim.AdamW),
           {"lr": 1e-3, **_ADAM_BASE, "weight_decay": 0.01, "amsgrad": False},
           "https://arxiv.org/abs/1711.05101"),
    _entry("radam", _with_betas(torch.optim.RAdam),
           {"lr": 1e-3, **_ADAM_BASE, "weight_decay": 0.0, "decoupled_weight_decay": False},
           "https://arxiv.org/abs/1908.03265"),
    # Dozat 2016, "Incorporating Nesterov Momentum into Adam" (ICLR workshop).
    _entry("nadam", _with_betas(torch.optim.NAdam),
           {"lr": 2e-3, **_ADAM_BASE, "weight_decay": 0.0, "momentum_decay": 4e-3,
            "decoupled_weight_decay": False},
           "https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ"),
    # Duchi, Hazan & Singer 2011, JMLR 12.
    _entry("adagrad", _plain(torch.optim.Adagrad),
           {"lr": 1e-2, "lr_decay": 0.0, "weight_decay": 0.0, "initial_accumulator_value": 0.0,
            "eps": 1e-10},
           "https://jmlr.org/papers/v12/duchi11a.html"),
    # Tieleman & Hinton 2012, Coursera "Neural Networks for Machine Learning", lecture 6e.
    _entry("rmsprop", _plain(torch.optim.RMSprop),
           {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0,
            "centered": False},
           "https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf"),
    _entry("adadelta", _plain(torch.optim.Adadelta),
           {"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0},
           "https://arxiv.org/abs/1212.5701"),
)}


# ------------------------------------------------------------------------------- public API
def optimizer_entry(name: str) -> OptimizerEntry:
    """The registry entry of `name`; ValueError listing the known names if there is none."""
    try:
        return OPTIMIZERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown optimizer {name!r} (known: {', '.join(sorted(OPTIMIZERS))})") from None


def resolve_hparams(name: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The defaults of `name` overlaid with `hparams`, as flat scalars.

    `betas` (a pair) is accepted as a spelling of `beta1` and `beta2`. Unknown names, and values
    whose type does not match the default's (a number for a number, a bool for a bool), raise
    ValueError naming them and listing the allowed names.
    """
    entry = optimizer_entry(name)
    given = dict(hparams)
    if "betas" in given and "beta1" in entry.defaults:
        if "beta1" in given or "beta2" in given:
            raise ValueError(f"{name}: give either betas or beta1/beta2, not both")
        betas = given.pop("betas")
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ValueError(f"{name}: betas must be a pair [beta1, beta2], got {betas!r}")
        given["beta1"], given["beta2"] = betas
    unknown = sorted(set(given) - set(entry.defaults))
    if unknown:
        raise ValueError(f"{name}: unknown hyperparameter(s) {', '.join(unknown)} "
                         f"(allowed: {', '.join(sorted(entry.defaults))})")
    out = dict(entry.defaults)
    for key, value in given.items():
        out[key] = _check_value(name, key, entry.defaults[key], value)
    return out


def _check_value(name: str, key: str, default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name}: {key} must be true or false, got {value!r}")
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise ValueError(f"{name}: {key} must be a finite number, got {value!r}")


def build_optimizer(name: str, params: Iterable, hparams: Mapping[str, Any]) -> torch.optim.Optimizer:
    """A torch optimizer over `params` from `name`'s defaults overlaid with `hparams`."""
    return optimizer_entry(name).factory(params, **resolve_hparams(name, hparams))


def lr_factor(step: int, total_steps: int, kind: str, warmup_steps: int, min_ratio: float) -> float:
    """The multiplier of the base lr at 0-based optimizer step `step`.

    Warm-up (Goyal et al. 2017, https://arxiv.org/abs/1706.02677): for step < warmup_steps the
    factor is (step + 1) / warmup_steps, so step 0 already moves (lr/warmup, never 0) and the
    last warm-up step reaches 1. After it, with progress p = (step − warmup_steps) /
    (total_steps − warmup_steps) clipped to [0, 1], the factor is
      constant: 1
      linear:   min_ratio + (1 − min_ratio)(1 − p)
      cosine:   min_ratio + (1 − min_ratio) · ½(1 + cos(π p))
                (Loshchilov & Hutter 2017, SGDR, https://arxiv.org/abs/1608.03983)
    so the decay starts at 1 on the first step after warm-up and reaches min_ratio at
    step == total_steps (one past the last step of a run of total_steps steps), staying there.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r} (known: {', '.join(SCHEDULES)})")
    if step < 0 or total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need step >= 0, total_steps >= 1 and 0 <= warmup_steps <= total_steps; "
                         f"got step={step}, total_steps={total_steps}, warmup_steps={warmup_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    p = 1.0 if step >= total_steps else (step - warmup_steps) / (total_steps - warmup_steps)
    if kind == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - p)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
