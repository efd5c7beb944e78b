"""User code named in a study: import paths (``module:attr``) and entry points.

A study names a workload, an optimizer or an extra metric either by a built-in name, by an import
path ``mypkg.models:MyWorkload`` (imported because the user's own YAML asks for it), or by a name
an installed package registers in one of the entry-point groups ``opt_study.workloads``,
``opt_study.optimizers``, ``opt_study.metrics``. The registries (``opt_study.workloads``,
``opt_study.optim``) look a built-in name up first and never import anything for it; only a name
they do not know reaches this module. Every import made here is remembered in ``IMPORTED`` so
``opt-study validate`` can say which module it imported.

No torch and no registry here: this module only turns a name into a Python object and says where
it came from; each registry checks that the object is what it needs.
"""

from __future__ import annotations

import importlib
import re
from importlib import metadata
from typing import Any, Callable, Mapping

WORKLOADS_GROUP = "opt_study.workloads"
OPTIMIZERS_GROUP = "opt_study.optimizers"
METRICS_GROUP = "opt_study.metrics"

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
# module.path:attr.path, as entry points write them
IMPORT_PATH = re.compile(rf"{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*")  # used with fullmatch

# name -> where it came from ("module mypkg.models", "entry point foo = mypkg:Foo (dist mypkg 0.1)")
IMPORTED: dict[str, str] = {}


def is_import_path(name: str) -> bool:
    """True for ``module:attr``: a name that imports user code."""
    return isinstance(name, str) and ":" in name


def load(name: str, group: str) -> Any:
    """The object behind ``name``: an import path, else an entry point of ``group``.

    Raises ValueError with a one-line reason (bad path, module not importable, no such
    attribute, no such entry point).
    """
    if is_import_path(name):
        return _import(name)
    return _entry_point(name, group)


def entry_point_names(group: str) -> list[str]:
    """The names installed packages register in ``group`` (for "known: ..." messages)."""
    return sorted({ep.name for ep in metadata.entry_points(group=group)})


def _import(path: str) -> Any:
    if not IMPORT_PATH.fullmatch(path):
        raise ValueError(f"{path!r:.80} is not an import path module.sub:attr")
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - user code: any error while importing it is reported
        raise ValueError(
            f"cannot import module {module_name!r}: {type(e).__name__}: {str(e)[:160]} "
            "(is its package installed or on PYTHONPATH?)"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    IMPORTED[path] = f"module {module_name}"
    return obj


def _entry_point(name: str, group: str) -> Any:
    found = [ep for ep in metadata.entry_points(group=group) if ep.name == name]
    if not found:
        raise ValueError(f"no entry point {name!r:.60} in group {group}")
    ep = found[0]
    try:
        obj = ep.load()
    except Exception as e:  # noqa: BLE001 - user code
        raise ValueError(
            f"entry point {name} = {ep.value} failed to load: {type(e).__name__}: {str(e)[:160]}"
        ) from None
    dist = f" (package {ep.dist.name} {ep.dist.version})" if ep.dist is not None else ""
    IMPORTED[name] = f"entry point {group}:{name} = {ep.value}{dist}"
    return obj


def metric(name: str) -> Callable[[Mapping[str, Any]], Mapping[str, float]]:
    """A user metric (``measure.extra``): a function of one measured step's row (the dict of
    opt_study.results.schema columns, e.g. ``row["sq_grad"]``, ``row["loss"]``) returning
    ``{name: float}``. There are no built-in extra metrics, so every name is a plugin."""
    obj = load(name, METRICS_GROUP)
    if not callable(obj):
        raise ValueError(f"{name} must be a function row -> {{name: float}}, got {type(obj).__name__}")
    return obj
