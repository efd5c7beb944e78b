"""Step rows (dicts) to the typed columns of ``schema.STEP_SCHEMA``, with named errors.

``parquet.StepWriter`` checks the step and the identity columns per row; ``rows_table`` does
the rest a chunk at a time: the column names (one set union), one pyarrow conversion of all
rows into a struct of the plain columns (C++, about 1.5 µs per row of 45 cells, where a Python
call per cell costs about 5 µs, more than writing the chunk: benchmarks/bench_ingest.py), and
a vectorized check of the class values. What pyarrow refuses is looked at again column by
column with ``convert``, the reference of what each column takes: it either converts the cell
(pyarrow refuses some numbers ``float()`` takes, e.g. a Decimal or an int above 2**53) or
raises TypeError / ValueError naming the column, and ``rows_table`` adds the step of the row.
"""

from __future__ import annotations

import operator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from opt_study.results.schema import (
    CLASS_COLUMNS,
    CLASS_VALUES,
    COLUMN_NAMES,
    EXTRA_TYPE,
    GROUP_SUM_COLUMNS,
    GROUPS_TYPE,
    METRIC_COLUMNS,
    STEP_SCHEMA,
    check_keys,
)

FLOAT_COLUMNS = frozenset(METRIC_COLUMNS) | {"time_unix"}
_COLUMN_SET = frozenset(COLUMN_NAMES)
_CLASS_VALUES = pa.array(sorted(CLASS_VALUES), pa.string())
# The columns converted straight from the row dicts (trial_id, attempt: the writer's; groups:
# converted from its dict form). Nullable in the struct: a row may omit any of them.
_PLAIN_FIELDS = [f for f in STEP_SCHEMA if f.name not in ("trial_id", "attempt", "groups", "extra")]
_PLAIN_NAMES = [f.name for f in _PLAIN_FIELDS]
_PLAIN_STRUCT = pa.struct([pa.field(f.name, f.type) for f in _PLAIN_FIELDS])
# What a failed pyarrow conversion raises (OverflowError: an int beyond int64).
_ARROW_ERRORS = (pa.ArrowException, TypeError, ValueError, OverflowError)


def convert(name: str, value):
    """Convert one cell to the Python type of its column; raise TypeError/ValueError."""
    if value is None:
        return None
    if name == "groups":  # {group name: {sum name: value}} -> list of structs
        try:
            return [
                {"name": str(g), **{c: None if v.get(c) is None else float(v[c]) for c in GROUP_SUM_COLUMNS}}
                for g, v in value.items()
            ]
        except (AttributeError, TypeError, ValueError) as e:
            raise TypeError(f"column 'groups' takes {{group: {{sum name: number}}}}, got {value!r} ({e})") from None
    if name == "extra":  # {metric name: number} -> map entries
        try:
            return [(str(k), None if v is None else float(v)) for k, v in value.items()]
        except (AttributeError, TypeError, ValueError) as e:
            raise TypeError(f"column 'extra' takes {{name: number}}, got {value!r:.80} ({e})") from None
    if name in FLOAT_COLUMNS:
        if not isinstance(value, (str, bytes)):
            try:
                return float(value)
            except (TypeError, ValueError):
                pass
        raise TypeError(f"column {name!r} takes a number, got {value!r}")
    if name in ("step", "attempt"):
        try:
            return operator.index(value)
        except TypeError:
            raise TypeError(f"column {name!r} takes an integer, got {value!r}") from None
    if name == "measured":
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"column 'measured' takes a bool, got {value!r}")
        return bool(value)
    if isinstance(value, bytes):  # as pyarrow: UTF-8 bytes are text
        try:
            value = value.decode()
        except UnicodeDecodeError:
            raise ValueError(f"column {name!r} takes a string, got {value!r}") from None
    if not isinstance(value, str):
        raise TypeError(f"column {name!r} takes a string, got {value!r}")
    if name in CLASS_COLUMNS and value not in CLASS_VALUES:
        raise ValueError(f"column {name!r} takes one of {sorted(CLASS_VALUES)}, got {value!r}")
    return value


def rows_table(rows: list[dict], trial_id: str, attempt: int) -> pa.Table:
    """``rows`` as a ``STEP_SCHEMA`` table, ``trial_id`` and ``attempt`` filled in, missing
    cells null, ``measured`` null -> False.

    Raises ValueError for an unknown column and TypeError / ValueError "column 'c' takes ...,
    got v (step s)" for a bad cell (the first found), after removing that row from ``rows``
    (so the caller can retry the others).
    """
    n = len(rows)
    if not _COLUMN_SET.issuperset(set().union(*rows)):  # one C-level pass over every key
        i, row = next((i, r) for i, r in enumerate(rows) if not _COLUMN_SET.issuperset(r))
        step = rows.pop(i).get("step")
        try:
            check_keys(row)
        except ValueError as e:
            raise ValueError(f"{e} (step {step})") from None
    try:
        cols = dict(zip(_PLAIN_NAMES, pa.array(rows, type=_PLAIN_STRUCT).flatten()))
    except _ARROW_ERRORS:
        cols = {f.name: _column(rows, f) for f in _PLAIN_FIELDS}
    cols["trial_id"] = pa.array([trial_id] * n, pa.string())
    cols["attempt"] = pa.array(np.full(n, attempt, np.int32))
    cols["measured"] = pc.fill_null(cols["measured"], False)
    for name in CLASS_COLUMNS:
        ok = pc.or_kleene(pc.is_null(cols[name]), pc.is_in(cols[name], value_set=_CLASS_VALUES))
        if not pc.all(ok).as_py():
            i = pc.index(ok, False).as_py()
            _convert_at(rows, i, name, rows[i][name])  # raises, naming the column and the step
    groups = [r.get("groups") for r in rows]
    if any(g is not None for g in groups):
        cols["groups"] = pa.array([_convert_at(rows, i, "groups", g) for i, g in enumerate(groups)], type=GROUPS_TYPE)
    else:
        cols["groups"] = pa.nulls(n, GROUPS_TYPE)
    extra = [r.get("extra") for r in rows]
    if any(e is not None for e in extra):
        cols["extra"] = pa.array([_convert_at(rows, i, "extra", e) for i, e in enumerate(extra)], type=EXTRA_TYPE)
    else:
        cols["extra"] = pa.nulls(n, EXTRA_TYPE)
    return pa.Table.from_arrays([cols[name] for name in STEP_SCHEMA.names], schema=STEP_SCHEMA)


def _column(rows: list[dict], field: pa.Field) -> pa.Array:
    """One column of ``rows``: pyarrow's conversion, else ``convert`` cell by cell."""
    values = [r.get(field.name) for r in rows]
    try:
        return pa.array(values, type=field.type)
    except _ARROW_ERRORS:
        return pa.array([_convert_at(rows, i, field.name, v) for i, v in enumerate(values)], type=field.type)


def _convert_at(rows: list[dict], i: int, name: str, value):
    """``convert`` of cell (row i, column name); on error remove row i and name its step."""
    try:
        return convert(name, value)
    except (TypeError, ValueError) as e:
        step = rows.pop(i)["step"]
        raise type(e)(f"{e} (step {step})") from None
