"""A study checked against the registries: what every command loads a study through.

`opt_study.config` checks structure and needs no torch; this layer (above `workloads` and
`optim`) adds what needs them: the workload's typed parameters, optimizer names, every
hyperparameter value a trial can draw (by building the optimizer), ZeRO stage x precision
combinations, and the symlink-safe study folder. Each problem is one `ConfigError` naming the
file and the field.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch

from opt_study import optim, workloads
from opt_study.config import ConfigError, OptimizerSpec, Spec, WorkloadConfig, build, load_spec, parse_spec
from opt_study.config.load import study_folder_spec
from opt_study.config.space import parse_domain


def load_study(path: str | Path) -> Spec:
    """Parse and validate a study YAML file; raises ConfigError naming the file and the field."""
    return check(load_spec(path))


def parse_study(data: Any, file: str = "<memory>") -> Spec:
    """Validate an already-parsed YAML document (the top-level mapping)."""
    return check(parse_spec(data, file))


def resolve_study(target: str | Path) -> Spec:
    """The validated spec behind ``target``: a study YAML file, or a study folder (which keeps
    the ``spec.yaml`` it was started from, and may have been moved)."""
    p = Path(target)
    return check(study_folder_spec(p) if p.is_dir() else load_spec(p))


def check(spec: Spec) -> Spec:
    """``spec`` with its workload params typed, after every registry check."""
    spec = dataclasses.replace(spec, workload=_workload(spec.workload, spec.source))
    for i, o in enumerate(spec.optimizers):
        _check_optimizer(o, spec.source, f"optimizers[{i}]")
    spec = dataclasses.replace(spec, optimizers=tuple(_with_registry(o) for o in spec.optimizers))
    _cross_checks(spec)
    return spec


def _workload(w: WorkloadConfig, file: str) -> WorkloadConfig:
    allowed = ", ".join(sorted(workloads.WORKLOADS))
    if w.type not in workloads.WORKLOADS:
        raise ConfigError(file, "workload.type", f"unknown workload {w.type!r:.60} (allowed: {allowed})")
    if not isinstance(w.params, Mapping):  # already typed (a spec checked twice)
        return w
    return WorkloadConfig(
        type=w.type, params=build(workloads.workload_config_class(w.type), w.params, file, "workload")
    )


def _check_optimizer(o: OptimizerSpec, file: str, where: str) -> None:
    if o.name not in optim.OPTIMIZERS:
        raise ConfigError(
            file, f"{where}.name", f"unknown optimizer {o.name!r:.60} (allowed: {', '.join(sorted(optim.OPTIMIZERS))})"
        )
    _check_hparams(o.name, o.space, file, f"{where}.params")


def _with_registry(o: OptimizerSpec) -> OptimizerSpec:
    """``o`` with the registry's defaults and default search space (used by tuning protocols)."""
    entry = optim.optimizer_entry(o.name)
    space = {k: parse_domain(v, f"{o.name}.space.{k}") for k, v in entry.space.items()}
    return dataclasses.replace(o, defaults=dict(entry.defaults), default_space=space)


def _check_hparams(name: str, space: Mapping, file: str, where: str) -> None:
    """Every value a trial can draw is one the optimizer accepts, else ConfigError(where.<key>).

    Names and types go through optim.resolve_hparams; ranges through torch itself, by building
    the optimizer on a one-element parameter (torch checks lr >= 0, 0 <= beta < 1, ...). Each
    value is tried with the other hyperparameters at their first values; a uniform/loguniform
    domain is tried at both ends (torch's valid ranges are intervals).
    """
    defaults = optim.optimizer_entry(name).defaults
    for k in space:
        if k not in defaults:  # `betas` too: a pair cannot be a domain, so it is beta1/beta2 here
            raise ConfigError(
                file, f"{where}.{k}", f"unknown hyperparameter of {name} (allowed: {', '.join(sorted(defaults))})"
            )
    for k, d in space.items():
        default = defaults[k]
        if isinstance(default, int) and not isinstance(default, bool) and d.kind in ("uniform", "loguniform"):
            # its ends may be integers, but a draw between them would not be
            raise ConfigError(
                file,
                f"{where}.{k}",
                f"{k} of {name} is an integer; search it with {{int: [lo, hi]}} or {{choice: [...]}}",
            )
    first = {k: d.values[0] for k, d in space.items()}
    param = torch.nn.Parameter(torch.zeros(1))
    for k, d in space.items():
        for v in d.values:
            try:
                optim.build_optimizer(name, [param], {**first, k: v})
            except (ValueError, TypeError, RuntimeError) as e:
                msg = str(e).removeprefix(f"{name}: ")
                raise ConfigError(file, f"{where}.{k}", f"{name} rejects {k}={v!r:.40}: {msg[:200]}") from None


def _cross_checks(spec: Spec) -> None:
    file = spec.source
    for i, o in enumerate(spec.optimizers):
        # layer-wise / matrix rules degrade silently on ZeRO's flat partitions (optim/entry.py)
        msg = optim.combination_error(o.name, spec.scale.zero_stage, spec.scale.precision)
        if msg:
            raise ConfigError(file, f"optimizers[{i}].name", msg)
    supported = workloads.WORKLOADS[spec.workload.type][0].precisions
    if spec.scale.precision not in supported:
        raise ConfigError(
            file,
            "scale.precision",
            f"workload {spec.workload.type} supports {', '.join(supported)} only "
            f"(it feeds float32 inputs to the model); set scale.precision: fp32",
        )
    try:
        _ = spec.study_dir  # the symlink-safe folder (opt_study.storage.layout.study_dir) raises
    except ValueError as e:
        raise ConfigError(file, "study.name", str(e)) from None
