"""The one "last attempt wins" scan: which committed chunks of a study hold surviving rows.

A trial runs one or more attempts (restarts from a checkpoint). Each attempt commits chunks
``steps/trial_id=<id>/attempt=<a>/part-<first>-<last>.parquet`` and, before its first row, a
``_START`` marker holding its start step (``opt_study.storage.layout``). Every reader
(``parquet.read_steps``, the ``steps`` view of ``query``, ``parquet.steps_sql``) and compaction
(``compact``) take these rules from here:

1. hidden and temporary files are not chunks (``layout.parse_chunk_name``);
2. attempt ``a`` keeps its rows only below the start step of every later attempt of the same
   trial (its ``cutoff``): a restart from step s replaces steps >= s. An attempt's start step
   is its ``_START``, else (marker lost) its first committed step;
3. within one attempt, a step present in two chunks keeps the row of the last chunk by name
   (a compaction in progress leaves such duplicates; names are zero-padded, so they sort by step);
4. a corrupt or misplaced chunk is skipped with a warning when its rows are read
   (``parquet.read_chunk`` says why).

Rules 1-3 need names and ``_START`` only, so they hold on object stores too (no atomic rename
needed). ``list_trial`` reads one trial's directory; ``resolve`` (pure) turns that listing into
each attempt's chunks and cutoff; ``select_sql`` (pure) writes the DuckDB query that reads
exactly the live chunks, each within its bounds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from opt_study.storage import layout

# attempt -> (_START's start step or None, committed chunks as (first, last, path))
Listing = dict[int, tuple[int | None, list[tuple[int, int, Path]]]]


@dataclass(frozen=True)
class Chunk:
    """A committed chunk of attempt ``attempt`` of ``trial_id`` holding steps ``first..last``
    (by its name). Its rows at step ``cutoff`` and later are replaced by a later attempt
    (None: none are)."""

    path: Path
    trial_id: str
    attempt: int
    first: int
    last: int
    cutoff: int | None

    @property
    def live(self) -> bool:
        """It may hold a surviving row (it is not wholly replaced by a later attempt)."""
        return self.cutoff is None or self.first < self.cutoff

    @property
    def cut(self) -> bool:
        """Some of its steps are replaced: a reader must drop its rows from ``cutoff`` on."""
        return self.cutoff is not None and self.last >= self.cutoff


@dataclass(frozen=True)
class Attempt:
    number: int
    start_step: int | None  # None: neither a _START nor a committed chunk
    cutoff: int | None  # the first step a later attempt replaces; None: none
    chunks: tuple[Chunk, ...]  # every committed chunk, sorted by name

    @property
    def live(self) -> tuple[Chunk, ...]:
        """The chunks that may hold surviving rows (the others are not even read)."""
        return tuple(c for c in self.chunks if c.live)


@dataclass(frozen=True)
class Trial:
    trial_id: str
    attempts: tuple[Attempt, ...]  # ascending attempt numbers

    @property
    def chunks(self) -> list[Chunk]:
        """Every committed chunk, by (attempt, name)."""
        return [c for a in self.attempts for c in a.chunks]

    @property
    def live(self) -> list[Chunk]:
        return [c for a in self.attempts for c in a.live]


# ------------------------------------------------------------------------- reading the names


def list_trial(tdir: Path) -> Listing:
    """The listing of one ``trial_id=<id>`` directory: its attempt directories, each with the
    start step of its ``_START`` (None if absent or unreadable) and its committed chunks."""
    listing: Listing = {}
    for adir in tdir.iterdir() if tdir.is_dir() else ():
        a = layout.parse_attempt_dir(adir.name)
        if a is None or not adir.is_dir():
            continue
        chunks = [
            (*parsed, f)
            for f in adir.iterdir()
            if (parsed := layout.parse_chunk_name(f.name)) is not None and f.is_file()
        ]
        listing[a] = (_read_start(adir), chunks)
    return listing


def _read_start(adir: Path) -> int | None:
    try:
        return int(json.loads((adir / layout.START_FILE).read_text())["start_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def scan_trial(study_dir, trial_id: str) -> Trial:
    """The resolved chunks of one trial (no attempts if it has no step directory)."""
    return resolve(trial_id, list_trial(layout.trial_steps_dir(Path(study_dir), trial_id)))


def scan_study(study_dir, trial_ids: Iterable[str] | None = None) -> list[Trial]:
    """The resolved chunks of every trial with a step directory (or of ``trial_ids`` only; a
    name that is not a safe trial id raises ValueError), sorted by trial id."""
    if trial_ids is not None:
        wanted = sorted({layout.check_name(t, "trial id") for t in trial_ids})
        return [scan_trial(study_dir, t) for t in wanted]
    root = layout.steps_dir(Path(study_dir))
    if not root.is_dir():
        return []
    found = {t: d for d in root.iterdir() if (t := layout.parse_trial_dir(d.name)) is not None and d.is_dir()}
    return [resolve(t, list_trial(found[t])) for t in sorted(found)]


# ------------------------------------------------------------------------------ the rules


def resolve(trial_id: str, listing: Listing) -> Trial:
    """Rules 1-3 applied to one trial's listing: each attempt's start step (``_START``, else
    its first committed step), its cutoff (the lowest start of a later attempt) and its chunks
    sorted by name. Pure: no I/O."""
    sorted_chunks = {a: sorted(chunks) for a, (_, chunks) in listing.items()}
    starts = {
        a: start if start is not None else (sorted_chunks[a][0][0] if sorted_chunks[a] else None)
        for a, (start, _) in listing.items()
    }
    attempts = []
    for a in sorted(listing):
        later = [s for b, s in starts.items() if b > a and s is not None]
        cutoff = min(later) if later else None
        chunks = tuple(Chunk(path, trial_id, a, first, last, cutoff) for first, last, path in sorted_chunks[a])
        attempts.append(Attempt(a, starts[a], cutoff, chunks))
    return Trial(trial_id, tuple(attempts))


def overlapping(chunks: Iterable[Chunk]) -> bool:
    """Rule 3 has work to do: two of these chunks of one attempt share a step (by name)."""
    ordered = sorted(chunks, key=lambda c: (c.trial_id, c.attempt, c.first, c.last))
    return any(
        (cur.trial_id, cur.attempt) == (nxt.trial_id, nxt.attempt) and nxt.first <= cur.last
        for cur, nxt in zip(ordered, ordered[1:])
    )


def select_sql(chunks: Sequence[Chunk], union_by_name: bool = True) -> str:
    """A DuckDB ``SELECT`` of the surviving rows of ``chunks`` (live chunks of a scan), read
    in the given order; the columns are the files' own. Pure: no I/O.

    Rule 2 drops the rows of a cut chunk from its cutoff on (the few cut files are listed
    inline), rule 3 keeps the last chunk by name per (trial, step); each clause appears only
    when needed, so a study without restarts or duplicates is a plain scan into which DuckDB
    pushes filters and projections. ``hive_partitioning`` is off: the files carry ``trial_id``
    and ``attempt`` themselves, and a partition value like "trial_id=007" must not be re-typed
    as an integer. ``union_by_name`` false: DuckDB takes the first file's columns (see
    ``query.StudyDB``). Raises ValueError for no chunks (DuckDB cannot read an empty list).
    """
    if not chunks:
        raise ValueError("no step chunk to read")
    files = "[" + ", ".join(_sql_str(str(c.path)) for c in chunks) + "]"
    sql = (
        f"SELECT * EXCLUDE (filename) FROM read_parquet({files}, hive_partitioning = false, "
        f"union_by_name = {str(union_by_name).lower()}, filename = true) r"
    )
    cut = [c for c in chunks if c.cut]
    if cut:
        bounds = ", ".join(f"({_sql_str(str(c.path))}, {int(c.cutoff)})" for c in cut)
        sql += (
            f" WHERE NOT EXISTS (SELECT 1 FROM (VALUES {bounds}) AS b(filename, cutoff) "
            "WHERE b.filename = r.filename AND r.step >= b.cutoff)"
        )
    if overlapping(chunks):
        sql += " QUALIFY row_number() OVER (PARTITION BY r.trial_id, r.step ORDER BY r.filename DESC) = 1"
    return sql


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"
