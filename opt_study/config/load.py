"""Load a study YAML into `opt_study.config.Spec` (structure only), or fail with `ConfigError`
(`ConfigErrors` when several top-level sections have problems: each is named).

The file is read by `opt_study.config.yaml_file.read_yaml` (a capped SafeLoader: no object tags,
no alias bombs, no deep nesting, no duplicate keys). A safe loader still *shares* aliased nodes,
so the walk here counts every value it visits (MAX_NODES): 63 nested aliases cannot expand to
7**9 values. Every failure, whatever the library raised, becomes one ConfigError.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Mapping

from opt_study.config import spec as C
from opt_study.config.space import SAMPLED, budget, parse_domain
from opt_study.config.yaml_file import MAX_DEPTH, read_yaml
from opt_study.storage import layout
from opt_study.storage.objectstore import is_uri

MAX_NODES = 100_000  # values visited when walking the document, aliases counted once per use


def load_spec(path: str | Path) -> C.Spec:
    """Parse a study file into a Spec (structure only; `opt_study.validate.load_study` adds the
    registry checks). Raises ConfigError naming file and field."""
    path = Path(path)
    return parse_spec(read_yaml(path), str(path))


def parse_spec(data: Any, file: str = "<memory>") -> C.Spec:
    """Validate a parsed document (the top-level dict) into a Spec; problems are raised as
    ConfigError(file, dotted field, what is allowed): the first one of each top-level section,
    all sections at once (ConfigErrors when there are several). Relative storage is resolved
    against the current directory."""
    if data is None:
        raise C.ConfigError(file, "", "the file is empty; a study needs study, workload and optimizers")
    _check_shape(data, file)
    top = _mapping(data, file, "")
    allowed = {"study", "workload", "optimizers", "scale", "training", "search", "measure"}
    _no_unknown(top, allowed, file, "")
    errors: list[C.ConfigError] = []
    for required in ("study", "workload", "optimizers"):
        if required not in top:
            errors.append(C.ConfigError(file, required, "is required"))
    sections = {
        "study": lambda: _study(top["study"], file),
        "workload": lambda: _workload(top["workload"], file),
        "optimizers": lambda: _optimizers(top["optimizers"], file),
        "scale": lambda: build(C.ScaleConfig, top.get("scale", {}), file, "scale"),
        "training": lambda: build(C.TrainingConfig, top.get("training", {}), file, "training"),
        "search": lambda: build(C.SearchConfig, top.get("search", {}), file, "search"),
        "measure": lambda: build(C.MeasureConfig, top.get("measure", {}), file, "measure"),
    }
    built = {
        k: collect(errors, fn) for k, fn in sections.items() if k in top or k not in ("study", "workload", "optimizers")
    }
    raise_all(errors)
    try:
        spec = C.Spec(**built, source=file)
    except C.FieldError as e:  # a cross-slice rule raised from Spec-level checks
        raise C.ConfigError(file, e.field, e.message) from None
    _cross_checks(spec)
    return spec


def _study(raw: Any, file: str) -> C.StudyConfig:
    study = build(C.StudyConfig, raw, file, "study")
    # Ray workers run in other working directories: pin a relative storage root now.
    try:
        storage = study.storage if is_uri(study.storage) else str(Path(study.storage).expanduser().resolve())
    except (OSError, RuntimeError, ValueError) as e:  # no home directory for ~, a symlink loop
        raise C.ConfigError(file, "study.storage", f"cannot resolve {study.storage[:60]!r}: {e}") from None
    return dataclasses.replace(study, storage=storage)


# ------------------------------------------------------------------------- several errors at once
class ConfigErrors(C.ConfigError):
    """Independent problems of one file, reported together (`opt-study validate` prints each as
    its own `file: field: message` line). A ConfigError whose file/field/message are the first
    problem's, so code that handles one error handles this too."""

    def __init__(self, errors: list[C.ConfigError]):
        first = errors[0]
        super().__init__(first.file, first.field, first.message)
        self.errors = list(errors)

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


def collect(errors: list[C.ConfigError], check, *args):
    """``check(*args)``'s result; a ConfigError it raises is appended to ``errors`` (None returned)."""
    try:
        return check(*args)
    except ConfigErrors as e:
        errors.extend(e.errors)
    except C.ConfigError as e:
        errors.append(e)
    return None


def raise_all(errors: list[C.ConfigError]) -> None:
    """Raise the one error, or ConfigErrors for several; nothing when ``errors`` is empty."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)


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
        if isinstance(value, bool) and bool in inner:  # e.g. str | bool (measure.fp32_grads)
            return value
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
                raise C.ConfigError(file, where, f"a {len(str(abs(value)))}-digit integer is absurdly large")
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # A huge int overflows float() (10**400): it is refused like inf, not raised as OverflowError.
            if (abs(value) > 2**62) if isinstance(value, int) else not math.isfinite(value):
                raise C.ConfigError(file, where, f"must be a finite number of sane size, got {str(value)[:40]}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= 2**62:
            return str(value)  # `name: 2024`, `probe_s: 1`
        if isinstance(value, float) and math.isfinite(value):
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
        raise C.ConfigError(file, where, f"keys must be strings, got {bad[0]!r:.60}")
    return raw


def _no_unknown(m: Mapping, allowed: set[str], file: str, where: str) -> None:
    unknown = sorted(set(m) - allowed)
    if unknown:
        at = f"{where}.{unknown[0][:60]}" if where else unknown[0][:60]
        raise C.ConfigError(file, at, f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _check_shape(data: Any, file: str) -> None:
    """At most MAX_DEPTH levels and MAX_NODES values, counting a shared (aliased) value once per
    use: the later walks see exactly that many. Iterative, so a cyclic document just hits a cap."""
    stack, visited = [(data, 0)], 0
    while stack:
        value, depth = stack.pop()
        visited += 1
        if visited > MAX_NODES:
            raise C.ConfigError(file, "", f"more than {MAX_NODES} values once aliases are expanded")
        if depth > MAX_DEPTH:
            raise C.ConfigError(file, "", f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, Mapping):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


# ------------------------------------------------------------------ optimizers and workload
# Only the structure is checked here; names, hyperparameters and typed workload params are
# checked against the registries by opt_study.validate (a layer above workloads and optim).
def _workload(raw: Any, file: str) -> C.WorkloadConfig:
    """`type` plus the raw params mapping (typed by opt_study.validate)."""
    m = _mapping(raw, file, "workload")
    if "type" not in m:
        raise C.ConfigError(file, "workload.type", "is required (opt-study validate lists the workloads)")
    if not isinstance(m["type"], str):
        raise C.ConfigError(file, "workload.type", f"must be a workload name, got {_tname(m['type'])}")
    return C.WorkloadConfig(type=m["type"], params={k: v for k, v in m.items() if k != "type"})


def _optimizers(raw: Any, file: str) -> tuple[C.OptimizerSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise C.ConfigError(file, "optimizers", "must be a non-empty list of {name, params}")
    out, labels = [], set()
    for i, item in enumerate(raw):
        where = f"optimizers[{i}]"
        m = _mapping(item, file, where)
        _no_unknown(m, {"name", "params", "label"}, file, where)
        name = m.get("name")
        if not isinstance(name, str):
            raise C.ConfigError(file, f"{where}.name", f"must be an optimizer name, got {_tname(name)}")
        # only an absent or null `params` means none: `params: false` (or [], 0, "") is a mistake
        params = _mapping({} if m.get("params") is None else m["params"], file, f"{where}.params")
        space = {}
        for k, v in params.items():
            try:
                space[k] = parse_domain(v, f"{where}.params.{k}")
            except ValueError as e:
                field, _, msg = str(e).partition(": ")
                raise C.ConfigError(file, field, msg) from None
        label = _default_label(name) if m.get("label") is None else _scalar(str, m["label"], file, f"{where}.label")
        try:
            C.check_name(label, "label")
        except C.FieldError as e:
            raise C.ConfigError(file, f"{where}.label", e.message) from None
        if label in labels:
            raise C.ConfigError(file, f"{where}.label", f"{label!r} appears twice; give each entry a distinct label")
        labels.add(label)
        out.append(C.OptimizerSpec(name=name, space=space, label=label))
    return tuple(out)


def _default_label(name: str) -> str:
    """An entry's label when it gives none: its name, or for an import path ``pkg.mod:attr`` the
    attribute (a label names trial ids and folders, where ``:`` is not allowed)."""
    return name.rpartition(":")[2].rpartition(".")[2] if ":" in name else name


def _cross_checks(spec: C.Spec) -> None:
    """Rules that span slices and need no registry."""
    file = spec.source
    if spec.measure.noise_scale and spec.scale.workers * spec.scale.grad_accum < 2:
        raise C.ConfigError(
            file, "measure.noise_scale", "needs two batch sizes: set scale.workers x scale.grad_accum >= 2"
        )
    fixed, sc = spec.measure.curvature_batch, spec.scale
    if fixed is not None and fixed.size % (sc.workers * sc.grad_accum):
        # each rank's share splits into grad_accum equal micro-batches: the mean of their means
        # is then the mean over the whole batch at every world size
        raise C.ConfigError(
            file,
            "measure.curvature_batch.size",
            f"{fixed.size} is not divisible by scale.workers x scale.grad_accum = {sc.workers * sc.grad_accum}",
        )
    t = spec.training
    evals = -(-t.steps // t.eval_every)  # at every eval_every-th step and at the last step
    if spec.search.asha and evals < spec.search.asha.grace_period:
        raise C.ConfigError(
            file,
            "search.asha.grace_period",
            f"exceeds the {evals} evaluations of a trial (training.steps / training.eval_every)",
        )
    _check_tpe_spaces(spec)
    _check_trial_count(spec)


def _check_tpe_spaces(spec: C.Spec) -> None:
    """TPE models sampled domains only: a grid cannot be one of its dimensions, and a space with
    nothing sampled would propose the same configuration `samples` times."""
    if spec.search.method != "tpe":
        return
    for i, o in enumerate(spec.optimizers):
        grid = sorted(k for k, d in o.space.items() if d.kind == "grid")
        if grid:
            raise C.ConfigError(
                spec.source,
                f"optimizers[{i}].params.{grid[0]}",
                "search.method tpe cannot search a grid; use {choice: [...]} instead",
            )
        if not any(d.kind in SAMPLED for d in o.space.values()):
            raise C.ConfigError(
                spec.source,
                f"optimizers[{i}].params",
                "search.method tpe needs at least one sampled hyperparameter "
                "({loguniform: [lo, hi]}, {uniform: ..}, {int: ..} or {choice: ..})",
            )


def _check_trial_count(spec: C.Spec) -> None:
    """The plan is expanded before anything runs: refuse one of more than C.MAX_TRIALS trials
    (five 40-value grids would be 10**8 trials, and `validate` would hang expanding them)."""
    seeds, samples, total = len(spec.study.seeds), spec.search.samples, 0
    for i, o in enumerate(spec.optimizers):
        if budget(o.space, 1) * seeds > C.MAX_TRIALS:
            raise C.ConfigError(
                spec.source, f"optimizers[{i}].params", f"its grid times {seeds} seed(s) is over {C.MAX_TRIALS} trials"
            )
        total += budget(o.space, samples) * seeds
    if total > C.MAX_TRIALS:
        raise C.ConfigError(
            spec.source, "search.samples", f"the study would plan {total} trials; at most {C.MAX_TRIALS}"
        )


def study_folder_spec(folder: str | Path) -> C.Spec:
    """The spec a study folder was started from (its ``spec.yaml``), structure only. A folder
    that was moved keeps working where it is now: its storage root becomes the folder's parent."""
    folder = Path(folder).resolve()
    if not layout.spec_path(folder).is_file():
        raise C.ConfigError(
            str(folder),
            "",
            "not a study directory (no spec.yaml); give the study's folder under the storage root, or its YAML file",
        )
    spec = load_spec(layout.spec_path(folder))
    if spec.study_dir != folder:
        spec = dataclasses.replace(spec, study=dataclasses.replace(spec.study, storage=str(folder.parent)))
    return spec
