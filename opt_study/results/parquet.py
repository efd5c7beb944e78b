"""Exactly-once per-step rows: an append-only chunk writer and a "last attempt wins" reader.

Writing. A trial's ``StepWriter`` buffers rows and commits them as immutable chunks
``steps/trial_id=<id>/attempt=<a>/part-<first>-<last>.parquet`` (see ``layout``): each chunk
is written under a hidden temporary name in its final directory, fsynced, then renamed, so a
chunk is either wholly visible or absent. A restarted trial never edits old files: it opens
a new attempt (``next_attempt``) that records its ``start_step`` (the checkpoint it resumed
from) in ``_START`` before its first row.

Reading (``read_steps``) applies the "last attempt wins" rules of ``opt_study.results.scan``
(the one place they are decided, shared with the DuckDB views and compaction): a restart from
step s replaces steps >= s of every earlier attempt (``_START`` marks where it began), within
an attempt the last chunk by name wins a step, and a corrupt or misplaced chunk is skipped with
a warning (``check_chunks`` lists them). They need only committed names and the ``_START``
markers, so they hold even where rename is not atomic (object stores).

So every (trial, step) appears exactly once, whatever was lost or replayed around a crash,
provided the trial loop calls ``flush()`` whenever it saves a checkpoint (rows buffered
after the last flush are lost with the process, and the resumed attempt rewrites them).

The files are plain Parquet: ``pyarrow.dataset`` and DuckDB read them directly;
``steps_sql`` gives the DuckDB query of ``read_steps``'s rows. ``compact`` merges a finished
trial's chunks, relying on the same rules to keep every intermediate state equivalent.
"""

from __future__ import annotations

import json
import operator
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from opt_study.results import scan
from opt_study.results.schema import STEP_SCHEMA
from opt_study.results.step_cells import rows_table
from opt_study.storage import layout


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

    def __init__(self, study_dir, trial_id: str, attempt: int, start_step: int, rows_per_chunk: int = 1000):
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
            raise ValueError(
                f"step {step} out of order: expected >= {floor} (steps are strictly increasing from start_step)"
            )
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
CHUNK_WRITE_OPTIONS = {
    "compression": "snappy",
    "use_dictionary": STRING_COLUMNS,
    "write_statistics": ["trial_id", "attempt", "step", "time_unix", "measured"],
}


# ---------------------------------------------------------------------------------- reading


def next_attempt(study_dir, trial_id: str) -> int:
    """1 + the highest attempt number of ``trial_id`` on disk, 0 if it has none."""
    attempts = scan.scan_trial(study_dir, trial_id).attempts
    return attempts[-1].number + 1 if attempts else 0


def list_chunks(study_dir) -> list[Path]:
    """Every committed chunk of the study, ordered by (trial, attempt, first step)."""
    return [c.path for trial in scan.scan_study(study_dir) for c in trial.chunks]


def trial_ids(study_dir) -> list[str]:
    """The trials that have a step directory (``steps/trial_id=<id>``), sorted."""
    return [trial.trial_id for trial in scan.scan_study(study_dir)]


def trial_chunks(study_dir, trial_id: str) -> list[Path]:
    """The committed chunks of one trial, ordered by (attempt, first step)."""
    return [c.path for c in scan.scan_trial(study_dir, trial_id).chunks]


def read_chunk(chunk: scan.Chunk) -> pa.Table:
    """Read one chunk and check it belongs where it lies; raise ValueError saying why not."""
    try:
        table = pq.read_table(chunk.path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"unreadable: {type(e).__name__}: {e}") from e
    missing = {"trial_id", "attempt", "step"} - set(table.column_names)
    if missing:
        raise ValueError(f"missing columns {sorted(missing)}")
    if table.num_rows == 0:
        return table
    if not pc.all(pc.equal(table["trial_id"], chunk.trial_id)).as_py():
        raise ValueError(f"rows of another trial than {chunk.trial_id!r}")
    if not pc.all(pc.equal(table["attempt"], chunk.attempt)).as_py():
        raise ValueError(f"rows of another attempt than {chunk.attempt}")
    bounds = pc.min_max(table["step"])
    lo, hi = bounds["min"].as_py(), bounds["max"].as_py()
    if lo < chunk.first or hi > chunk.last:
        raise ValueError(f"steps {lo}..{hi} outside the name's range {chunk.first}..{chunk.last}")
    return table


def check_chunks(study_dir) -> list[tuple[Path, str]]:
    """The committed chunks that cannot be read or do not belong where they lie, with why."""
    bad = []
    for trial in scan.scan_study(study_dir):
        for chunk in trial.chunks:
            try:
                read_chunk(chunk)
            except ValueError as e:
                bad.append((chunk.path, str(e)))
    return bad


def attempt_rows(attempt: scan.Attempt, strict: bool = False) -> pa.Table | None:
    """The surviving rows of one attempt (``scan`` rules 2-4): its live chunks, steps below
    its cutoff, the last chunk by name per step. A bad chunk is skipped with a warning, or
    (``strict``) raises ValueError naming it. None if no live chunk could be read."""
    tables = []
    for chunk in attempt.live:
        try:
            tables.append(read_chunk(chunk))
        except ValueError as e:
            if strict:
                raise ValueError(f"bad step chunk {chunk.path}: {e}") from None
            warnings.warn(f"skipping bad step chunk {chunk.path}: {e}", stacklevel=3)
    if not tables:
        return None
    table = pa.concat_tables(tables, promote_options="default")
    if attempt.cutoff is not None:
        table = table.filter(pc.less(table["step"], attempt.cutoff))
    steps = table["step"].to_numpy()
    # Keep the last occurrence of each step: unique over the reversed order.
    _, first_in_reversed = np.unique(steps[::-1], return_index=True)
    if len(first_in_reversed) < len(steps):
        table = table.take(np.sort(len(steps) - 1 - first_in_reversed))
    return table


def read_steps(study_dir, trial_ids=None) -> pa.Table:
    """All surviving step rows (``scan``'s rules), sorted by (trial_id, step).

    ``trial_ids`` restricts the read to those trials. Bad chunks are skipped with a
    ``warnings.warn`` naming the file. Always has at least the columns of ``STEP_SCHEMA``.
    """
    tables = [STEP_SCHEMA.empty_table()]
    for trial in scan.scan_study(study_dir, trial_ids):
        for attempt in trial.attempts:
            table = attempt_rows(attempt)
            if table is not None:
                tables.append(table)
    out = pa.concat_tables(tables, promote_options="default")
    return out.sort_by([("trial_id", "ascending"), ("step", "ascending")])


def steps_sql(study_dir) -> str:
    """A DuckDB query of ``read_steps``'s rows for use outside ``query.StudyDB``: the study's
    live chunks read within ``scan``'s bounds (``scan.select_sql``), sorted by (trial_id, step).
    The chunk list is fixed when it is called. It trusts the files' contents: a corrupt chunk
    makes DuckDB fail, and a misplaced one is read (``check_chunks`` finds both). Raises
    ValueError for a study without a chunk."""
    chunks = [c for trial in scan.scan_study(study_dir) for c in trial.live]
    return f"SELECT * FROM ({scan.select_sql(chunks)}) ORDER BY trial_id, step"
