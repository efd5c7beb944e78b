"""A study checked against the registries: what every command loads a study through.

`opt_study.config` checks structure and needs no torch; this layer (above `workloads` and
`optim`) adds what needs them: the workload's typed parameters, optimizer names, every
hyperparameter value a trial can draw (by building the optimizer), ZeRO stage x precision
combinations, and the symlink-safe study folder. Each problem is one `ConfigError` naming the
file and the field; independent problems are raised together (`ConfigErrors`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch

from opt_study import optim, plugins, workloads
from opt_study.config import ConfigError, OptimizerSpec, Spec, WorkloadConfig, build, load_spec, parse_spec
from opt_study.config.load import collect, raise_all, study_folder_spec
from opt_study.config.space import parse_domain
from opt_study.optim.entry import ELEMENTWISE, PRECISIONS, UNSUPPORTED
from opt_study.storage import objectstore, roots


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
    """``spec`` with its workload params typed, after every registry check. Independent problems
    (the workload, each optimizer entry, each extra metric, the cross checks) are reported
    together (ConfigErrors when there are several)."""
    errors: list[ConfigError] = []
    workload = collect(errors, _workload, spec.workload, spec.source)
    if workload is not None:
        spec = dataclasses.replace(spec, workload=workload)
    before = len(errors)
    for i, o in enumerate(spec.optimizers):
        collect(errors, _check_optimizer, o, spec.source, f"optimizers[{i}]")
    optimizers_ok = len(errors) == before
    for i, name in enumerate(spec.measure.extra):
        try:
            plugins.metric(name)
        except ValueError as e:
            errors.append(ConfigError(spec.source, f"measure.extra[{i}]", str(e)))
    if workload is not None and optimizers_ok:
        spec = dataclasses.replace(spec, optimizers=tuple(_with_registry(o) for o in spec.optimizers))
        errors += _cross_checks(spec)
    raise_all(errors)
    return spec


def imported_modules(spec: Spec) -> list[str]:
    """What validating ``spec`` imported of user code, one line per plugin name (for
    ``opt-study validate``): built-in names import nothing and are not listed."""
    names = [spec.workload.type, *(o.name for o in spec.optimizers), *spec.measure.extra]
    return [f"{n}: {plugins.IMPORTED[n]}" for n in dict.fromkeys(names) if n in plugins.IMPORTED]


def _workload(w: WorkloadConfig, file: str) -> WorkloadConfig:
    if w.type not in workloads.WORKLOADS and not plugins.is_import_path(w.type):
        known = sorted(workloads.WORKLOADS) + plugins.entry_point_names(plugins.WORKLOADS_GROUP)
        if w.type not in known:
            raise ConfigError(
                file, "workload.type", f"unknown workload {w.type!r:.60} (allowed: {', '.join(known)}, or module:Class)"
            )
    try:
        workloads.workload_class(w.type)  # a plugin is imported here, and only here
    except ValueError as e:
        raise ConfigError(file, "workload.type", str(e)) from None
    if not isinstance(w.params, Mapping):  # already typed (a spec checked twice)
        return w
    return WorkloadConfig(
        type=w.type, params=build(workloads.workload_config_class(w.type), w.params, file, "workload")
    )


def _check_optimizer(o: OptimizerSpec, file: str, where: str) -> None:
    if o.name not in optim.OPTIMIZERS and not plugins.is_import_path(o.name):
        known = sorted(optim.OPTIMIZERS) + plugins.entry_point_names(plugins.OPTIMIZERS_GROUP)
        if o.name not in known:
            raise ConfigError(
                file,
                f"{where}.name",
                f"unknown optimizer {o.name!r:.60} (allowed: {', '.join(known)}, or module:entry)",
            )
    try:
        optim.optimizer_entry(o.name)  # a plugin is imported here, and only here
    except ValueError as e:
        raise ConfigError(file, f"{where}.name", str(e)) from None
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
            except Exception as e:  # noqa: BLE001 - pytorch-optimizer's errors subclass Exception only
                msg = str(e).replace("\n", " ").removeprefix(f"{name}: ")
                raise ConfigError(file, f"{where}.{k}", f"{name} rejects {k}={v!r:.40}: {msg[:200]}") from None


def _cross_checks(spec: Spec) -> list[ConfigError]:
    """Every problem of the ZeRO stage x precision x optimizer x workload combination, each on
    the field to change: a combination no optimizer can run (DeepSpeed's, optim.entry.UNSUPPORTED)
    is the scale's, not the first optimizer's."""
    file, s, errors = spec.source, spec.scale, []
    engine_why = UNSUPPORTED.get((s.zero_stage, s.precision))
    if engine_why:
        ok = sorted({st for st, p in ELEMENTWISE if p == s.precision})
        precs = [p for p in PRECISIONS if (s.zero_stage, p) in ELEMENTWISE]
        errors.append(
            ConfigError(
                file,
                "scale.precision",
                f"{s.precision} cannot run at zero_stage {s.zero_stage} ({engine_why}); set scale.zero_stage to "
                f"{' or '.join(map(str, ok))} to keep {s.precision}, or scale.precision to {' or '.join(precs)}",
            )
        )
    for i, o in enumerate(spec.optimizers):
        # layer-wise / matrix rules degrade silently on ZeRO's flat partitions (optim/entry.py);
        # an element-wise rule is refused only by the engine (said once, above)
        msg = optim.combination_error(o.name, s.zero_stage, s.precision)
        if msg and not (engine_why and optim.optimizer_entry(o.name).elementwise):
            errors.append(ConfigError(file, f"optimizers[{i}].name", msg))
    supported = workloads.workload_class(spec.workload.type).precisions
    if s.precision not in supported:
        errors.append(
            ConfigError(
                file,
                "scale.precision",
                f"workload {spec.workload.type} supports {', '.join(supported)} only "
                f"(it feeds float32 inputs to the model); set scale.precision: fp32",
            )
        )
    try:
        _ = spec.study_dir  # the symlink-safe folder (opt_study.storage.layout.study_dir) raises
    except ValueError as e:
        errors.append(ConfigError(file, "study.name", str(e)))
    except OSError as e:  # a name over the OS limit
        errors.append(ConfigError(file, "study.storage", f"{spec.study.storage[:80]!r}: {e.strerror or e}"))
    return errors


def check_runnable(spec: Spec) -> None:
    """What only running a study needs, checked by `validate`, `run` and `resume` (not by the
    commands that read a study, which work on a read-only copy without the workload's data):
    a writable storage root and the workload's data."""
    _check_storage(spec)
    _check_workload_data(spec)


def storage_warnings(spec: Spec) -> list[str]:
    """What may work but should not be done, printed by `validate` and `run` (nothing is refused):
    an MLflow SQLite store on a network file system, whose locking SQLite cannot rely on when
    several processes write (the recorder, `sync-mlflow`, the UI)."""
    uri = spec.tracking_uri
    if not uri.startswith("sqlite:///"):
        return []
    fs = roots.shared_filesystem(Path(uri[len("sqlite:///") :]))
    if fs is None:
        return []
    field = "study.mlflow_uri" if spec.study.mlflow_uri else "study.storage"
    return [
        f"warning: {spec.source}: {field}: the MLflow SQLite store {uri[len('sqlite:///') :]} is on a {fs} file "
        "system, where SQLite's locking is unreliable; on a cluster run an MLflow server on PostgreSQL "
        "(cluster/README.md) and set study.mlflow_uri to it"
    ]


def _check_storage(spec: Spec) -> None:
    """A local storage root must be (or be creatable as) a writable directory; an object-store
    root's working copy is in the cache folder, which the first write creates."""
    if objectstore.is_uri(spec.study.storage):
        return
    problem = roots.storage_root_problem(Path(spec.study.storage))
    if problem:
        raise ConfigError(spec.source, "study.storage", f"{spec.study.storage[:80]!r} {problem}")


def _check_workload_data(spec: Spec) -> None:
    """A workload that reads files from ``data_dir`` (gpt2, resnet_cifar) needs it to exist: the
    trial would otherwise fail after Ray and DeepSpeed have started."""
    data_dir = getattr(spec.workload.params, "data_dir", None)
    if isinstance(data_dir, str) and not Path(data_dir).is_dir():
        raise ConfigError(
            spec.source,
            "workload.data_dir",
            f"{data_dir[:80]!r} is not a directory on this machine; the trials read their data from it",
        )
