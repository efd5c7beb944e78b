"""Load a study YAML into `opt_study.config.Spec`, or fail with one `ConfigError`.

Security: YAML is parsed by a SafeLoader subclass (no Python object tags) with a cap on the file
size and on the number of aliases; a safe loader still *shares* aliased nodes, so a "billion
laughs" document would only explode when the config is walked: capping aliases stops it at parse.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from opt_study import config as C
from opt_study.space import parse_domain

MAX_ALIASES = 64
MAX_DEPTH = 32


class _CappedLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents with more than MAX_ALIASES aliases."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases = getattr(self, "_aliases", 0) + 1
            if self._aliases > MAX_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_ALIASES} YAML aliases (alias bombs are refused)")
        return super().compose_node(parent, index)


def read_yaml(path: Path) -> Any:
    file = str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise C.ConfigError(file, "", f"cannot read: {e.strerror or e}") from None
    if len(raw) > C.MAX_CONFIG_BYTES:
        raise C.ConfigError(file, "", f"file is {len(raw)} bytes; a study spec is at most {C.MAX_CONFIG_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise C.ConfigError(file, "", "not UTF-8 text (is it a binary file?)") from None
    try:
        return yaml.load(text, Loader=_CappedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        msg = str(e).replace("\n", " ")
        raise C.ConfigError(file, "", f"invalid YAML: {msg[:300]}") from None


def load_study(path: str | Path) -> C.Spec:
    """Parse and validate a study file. Raises ConfigError naming file and field."""
    path = Path(path)
    return parse_study(read_yaml(path), str(path))


def parse_study(data: Any, file: str = "<memory>") -> C.Spec:
    if data is None:
        raise C.ConfigError(file, "", "the file is empty; a study needs study, workload and optimizers")
    _check_depth(data, file)
    top = _mapping(data, file, "")
    allowed = {"study", "workload", "optimizers", "scale", "training", "search", "measure"}
    _no_unknown(top, allowed, file, "")
    for required in ("study", "workload", "optimizers"):
        if required not in top:
            raise C.ConfigError(file, required, "is required")
    study = build(C.StudyConfig, top["study"], file, "study")
    # Ray workers run in other working directories: pin a relative storage root now.
    study = dataclasses.replace(study, storage=str(Path(study.storage).expanduser().resolve()))
    try:
        spec = C.Spec(
            study=study,
            workload=_workload(top["workload"], file),
            optimizers=_optimizers(top["optimizers"], file),
            scale=build(C.ScaleConfig, top.get("scale", {}), file, "scale"),
            training=build(C.TrainingConfig, top.get("training", {}), file, "training"),
            search=build(C.SearchConfig, top.get("search", {}), file, "search"),
            measure=build(C.MeasureConfig, top.get("measure", {}), file, "measure"),
            source=file,
        )
    except C.FieldError as e:  # a cross-slice rule raised from Spec-level checks
        raise C.ConfigError(file, e.field, e.message) from None
    _cross_checks(spec)
    return spec


# ------------------------------------------------------------------------------ generic builder
def build(cls, raw: Any, file: str, where: str):
    """Build frozen dataclass `cls` from a YAML mapping: unknown keys, types, then __post_init__."""
    raw = {} if raw is None else raw
    m = _mapping(raw, file, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _no_unknown(m, set(fields), file, where)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in m.items():
        kwargs[name] = _coerce(hints[name], value, file, f"{where}.{name}" if where else name)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise C.ConfigError(file, f"{where}.{name}" if where else name, "is required")
    try:
        return cls(**kwargs)
    except C.FieldError as e:
        raise C.ConfigError(file, f"{where}.{e.field}" if where else e.field, e.message) from None


def _coerce(tp, value: Any, file: str, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, file, where)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, file, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise C.ConfigError(file, where, f"must be a list, got {_tname(value)}")
        return tuple(_coerce(args[0], v, file, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    return _scalar(tp, value, file, where)


def _scalar(tp, value: Any, file: str, where: str):
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > 2**62:
                raise C.ConfigError(file, where, f"{value} is absurdly large")
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise C.ConfigError(file, where, "must be a finite number")
            return float(value)
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:  # pragma: no cover - a field type this builder does not know is a programming error
        raise TypeError(f"unsupported config field type {tp} at {where}")
    raise C.ConfigError(file, where, f"must be {tp.__name__}, got {_tname(value)} {value!r:.60}")


def _tname(v: Any) -> str:
    return {dict: "a mapping", list: "a list", type(None): "null"}.get(type(v), type(v).__name__)


def _mapping(raw: Any, file: str, where: str) -> Mapping:
    if not isinstance(raw, Mapping):
        raise C.ConfigError(file, where, f"must be a mapping, got {_tname(raw)}")
    bad = [k for k in raw if not isinstance(k, str)]
    if bad:
        raise C.ConfigError(file, where, f"keys must be strings, got {bad[0]!r}")
    return raw


def _no_unknown(m: Mapping, allowed: set[str], file: str, where: str) -> None:
    unknown = sorted(set(m) - allowed)
    if unknown:
        at = f"{where}.{unknown[0]}" if where else unknown[0]
        raise C.ConfigError(file, at, f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _check_depth(data: Any, file: str, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise C.ConfigError(file, "", f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(data, Mapping):
        for v in data.values():
            _check_depth(v, file, depth + 1)
    elif isinstance(data, list):
        for v in data:
            _check_depth(v, file, depth + 1)


# ------------------------------------------------------------------------- registry-backed parts
def _workload(raw: Any, file: str) -> C.WorkloadConfig:
    from opt_study import workloads  # lazy: imports torch

    m = _mapping(raw, file, "workload")
    if "type" not in m:
        raise C.ConfigError(file, "workload.type", f"is required (allowed: {', '.join(sorted(workloads.WORKLOADS))})")
    wtype = m["type"]
    if not isinstance(wtype, str) or wtype not in workloads.WORKLOADS:
        raise C.ConfigError(file, "workload.type",
                            f"unknown workload {wtype!r} (allowed: {', '.join(sorted(workloads.WORKLOADS))})")
    params = {k: v for k, v in m.items() if k != "type"}
    cfg = build(workloads.workload_config_class(wtype), params, file, "workload")
    return C.WorkloadConfig(type=wtype, params=cfg)


def _optimizers(raw: Any, file: str) -> tuple[C.OptimizerSpec, ...]:
    from opt_study import optim  # lazy: imports torch

    if not isinstance(raw, list) or not raw:
        raise C.ConfigError(file, "optimizers", "must be a non-empty list of {name, params}")
    out, labels = [], set()
    for i, item in enumerate(raw):
        where = f"optimizers[{i}]"
        m = _mapping(item, file, where)
        _no_unknown(m, {"name", "params", "label"}, file, where)
        name = m.get("name")
        if not isinstance(name, str) or name not in optim.OPTIMIZERS:
            raise C.ConfigError(file, f"{where}.name",
                                f"unknown optimizer {name!r} (allowed: {', '.join(sorted(optim.OPTIMIZERS))})")
        params = _mapping(m.get("params") or {}, file, f"{where}.params")
        space = {}
        for k, v in params.items():
            try:
                space[k] = parse_domain(v, f"{where}.params.{k}")
            except ValueError as e:
                field, _, msg = str(e).partition(": ")
                raise C.ConfigError(file, field, msg) from None
        try:  # unknown hyperparameter names, checked against the optimizer's defaults
            optim.resolve_hparams(name, {k: d.values[0] for k, d in space.items()})
        except ValueError as e:
            raise C.ConfigError(file, f"{where}.params", str(e)) from None
        label = str(m.get("label") or name)
        try:
            C._check_name(label, "label")
        except C.FieldError as e:
            raise C.ConfigError(file, f"{where}.label", e.message) from None
        if label in labels:
            raise C.ConfigError(file, f"{where}.label", f"{label!r} appears twice; give each entry a distinct label")
        labels.add(label)
        out.append(C.OptimizerSpec(name=name, space=space, label=label))
    return tuple(out)


def _cross_checks(spec: C.Spec) -> None:
    from opt_study import optim

    file = spec.source
    for i, o in enumerate(spec.optimizers):
        entry = optim.optimizer_entry(o.name)
        if spec.scale.zero_stage not in entry.zero_stages:
            raise C.ConfigError(file, f"optimizers[{i}].name",
                                f"{o.name} is not correct under ZeRO stage {spec.scale.zero_stage} "
                                f"(supported stages: {sorted(entry.zero_stages)}); change scale.zero_stage")
    if spec.search.asha and spec.training.steps // spec.training.eval_every < spec.search.asha.grace_period:
        raise C.ConfigError(file, "search.asha.grace_period",
                            "exceeds the number of evaluations (training.steps / training.eval_every)")
