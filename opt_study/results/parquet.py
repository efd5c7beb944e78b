"""Exactly-once per-step rows: an append-only chunk writer and a "last attempt wins" reader.

Writing. A trial's ``StepWriter`` buffers rows and commits them as immutable chunks
``steps/trial_id=<id>/attempt=<a>/part-<first>-<last>.parquet`` (see ``layout``): each chunk
is written under a hidden temporary name in its final directory, fsynced, then renamed, so a
chunk is either wholly visible or absent. A restarted trial never edits old files: it opens
a new attempt (``next_attempt``) that records its ``start_step`` (the checkpoint it resumed
from) in ``_START`` before its first row.

Reading (``read_steps``), valid even where rename is not atomic (object stores), because it
only needs committed names and the ``_START`` markers:

1. hidden and temporary files are ignored;
2. the rows of attempt ``a`` are kept only for steps below the ``start_step`` of every later
   attempt of the same trial (so a restart from step s replaces steps >= s);
3. within one attempt, a step present twice keeps the row of the last chunk (by name);
4. a corrupt or truncated chunk is skipped with a warning (``check_chunks`` lists them).

So every (trial, step) appears exactly once, whatever was lost or replayed around a crash,
provided the trial loop calls ``flush()`` whenever it saves a checkpoint (rows buffered
after the last flush are lost with the process, and the resumed attempt rewrites them).

The files are plain Parquet: ``pyarrow.dataset`` and DuckDB read them directly;
``steps_sql`` gives a DuckDB query that applies rule 2 (see its docstring for the nuance).
"""

from __future__ import annotations

import json
import operator
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from opt_study.results import layout
from opt_study.results.schema import (
    GROUP_SUM_COLUMNS,
    CLASS_COLUMNS,
    CLASS_VALUES,
    METRIC_COLUMNS,
    STEP_SCHEMA,
    check_keys,
)

_FLOAT_COLUMNS = frozenset(METRIC_COLUMNS) | {"time_unix"}


class StepWriter:
    """Appends the step rows of one attempt of one trial; see the module docstring.

    Rows are dicts keyed by schema columns; nullable columns may be omitted. ``step`` is
    required and strictly increasing, starting at ``start_step`` or later; ``time_unix``
    defaults to the time of ``append``; ``measured`` defaults to False; ``trial_id`` and
    ``attempt`` are filled in (if given they must match). Values are converted on
    ``append`` so that a bad value fails at the step that produced it, not at the flush.

    Creating the writer creates the attempt directory exclusively (FileExistsError if that
    attempt already exists: use ``next_attempt``) and commits ``_START``.
    """

    def __init__(self, study_dir, trial_id: str, attempt: int, start_step: int,
                 rows_per_chunk: int = 1000):
        start_step = operator.index(start_step)
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        if rows_per_chunk < 1:
            raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
        self.trial_id = layout.check_name(trial_id, "trial id")
        self.attempt = attempt
        self.start_step = start_step
        self.rows_per_chunk = rows_per_chunk
        self.dir = layout.attempt_dir(Path(study_dir), trial_id, attempt)
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        self.dir.mkdir(exist_ok=False)  # atomic and exclusive: one writer per attempt
        payload = json.dumps({"start_step": start_step}).encode()
        layout.atomic_write_bytes(self.dir / layout.START_FILE, payload)
        self._rows: list[dict] = []
        self._present: set[str] = set()  # columns given in some buffered row
        self._last_step: int | None = None
        self._closed = False

    def append(self, row: dict) -> None:
        """Validate and buffer one row; commit a chunk once ``rows_per_chunk`` are buffered."""
        if self._closed:
            raise RuntimeError("StepWriter is closed")
        check_keys(row)
        clean = {name: _convert(name, value) for name, value in row.items()}
        if clean.get("trial_id", self.trial_id) != self.trial_id:
            raise ValueError(f"row trial_id {clean['trial_id']!r} != writer's {self.trial_id!r}")
        if clean.get("attempt", self.attempt) != self.attempt:
            raise ValueError(f"row attempt {clean['attempt']} != writer's {self.attempt}")
        if clean.get("step") is None:
            raise ValueError("row needs a 'step'")
        step = clean["step"]
        floor = self.start_step if self._last_step is None else self._last_step + 1
        if step < floor:
            raise ValueError(f"step {step} out of order: expected >= {floor} "
                             "(steps are strictly increasing from start_step)")
        if clean.get("time_unix") is None:
            clean["time_unix"] = time.time()
        if clean.get("measured") is None:
            clean["measured"] = False
        self._rows.append(clean)
        self._present.update(clean)
        self._last_step = step
        if len(self._rows) >= self.rows_per_chunk:
            self.flush()

    def flush(self) -> Path | None:
        """Commit the buffered rows as one immutable chunk; return its path (None if empty).

        Temp file in the same directory -> fsync -> ``os.replace`` -> fsync of the
        directory. On failure the buffer is kept, so a later flush can retry.
        """
        if not self._rows:
            return None
        table = self._table()
        first, last = self._rows[0]["step"], self._rows[-1]["step"]
        final = self.dir / layout.chunk_name(first, last)
        layout.atomic_write(final, lambda f: pq.write_table(table, f, compression="zstd"))
        self._rows = []
        self._present = set()
        return final

    def close(self) -> None:
        """Flush what is buffered and refuse further rows. Idempotent."""
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> "StepWriter":
        return self

    def __exit__(self, *exc) -> None:
        # Rows of completed steps are valid even if the loop raised: commit them.
        self.close()

    def _table(self) -> pa.Table:
        n = len(self._rows)
        arrays = []
        for f in STEP_SCHEMA:
            if f.name == "trial_id":
                arrays.append(pa.array([self.trial_id] * n, type=f.type))
            elif f.name == "attempt":
                arrays.append(pa.array([self.attempt] * n, type=f.type))
            elif f.name in self._present:
                arrays.append(pa.array([r.get(f.name) for r in self._rows], type=f.type))
            else:  # a column no row gave: all null, without a Python loop
                arrays.append(pa.nulls(n, type=f.type))
        return pa.Table.from_arrays(arrays, schema=STEP_SCHEMA)


def _convert(name: str, value):
    """Convert one cell to the Python type of its column; raise TypeError/ValueError."""
    if value is None:
        return None
    if name == "groups":  # {group name: {sum name: value}} -> list of structs
        return [{"name": str(g), **{c: None if v.get(c) is None else float(v[c]) for c in GROUP_SUM_COLUMNS}}
                for g, v in value.items()]
    if name in _FLOAT_COLUMNS:
        if isinstance(value, (str, bytes)):
            raise TypeError(f"column {name!r} takes a number, got {value!r}")
        return float(value)
    if name in ("step", "attempt"):
        return operator.index(value)
    if name == "measured":
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"column 'measured' takes a bool, got {value!r}")
        return bool(value)
    if not isinstance(value, str):
        raise TypeError(f"column {name!r} takes a string, got {value!r}")
    if name in CLASS_COLUMNS and value not in CLASS_VALUES:
        raise ValueError(f"column {name!r} takes one of {sorted(CLASS_VALUES)}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------- reading


@dataclass
class _Attempt:
    start_step: int | None
    chunks: list[tuple[int, int, Path]] = field(default_factory=list)  # sorted by name


def _scan(study_dir) -> dict[str, dict[int, _Attempt]]:
    """trial id -> attempt -> committed chunks and start step, from directory names only."""
    trials: dict[str, dict[int, _Attempt]] = {}
    root = layout.steps_dir(Path(study_dir))
    if not root.is_dir():
        return trials
    for tdir in sorted(root.iterdir()):
        if not tdir.is_dir() or not tdir.name.startswith("trial_id="):
            continue
        trial_id = tdir.name[len("trial_id="):]
        try:
            layout.check_name(trial_id, "trial id")
        except ValueError:
            continue
        attempts = trials.setdefault(trial_id, {})
        for adir in tdir.iterdir():
            a = layout.parse_attempt_dir(adir.name)
            if a is None or not adir.is_dir():
                continue
            chunks = []
            for f in adir.iterdir():
                parsed = layout.parse_chunk_name(f.name)
                if parsed is not None and f.is_file():
                    chunks.append((*parsed, f))
            chunks.sort()
            attempts[a] = _Attempt(_read_start(adir, chunks), chunks)
    return trials


def _read_start(adir: Path, chunks) -> int | None:
    """The attempt's start step: ``_START``, else (marker lost) its first committed step."""
    try:
        return int(json.loads((adir / layout.START_FILE).read_text())["start_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return chunks[0][0] if chunks else None


def next_attempt(study_dir, trial_id: str) -> int:
    """1 + the highest attempt number of ``trial_id`` on disk, 0 if it has none."""
    tdir = layout.trial_steps_dir(Path(study_dir), trial_id)
    if not tdir.is_dir():
        return 0
    nums = [layout.parse_attempt_dir(p.name) for p in tdir.iterdir() if p.is_dir()]
    nums = [n for n in nums if n is not None]
    return max(nums) + 1 if nums else 0


def list_chunks(study_dir) -> list[Path]:
    """Every committed chunk of the study, ordered by (trial, attempt, first step)."""
    out = []
    for _, attempts in sorted(_scan(study_dir).items()):
        for _, att in sorted(attempts.items()):
            out.extend(path for _, _, path in att.chunks)
    return out


def _read_chunk(path: Path, trial_id: str, attempt: int, first: int, last: int) -> pa.Table:
    """Read one chunk and check it belongs where it lies; raise ValueError saying why not."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"unreadable: {type(e).__name__}: {e}") from e
    missing = {"trial_id", "attempt", "step"} - set(table.column_names)
    if missing:
        raise ValueError(f"missing columns {sorted(missing)}")
    if table.num_rows == 0:
        return table
    if not pc.all(pc.equal(table["trial_id"], trial_id)).as_py():
        raise ValueError(f"rows of another trial than {trial_id!r}")
    if not pc.all(pc.equal(table["attempt"], attempt)).as_py():
        raise ValueError(f"rows of another attempt than {attempt}")
    bounds = pc.min_max(table["step"])
    lo, hi = bounds["min"].as_py(), bounds["max"].as_py()
    if lo < first or hi > last:
        raise ValueError(f"steps {lo}..{hi} outside the name's range {first}..{last}")
    return table


def check_chunks(study_dir) -> list[tuple[Path, str]]:
    """The committed chunks that cannot be read or do not belong where they lie, with why."""
    bad = []
    for trial_id, attempts in sorted(_scan(study_dir).items()):
        for a, att in sorted(attempts.items()):
            for first, last, path in att.chunks:
                try:
                    _read_chunk(path, trial_id, a, first, last)
                except ValueError as e:
                    bad.append((path, str(e)))
    return bad


def _attempt_rows(trial_id: str, a: int, att: _Attempt, cutoff: int | None) -> pa.Table | None:
    """The surviving rows of one attempt: steps < cutoff, last chunk wins per step."""
    tables = []
    for first, last, path in att.chunks:
        if cutoff is not None and first >= cutoff:
            continue  # wholly replaced by a later attempt: not even read
        try:
            tables.append(_read_chunk(path, trial_id, a, first, last))
        except ValueError as e:
            warnings.warn(f"skipping bad step chunk {path}: {e}", stacklevel=3)
    if not tables:
        return None
    table = pa.concat_tables(tables, promote_options="default")
    if cutoff is not None:
        table = table.filter(pc.less(table["step"], cutoff))
    steps = table["step"].to_numpy()
    # Keep the last occurrence of each step: unique over the reversed order.
    _, first_in_reversed = np.unique(steps[::-1], return_index=True)
    if len(first_in_reversed) < len(steps):
        table = table.take(np.sort(len(steps) - 1 - first_in_reversed))
    return table


def read_steps(study_dir, trial_ids=None) -> pa.Table:
    """All surviving step rows (rules in the module docstring), sorted by (trial_id, step).

    ``trial_ids`` restricts the read to those trials. Bad chunks are skipped with a
    ``warnings.warn`` naming the file. Always has at least the columns of ``STEP_SCHEMA``.
    """
    wanted = None if trial_ids is None else {layout.check_name(t, "trial id") for t in trial_ids}
    tables = [STEP_SCHEMA.empty_table()]
    for trial_id, attempts in sorted(_scan(study_dir).items()):
        if wanted is not None and trial_id not in wanted:
            continue
        for a, att in attempts.items():
            later = [b.start_step for n, b in attempts.items()
                     if n > a and b.start_step is not None]
            table = _attempt_rows(trial_id, a, att, min(later) if later else None)
            if table is not None:
                tables.append(table)
    out = pa.concat_tables(tables, promote_options="default")
    return out.sort_by([("trial_id", "ascending"), ("step", "ascending")])


def steps_sql(study_dir) -> str:
    """A DuckDB query over the raw files that applies rule 2 ("last attempt wins").

    It takes each later attempt's first committed step as its start (``_START`` is not
    Parquet), so it equals ``read_steps`` except while a restarted attempt has not committed
    its first chunk: then the older rows it will replace are still visible.
    """
    glob = str(layout.steps_dir(Path(study_dir)) / "**" / "*.parquet").replace("'", "''")
    return (
        f"WITH rows AS (SELECT * FROM read_parquet('{glob}', hive_partitioning = true, "
        "union_by_name = true)), "
        "starts AS (SELECT trial_id, attempt, min(step) AS start_step FROM rows GROUP BY ALL) "
        "SELECT r.* FROM rows r WHERE NOT EXISTS (SELECT 1 FROM starts s WHERE "
        "s.trial_id = r.trial_id AND s.attempt > r.attempt AND r.step >= s.start_step) "
        "ORDER BY r.trial_id, r.step"
    )
