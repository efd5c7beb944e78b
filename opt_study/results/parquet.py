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
``steps_sql`` gives a DuckDB query that applies rules 2 and 3 (see its docstring for the
nuance). ``compact`` merges a finished trial's chunks, relying on rules 2 and 3 to keep every
intermediate state equivalent.
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

from opt_study.storage import layout
from opt_study.results.schema import STEP_SCHEMA
from opt_study.results.step_cells import rows_table


class StepWriter:
    """Appends the step rows of one attempt of one trial; see the module docstring.

    Rows are dicts keyed by schema columns; nullable columns may be omitted. ``step`` is
    required and strictly increasing, starting at ``start_step`` or later; ``time_unix``
    defaults to the time of ``append``; ``measured`` defaults to False; ``trial_id`` and
    ``attempt`` are filled in (if given they must match).

    Validation is split by cost (``step_cells``). ``append`` raises for a bad step (missing,
    not an integer, out of order) or a foreign ``trial_id`` / ``attempt``. The rest is checked
    a chunk at a time: an unknown column or a bad cell (wrong type; a class outside
    ``CLASS_VALUES``) makes that ``flush`` (or the ``append`` that fills the buffer) raise
    ValueError/TypeError naming the column and the step; that row is dropped, the other
    buffered rows stay for the next flush.

    Chunks are written with snappy compression (fast to write; ``compact`` rewrites a finished
    trial's chunks as one zstd file per attempt). Creating the writer creates the attempt
    directory exclusively (FileExistsError if that attempt already exists: use
    ``next_attempt``) and commits ``_START``.
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
        self._rows: list[dict] = []  # shallow copies of the appended rows
        self._last_step: int | None = None
        self._closed = False

    def append(self, row: dict) -> None:
        """Check and buffer one row; commit a chunk once ``rows_per_chunk`` are buffered."""
        if self._closed:
            raise RuntimeError("StepWriter is closed")
        row = dict(row)  # the caller may reuse its dict
        step = row.get("step")
        if step is None:
            raise ValueError("row needs a 'step'")
        if type(step) is not int:
            try:
                row["step"] = step = operator.index(step)
            except TypeError:
                raise TypeError(f"column 'step' takes an integer, got {step!r}") from None
        floor = self.start_step if self._last_step is None else self._last_step + 1
        if step < floor:
            raise ValueError(f"step {step} out of order: expected >= {floor} "
                             "(steps are strictly increasing from start_step)")
        if row.get("trial_id", self.trial_id) != self.trial_id:
            raise ValueError(f"row trial_id {row['trial_id']!r} != writer's {self.trial_id!r}")
        if row.get("attempt", self.attempt) != self.attempt:
            raise ValueError(f"row attempt {row['attempt']!r} != writer's {self.attempt}")
        if row.get("time_unix") is None:
            row["time_unix"] = time.time()
        self._rows.append(row)
        self._last_step = step
        if len(self._rows) >= self.rows_per_chunk:
            self.flush()

    def flush(self) -> Path | None:
        """Commit the buffered rows as one immutable chunk; return its path (None if empty).

        Temp file in the same directory -> fsync -> ``os.replace`` -> fsync of the
        directory. On failure the buffer is kept, so a later flush can retry (except a row
        with a bad cell, which is dropped: see the class docstring).
        """
        if not self._rows:
            return None
        table = rows_table(self._rows, self.trial_id, self.attempt)
        final = self.dir / layout.chunk_name(self._rows[0]["step"], self._rows[-1]["step"])
        _commit(table, final)
        self._rows = []
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


def _commit(table: pa.Table, path: Path) -> None:
    """Encode ``table`` in memory and commit it as ``path`` with ``layout.atomic_write``, in
    one write call (pyarrow writing to a Python file object calls back into Python per page)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **CHUNK_WRITE_OPTIONS)
    data = sink.getvalue()
    layout.atomic_write(path, lambda f: f.write(data))


# Snappy: about half the cost of zstd for these rows (benchmarks/bench_ingest.py); dictionary
# pages only for the string columns (on float columns they cost time and rarely pay); min/max
# statistics only for the identity columns (what queries filter on; the compacted file has all).
STRING_COLUMNS = [f.name for f in STEP_SCHEMA if pa.types.is_string(f.type)]
CHUNK_WRITE_OPTIONS = {"compression": "snappy", "use_dictionary": STRING_COLUMNS,
                       "write_statistics": ["trial_id", "attempt", "step", "time_unix", "measured"]}


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
        trials[trial_id] = _scan_trial(tdir)
    return trials


def _scan_trial(tdir: Path) -> dict[int, _Attempt]:
    """attempt -> committed chunks and start step of one ``trial_id=<id>`` directory."""
    attempts = {}
    for adir in tdir.iterdir() if tdir.is_dir() else ():
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
    return attempts


def _cutoff(attempts: dict[int, _Attempt], a: int) -> int | None:
    """Rule 2: the first step of attempt ``a`` replaced by a later attempt (None: none is)."""
    later = [b.start_step for n, b in attempts.items() if n > a and b.start_step is not None]
    return min(later) if later else None


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
    return [path for trial_id in trial_ids(study_dir) for path in trial_chunks(study_dir, trial_id)]


def trial_ids(study_dir) -> list[str]:
    """The trials that have a step directory (``steps/trial_id=<id>``), sorted."""
    return sorted(_scan(study_dir))


def trial_chunks(study_dir, trial_id: str) -> list[Path]:
    """The committed chunks of one trial, ordered by (attempt, first step)."""
    attempts = _scan_trial(layout.trial_steps_dir(Path(study_dir), trial_id))
    return [path for _, att in sorted(attempts.items()) for _, _, path in att.chunks]


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


def _attempt_rows(trial_id: str, a: int, att: _Attempt, cutoff: int | None,
                  strict: bool = False) -> pa.Table | None:
    """The surviving rows of one attempt: steps < cutoff, last chunk wins per step.
    A bad chunk is skipped with a warning, or (``strict``) raises ValueError naming it."""
    tables = []
    for first, last, path in att.chunks:
        if cutoff is not None and first >= cutoff:
            continue  # wholly replaced by a later attempt: not even read
        try:
            tables.append(_read_chunk(path, trial_id, a, first, last))
        except ValueError as e:
            if strict:
                raise ValueError(f"bad step chunk {path}: {e}") from None
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
            table = _attempt_rows(trial_id, a, att, _cutoff(attempts, a))
            if table is not None:
                tables.append(table)
    out = pa.concat_tables(tables, promote_options="default")
    return out.sort_by([("trial_id", "ascending"), ("step", "ascending")])


def steps_sql(study_dir) -> str:
    """A DuckDB query over the raw files that applies rules 2 ("last attempt wins") and 3
    (within an attempt, the last chunk by name wins: a compaction in progress, ``compact``).

    It takes each later attempt's first committed step as its start (``_START`` is not
    Parquet), so it equals ``read_steps`` except while a restarted attempt has not committed
    its first chunk: then the older rows it will replace are still visible. The file's own
    ``trial_id`` and ``attempt`` columns win over the Hive partition values.
    """
    glob = str(layout.steps_dir(Path(study_dir)) / "**" / "*.parquet").replace("'", "''")
    return (
        f"WITH rows AS (SELECT * FROM read_parquet('{glob}', hive_partitioning = true, "
        "union_by_name = true, filename = '_chunk_file')), "
        "starts AS (SELECT trial_id, attempt, min(step) AS start_step FROM rows GROUP BY ALL) "
        "SELECT r.* EXCLUDE (_chunk_file) FROM rows r WHERE NOT EXISTS (SELECT 1 FROM starts s "
        "WHERE s.trial_id = r.trial_id AND s.attempt > r.attempt AND r.step >= s.start_step) "
        "QUALIFY row_number() OVER (PARTITION BY r.trial_id, r.step "
        "ORDER BY r._chunk_file DESC) = 1 "
        "ORDER BY r.trial_id, r.step"
    )
