"""Compaction: a finished trial's chunks rewritten as one file per attempt.

A trial commits a chunk at every evaluation boundary and every ``rows_per_chunk`` rows, so a
long trial leaves hundreds of small files; a query pays per file (footer, open, row-group
setup), about 1.5x the time for the same rows in 10x the files (benchmarks/RESULTS.md). Call
``compact_trial`` once a trial has ended (its writer closed) and ``compact_study`` on an
existing study.

For each attempt of the trial, in ascending order, the rows that survive the reading rules of
``scan`` (steps below the start of every later attempt; the last chunk by name wins a
step) are written as one zstd chunk ``part-<first>-<last>.parquet`` in the same attempt
directory; then the attempt's other chunks are removed; last, the attempts left without a
surviving row (wholly replaced by a later restart) are removed, except the last attempt.
Rows stay in their attempt's directory, so their ``attempt`` column still says which run of
the trial produced them, and a trial restarted k times keeps one file per attempt that has
rows.

Safe at every instant, for ``read_steps``, the ``steps`` view of ``query`` and
``parquet.steps_sql`` alike (``tests/unit/test_compact.py`` checks each intermediate state):

- while both the new file and the old chunks exist, a step is in two chunks of one attempt
  with the same values, and rule 3 keeps one of them;
- a removed old chunk holds only rows that are in the new file or replaced by a later
  attempt (rule 2);
- an attempt directory is removed only after every earlier attempt has been cut below that
  attempt's start, so no replaced row comes back when its ``_START`` goes;
- a chunk is written to a hidden temp name and renamed (``layout.atomic_write``); a killed
  compaction leaves at worst a hidden temp file (never read) and duplicates, and rerunning it
  finishes the job. A compacted trial is left untouched (idempotent).

Files are written through ``layout.atomic_write`` and removed through ``layout.remove_tree``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from opt_study.results import parquet, scan
from opt_study.storage import layout

# zstd: the compacted file is written once and read by every query; string columns only get
# dictionary pages (as the live chunks, parquet.CHUNK_WRITE_OPTIONS).
COMPACT_WRITE_OPTIONS = {"compression": "zstd", "use_dictionary": parquet.STRING_COLUMNS}


def compaction_steps(study_dir, trial_id: str) -> Iterator[tuple[str, Path]]:
    """Compact one trial (module docstring), yielding ``("write" | "remove", path)`` after
    each change on disk. Stopping the iteration early is what a killed compaction leaves.

    Raises ValueError naming the chunk if one of the trial's chunks that must be read is
    unreadable or misplaced (``parquet.check_chunks``); nothing is changed then.
    """
    study_dir = Path(study_dir)
    attempts = scan.scan_trial(study_dir, trial_id).attempts
    # Read (and check) every attempt first, so a bad chunk stops the compaction before a change.
    plans = {att.number: _plan_attempt(att) for att in attempts}
    written = {}
    for a, (rows, _) in plans.items():
        if rows is not None:
            steps = rows["step"]
            path = layout.attempt_dir(study_dir, trial_id, a) / layout.chunk_name(steps[0].as_py(), steps[-1].as_py())
            layout.atomic_write(path, _encoder(rows))
            written[a] = path
            yield "write", path
    for a, path in written.items():  # rule 3 hides the duplicates, rule 2 the replaced rows
        for old in plans[a][1]:
            if old != path:
                layout.remove_tree(old)
                yield "remove", old
    for a, (rows, old) in plans.items():  # every earlier attempt is already cut below its start
        if rows is None and old is not None and a != attempts[-1].number:
            adir = layout.attempt_dir(study_dir, trial_id, a)
            layout.remove_tree(adir)
            yield "remove", adir


def compact_trial(study_dir, trial_id: str) -> list[Path]:
    """Compact one trial's chunks (module docstring); return its chunk files afterwards, one
    per attempt that has surviving rows (``[]`` if it has none). Idempotent; safe to rerun
    after a crash. Raises ValueError (changing nothing) if a chunk it must read is bad."""
    for _ in compaction_steps(study_dir, trial_id):
        pass
    return parquet.trial_chunks(study_dir, trial_id)


def compact_study(study_dir) -> dict[str, list[Path]]:
    """``compact_trial`` for every trial with step rows; trial id -> its chunk files. A trial
    with a bad chunk is left as it is, with a warning naming the chunk."""
    out = {}
    for trial_id in parquet.trial_ids(study_dir):
        try:
            out[trial_id] = compact_trial(study_dir, trial_id)
        except ValueError as e:
            warnings.warn(f"not compacting trial {trial_id!r}: {e}", stacklevel=2)
    return out


def _encoder(table):
    """``atomic_write``'s callback writing ``table`` as the compacted Parquet file."""
    return lambda f: pq.write_table(table, f, **COMPACT_WRITE_OPTIONS)


def _plan_attempt(att: scan.Attempt) -> tuple:
    """(rows to write as the attempt's one chunk, chunks to remove once written), or
    (None, None) for an attempt that is compact already (one chunk, none of its rows
    replaced), or (None, its chunks) for one without a surviving row."""
    if len(att.chunks) == 1 and not att.chunks[0].cut:
        return None, None
    rows = parquet.attempt_rows(att, strict=True)
    old = [c.path for c in att.chunks]
    if rows is None or rows.num_rows == 0:
        return None, old
    return rows.sort_by("step"), old
