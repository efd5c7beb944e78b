"""Where a study's results live on disk, and which names may appear in those paths.

Layout under ``<storage_root>/<study>/`` (the *study dir*)::

    steps/                                      Hive-partitioned per-step dataset
      trial_id=<id>/
        attempt=<a>/                            one directory per (re)start of the trial
          _START                                json {"start_step": s}, written atomically
                                                when the attempt starts
          part-<first>-<last>.parquet           a chunk of rows, steps first..last, never edited
                                                (compaction replaces chunks by one new file)
                                                (zero-padded so names sort by step)
          .part-....tmp-<pid>-<rand>            a chunk being written: never read
    trials/<trial_id>.json                      one record per trial (written atomically)
    trials.parquet                              snapshot of all trial records

Files whose names start with ``.`` or ``_`` are not data: readers skip them, as Hive,
Spark, pyarrow.dataset and DuckDB do. Every file is written to a hidden temporary name in its
final directory, fsynced and renamed, so a reader sees either nothing or a whole file.

Names used in paths (study names, trial ids) are restricted to a safe alphabet so that a
hostile config cannot escape the storage root or collide with the partition syntax.
"""

from __future__ import annotations

import os
import shutil
import re
from pathlib import Path

from opt_study.storage import objectstore
from opt_study.storage.names import check_name


STEPS_DIR = "steps"
TRIALS_DIR = "trials"
TRIALS_TABLE = "trials.parquet"
START_FILE = "_START"
_CHUNK_RE = re.compile(r"^part-(\d+)-(\d+)\.parquet$")
_ATTEMPT_RE = re.compile(r"^attempt=(\d+)$")
# Width of the zero-padded step numbers in chunk names: sorts correctly up to 10**12 steps.
_STEP_DIGITS = 12


def study_dir(storage_root: str | Path, study: str) -> Path:
    """The directory of study ``study`` under ``storage_root`` (not created).

    Raises ValueError if the name is unsafe or if the resolved path would leave the resolved
    root (e.g. through a symlink named like the study).
    """
    check_name(study, "study name")
    root = Path(storage_root).resolve()
    path = (root / study).resolve()
    if path.parent != root:
        raise ValueError(f"study dir {path} is not directly inside storage root {root}")
    return path


def steps_dir(study: Path) -> Path:
    """The root of the per-step Hive dataset of a study dir."""
    return Path(study) / STEPS_DIR


def trial_steps_dir(study: Path, trial_id: str) -> Path:
    """``steps/trial_id=<id>``: the attempts of one trial."""
    return steps_dir(study) / f"trial_id={check_name(trial_id, 'trial id')}"


def attempt_dir(study: Path, trial_id: str, attempt: int) -> Path:
    """``steps/trial_id=<id>/attempt=<a>``: the chunks of one attempt."""
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 0:
        raise ValueError(f"attempt must be an int >= 0, got {attempt!r}")
    return trial_steps_dir(study, trial_id) / f"attempt={attempt}"


def parse_attempt_dir(name: str) -> int | None:
    """The attempt number of a directory named ``attempt=<a>``, else None."""
    m = _ATTEMPT_RE.match(name)
    return int(m.group(1)) if m else None


def chunk_name(first: int, last: int) -> str:
    """The committed file name of a chunk holding steps ``first..last``."""
    return f"part-{first:0{_STEP_DIGITS}d}-{last:0{_STEP_DIGITS}d}.parquet"


def parse_chunk_name(name: str) -> tuple[int, int] | None:
    """``(first, last)`` of a committed chunk name; None for anything else (temp, hidden)."""
    m = _CHUNK_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def trial_record_path(study: Path, trial_id: str) -> Path:
    """``trials/<trial_id>.json``."""
    return Path(study) / TRIALS_DIR / f"{check_name(trial_id, 'trial id')}.json"


def trials_table_path(study: Path) -> Path:
    """``trials.parquet``."""
    return Path(study) / TRIALS_TABLE


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename inside it survives a crash (no-op where the OS
    cannot open directories, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Create or replace ``path`` atomically: ``write(f)`` fills a hidden temp file in the
    same directory, which is fsynced and renamed over ``path``; then the directory is
    fsynced. Readers see the old file or the new one, never a part. Creates the parent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    objectstore.after_write(path)  # an object-store root: upload the committed file


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """``atomic_write`` of a bytes payload."""
    atomic_write(path, lambda f: f.write(data))


def temp_path(path: Path) -> Path:
    """A hidden, unique temporary name next to ``path`` (same directory, so that the final
    ``os.replace`` is a rename within one file system)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")


def remove_tree(path: Path) -> None:
    """Delete a file or a directory tree under a study dir (missing is fine). Every deletion of
    stored results goes through here, so a mirrored object-store root (``opt_study.storage.objectstore``)
    deletes the same objects."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    objectstore.after_remove(path)


# ------------------------------------------------------------- the rest of a study folder
CONTROL_DIR = "control"


def stop_path(study: Path, trial_id: str) -> Path:
    """``control/<trial_id>.stop``: the file through which the driver asks a trial to stop."""
    return Path(study) / CONTROL_DIR / f"{check_name(trial_id, 'trial id')}.stop"
