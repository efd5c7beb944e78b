"""Config helpers shared by the adapter workloads: keyword-argument mappings and import paths.

An adapter's YAML passes keyword arguments through to code it does not own (a user's factory,
`AutoConfig`, `torchvision.models.get_model`). They are kept as a sorted tuple of (name, value)
pairs, so the frozen config stays hashable and compares equal regardless of the YAML's key order;
values are YAML scalars or lists of them (lists become tuples for the same reason).
"""

from __future__ import annotations

from typing import Any, Mapping

from opt_study import plugins
from opt_study.config import FieldError

Kwargs = tuple[tuple[str, Any], ...]
_SCALARS = (bool, int, float, str, type(None))


def frozen_kwargs(value: Any, field: str) -> Kwargs:
    """`value` (None, a mapping, or already frozen pairs) as sorted (name, value) pairs."""
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = [(k, v) for k, v in items]
    except (TypeError, ValueError):
        raise FieldError(field, f"must be a mapping of argument names to values, got {value!r:.60}") from None
    out = []
    for k, v in pairs:
        if not isinstance(k, str) or not k.isidentifier():
            raise FieldError(field, f"argument names must be identifiers, got {k!r:.40}")
        if isinstance(v, (list, tuple)) and all(isinstance(x, _SCALARS) for x in v):
            v = tuple(v)
        elif not isinstance(v, _SCALARS):
            raise FieldError(field, f"{k}: must be a number, string, boolean, null or a list of them, got {v!r:.40}")
        out.append((k, v))
    return tuple(sorted(out))


def as_kwargs(pairs: Kwargs) -> dict[str, Any]:
    """The pairs as keyword arguments, tuples back to lists (what YAML gave)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in pairs}


def check_import_path(value: Any, field: str) -> None:
    """`value` is a `module:attr` import path (opt_study.plugins' syntax); nothing is imported."""
    if not isinstance(value, str) or not plugins.IMPORT_PATH.fullmatch(value):
        raise FieldError(field, f"must be an import path module.sub:attr, got {value!r:.80}")


def load_object(path: str, field: str) -> Any:
    """The object behind import path `path`, imported now (when the workload is built)."""
    try:
        return plugins.load(path, plugins.WORKLOADS_GROUP)
    except ValueError as e:
        raise FieldError(field, str(e)) from None
