"""The trials table: one JSON record per trial, and a Parquet snapshot of all of them.

Independent of Ray's result objects: whoever runs a trial writes its record, and a study's
outcome can be read back from the study dir alone. A record is a dict; the caller fills::

    trial_id  str     (required; safe path name)      status  str (required; TRIAL_STATUSES)
    study, optimizer, workload  str                   seed    int
    hparams   dict    (nested dicts allowed)          summary dict of floats (NaN allowed)
    resources dict                                    attempt int
    started, ended  float unix times                  error   str or None

Each record lives in ``trials/<trial_id>.json``, replaced atomically on every write, so the
file always holds the trial's latest state. ``write_trials_table`` snapshots all records to
``trials.parquet`` with dict fields flattened to columns: ``hp.<name>`` for ``hparams``,
``summary.<name>``, ``resources.<name>`` (nested keys joined with dots). JSON here is
Python's, which writes NaN/Infinity literally: diverged trials have NaN summaries.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from opt_study.storage import layout

TRIAL_STATUSES = frozenset({"pending", "running", "completed", "stopped", "diverged", "failed"})
TERMINAL_STATUSES = frozenset({"completed", "stopped", "diverged", "failed"})
# Finished for good: never re-run by a resume (a failed trial is retried).
DONE_STATUSES = frozenset({"completed", "stopped", "diverged"})

# Top-level fields with a fixed column type, so that the table's schema does not depend on
# which values happen to be present (an all-null column would otherwise be typed null).
_FIXED = {
    "trial_id": pa.string(),
    "study": pa.string(),
    "optimizer": pa.string(),
    "workload": pa.string(),
    "seed": pa.int64(),
    "status": pa.string(),
    "attempt": pa.int64(),
    "started": pa.float64(),
    "ended": pa.float64(),
    "error": pa.string(),
}
# Dict-valued fields and the prefix of their flattened columns.
_PREFIX = {"hparams": "hp", "summary": "summary", "resources": "resources"}


def _json_default(obj):
    # numpy scalars (e.g. a summary computed with numpy) have .item(); anything else is a bug.
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"trial record value of type {type(obj).__name__} is not JSON-serializable")


def write_trial_record(study_dir, record: dict) -> None:
    """Write ``trials/<trial_id>.json`` atomically (temp file, fsync, rename).

    Raises ValueError for a missing or unsafe ``trial_id`` or a status outside
    ``TRIAL_STATUSES``, TypeError for a value JSON cannot hold.
    """
    if "trial_id" not in record or "status" not in record:
        raise ValueError("a trial record needs at least 'trial_id' and 'status'")
    trial_id = layout.check_name(record["trial_id"], "trial id")
    if record["status"] not in TRIAL_STATUSES:
        raise ValueError(f"status {record['status']!r} not in {sorted(TRIAL_STATUSES)}")
    data = json.dumps(record, sort_keys=True, indent=1, default=_json_default)
    layout.atomic_write_bytes(layout.trial_record_path(Path(study_dir), trial_id), data.encode())


def read_trial_records(study_dir) -> list[dict]:
    """All trial records, sorted by trial_id. An unreadable file is skipped with a warning
    (records are written atomically, so that only happens when something else wrote it)."""
    tdir = layout.trials_dir(Path(study_dir))
    if not tdir.is_dir():
        return []
    records = []
    for path in sorted(tdir.glob("*.json")):
        if path.name.startswith((".", "_")):
            continue
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or "trial_id" not in record:
                raise ValueError("not a trial record")
        except (OSError, ValueError) as e:
            warnings.warn(f"skipping bad trial record {path}: {e}", stacklevel=2)
            continue
        records.append(record)
    return sorted(records, key=lambda r: str(r["trial_id"]))


def flatten(d: dict, prefix: str) -> dict:
    """``{"a": {"b": 1}, "c": 2}`` with prefix ``hp`` -> ``{"hp.a.b": 1, "hp.c": 2}``."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def _flat_row(record: dict) -> dict:
    row = {}
    for key, value in record.items():
        if key in _PREFIX and isinstance(value, dict):
            row.update(flatten(value, _PREFIX[key]))
        elif isinstance(value, dict):
            row.update(flatten(value, key))
        else:
            row[key] = value
    return row


def _column(name: str, values: list) -> pa.Array:
    """One column: the fixed type if it has one, else pyarrow's inference, else JSON text
    (mixed types across trials, e.g. a hyperparameter that is a number in one trial and a
    string in another)."""
    if name in _FIXED:
        return pa.array(values, type=_FIXED[name])
    try:
        arr = pa.array(values)
        if arr.type != pa.null():
            return arr
    except (pa.ArrowException, TypeError, ValueError):
        pass
    return pa.array(
        [None if v is None else (v if isinstance(v, str) else json.dumps(v)) for v in values], type=pa.string()
    )


def _column_order(names: set[str]) -> list[str]:
    fixed = [n for n in _FIXED if n in names]
    rest = sorted(names - set(_FIXED))
    groups = [f"{p}." for p in _PREFIX.values()]
    other = [n for n in rest if not n.startswith(tuple(groups))]
    grouped = [n for g in groups for n in rest if n.startswith(g)]
    return fixed + other + grouped


def trials_table(records: list[dict]) -> pa.Table:
    """The flattened table of ``records`` (what ``write_trials_table`` stores)."""
    rows = [_flat_row(r) for r in records]
    names = set(_FIXED) | {k for row in rows for k in row}
    order = _column_order(names)
    return pa.table({n: _column(n, [row.get(n) for row in rows]) for n in order})


def write_trials_table(study_dir) -> Path:
    """Snapshot every trial record to ``trials.parquet`` atomically; return its path."""
    table = trials_table(read_trial_records(study_dir))
    path = layout.trials_table_path(Path(study_dir))
    layout.atomic_write(path, lambda f: pq.write_table(table, f, compression="zstd"))
    return path
