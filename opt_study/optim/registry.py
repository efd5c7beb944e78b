"""Looking up, resolving and building registered optimizers (the table is zoo.py).

Hyperparameters are FLAT scalars, one name per searchable value (Adam's `betas` are `beta1`
and `beta2`), typed by their default: a bool stays a bool, an int an int (Lookahead's k,
Sophia's update_period), a float a float, a string a string.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Mapping

import torch

from opt_study import plugins
from opt_study.optim.entry import ELEMENTWISE, MODEL_TENSORS, OptimizerEntry
from opt_study.optim.interface import ENTRY_ATTR, train_mode
from opt_study.optim.whole_tensor import WholeTensorOptimizer
from opt_study.optim.zoo import OPTIMIZERS


def optimizer_entry(name: str) -> OptimizerEntry:
    """The registry entry of `name`; ValueError listing the known names if there is none.

    A built-in name is looked up and nothing is imported. Any other name is a plugin
    (opt_study.plugins): an import path `mypkg.opt:entry`, or a name an installed package
    registers in the entry-point group `opt_study.optimizers`. The object found is an
    `OptimizerEntry`, or a function of no arguments returning one.
    """
    if isinstance(name, str) and name in OPTIMIZERS:
        return OPTIMIZERS[name]
    if not isinstance(name, str):
        raise ValueError(f"unknown optimizer {name!r}")
    try:
        obj = plugins.load(name, plugins.OPTIMIZERS_GROUP)
    except ValueError as e:
        if plugins.is_import_path(name):
            raise
        known = sorted(OPTIMIZERS) + plugins.entry_point_names(plugins.OPTIMIZERS_GROUP)
        raise ValueError(f"unknown optimizer {name!r:.60} (known: {', '.join(known)}; or module:entry)") from e
    return _plugin_entry(name, obj)


def _plugin_entry(name: str, obj: Any) -> OptimizerEntry:
    if not isinstance(obj, OptimizerEntry) and callable(obj) and not isinstance(obj, type):
        obj = obj()
    if not isinstance(obj, OptimizerEntry):
        raise ValueError(f"{name} must be an opt_study.OptimizerEntry or a function returning one")
    bad = sorted(c for c in obj.combos if c not in ELEMENTWISE)
    if bad or not obj.combos:
        raise ValueError(f"{name}: combos must be a non-empty subset of opt_study.optim.ELEMENTWISE (got {bad})")
    if "lr" not in obj.defaults:
        raise ValueError(f"{name}: defaults must include lr (the schedule scales it)")
    missing = sorted(set(obj.space) - set(obj.defaults))
    if missing:
        raise ValueError(f"{name}: space names {', '.join(missing)}, which are not in defaults")
    return obj


def combination_error(name: str, zero_stage: int, precision: str) -> str | None:
    """None if optimizer `name` is correct under (zero_stage, precision), else the message for
    `opt-study validate`, saying what to change."""
    return optimizer_entry(name).combination_error(zero_stage, precision)


def resolve_hparams(name: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The defaults of `name` overlaid with `hparams`, as flat scalars.

    `betas` (a pair) is accepted as a spelling of `beta1` and `beta2`. Unknown names, and values
    whose type does not match the default's, raise ValueError naming them and listing the
    allowed names.
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
        raise ValueError(
            f"{name}: unknown hyperparameter(s) {', '.join(unknown)} (allowed: {', '.join(sorted(entry.defaults))})"
        )
    out = dict(entry.defaults)
    for key, value in given.items():
        out[key] = _check_value(name, key, entry.defaults[key], value)
    return out


def _check_value(name: str, key: str, default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name}: {key} must be true or false, got {value!r}")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise ValueError(f"{name}: {key} must be a string, got {value!r}")
    real = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(default, int):
        if real and float(value).is_integer():
            return int(value)
        raise ValueError(f"{name}: {key} must be an integer, got {value!r}")
    if real:
        return float(value)
    raise ValueError(f"{name}: {key} must be a finite number, got {value!r}")


def build_optimizer(
    name: str, params: Iterable, hparams: Mapping[str, Any], zero_stage: int = 0, precision: str = "fp32"
) -> torch.optim.Optimizer:
    """The optimizer `name` over `params` from its defaults overlaid with `hparams`, for an engine
    at (`zero_stage`, `precision`).

    The returned object carries its entry (for check_model_shapes) and each group's
    `initial_lr` (for apply_lr_factor). Schedule-Free optimizers start in train mode. A
    whole-tensor entry (`entry.whole_tensor`) under ZeRO 1-3 or a mixed-precision wrapper is
    built as a `WholeTensorOptimizer` (optim.whole_tensor; a collective set-up on every rank,
    after the process group): hand it `attach_fragments` once the engine exists.
    """
    entry = optimizer_entry(name)
    resolved = resolve_hparams(name, hparams)
    if entry.whole_tensor and (zero_stage, precision) not in MODEL_TENSORS:
        opt = WholeTensorOptimizer(entry, params, resolved)
    else:
        opt = entry.factory(params, **resolved)
    setattr(opt, ENTRY_ATTR, entry)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    train_mode(opt)
    return opt
