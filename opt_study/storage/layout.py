"""Every path of a study folder, the rule for names used in them, and atomic writes.

Layout under ``<storage_root>/<study>/`` (the *study dir*). Each path below is built by one
function here, which the modules that read or write it call; the files inside ``checkpoints/``
(DeepSpeed's), a snapshot (``meta.json``, ``COMMITTED``) and ``mlflow_queue/`` are named by the
module that owns them::

    spec.yaml                                   the YAML the study was started from (provenance)
    plan.json                                   every planned trial: id, label, optimizer,
                                                hyperparameters, seed, index
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
    trials/<trial_id>.error.txt                 a failed trial's tracebacks (0600)
    trials.parquet                              snapshot of all trial records
    control/<trial_id>.stop                     the driver asks a running trial to stop
    .run.lock                                   held by the one run/resume of the study
    checkpoints/<trial_id>/                     DeepSpeed checkpoints (opt_study.trial.checkpoint)
      step-<s>/..., step-<s>/COMMITTED          a tag counts once its marker (file digests) is
                                                written; removed once the driver recorded the
                                                trial finished
    snapshots/<trial_id>/step-<s>/              fp32 parameter snapshots for checkpoint replay
      rank-<r>-of-<W>.pt, meta.json, COMMITTED  (opt_study.trial.snapshots)
    replay/trial_id=<id>/reference=<ref>.parquet  checkpoint-replay rows (results.replay_store)
    mlflow_queue/                               MLflow writes not yet delivered
      <seq>-<kind>-<key>.json, failed/, .lock   (opt_study.results.mlflow_queue)
    report/index.html, <figure>.png             the default output of ``opt-study report``
    ray/run-<i>/, ray/train/<trial_id>/         Ray Tune's and Ray Train's own experiment state

Beside the study dirs, ``<storage_root>/mlflow.db`` and ``mlartifacts/`` are the default MLflow
store of every study under that root.

Files whose names start with ``.`` or ``_`` are not data: readers skip them, as Hive,
Spark, pyarrow.dataset and DuckDB do. Every file is written to a hidden temporary name in its
final directory, fsynced and renamed, so a reader sees either nothing or a whole file.

Names used in paths (study names, trial ids) are restricted to a safe alphabet so that a
hostile config cannot escape the storage root or collide with the partition syntax. The path
functions do no I/O except ``study_dir`` (which resolves symlinks) and the write helpers.
"""

from __future__ import annotations

import operator
import os
import re
import shutil
from pathlib import Path

from opt_study.storage import objectstore
from opt_study.storage.names import check_name, is_safe_name

SPEC_FILE = "spec.yaml"
PLAN_FILE = "plan.json"
STEPS_DIR = "steps"
TRIALS_DIR = "trials"
TRIALS_TABLE = "trials.parquet"
START_FILE = "_START"
CONTROL_DIR = "control"
CHECKPOINTS_DIR = "checkpoints"
SNAPSHOTS_DIR = "snapshots"
REPLAY_DIR = "replay"
MLFLOW_QUEUE_DIR = "mlflow_queue"
REPORT_DIR = "report"
RAY_DIR = "ray"
RUN_LOCK = ".run.lock"
_TRIAL_PREFIX = "trial_id="
# fullmatch with ASCII digits: `$` accepts a trailing newline, `\d` Arabic-Indic digits
_CHUNK_RE = re.compile(r"part-([0-9]+)-([0-9]+)\.parquet")
_ATTEMPT_RE = re.compile(r"attempt=([0-9]+)")
_SNAPSHOT_STEP_RE = re.compile(r"step-([0-9]+)")
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


def spec_path(study: Path) -> Path:
    """``spec.yaml``: the exact YAML the study was started from."""
    return Path(study) / SPEC_FILE


def plan_path(study: Path) -> Path:
    """``plan.json``: the planned trials."""
    return Path(study) / PLAN_FILE


def trial_steps_dir(study: Path, trial_id: str) -> Path:
    """``steps/trial_id=<id>``: the attempts of one trial."""
    return steps_dir(study) / f"{_TRIAL_PREFIX}{check_name(trial_id, 'trial id')}"


def parse_trial_dir(name: str) -> str | None:
    """The trial id of a directory named ``trial_id=<id>``; None for anything else, including
    an id that is not a safe name (such a directory is not data)."""
    if not name.startswith(_TRIAL_PREFIX):
        return None
    trial_id = name[len(_TRIAL_PREFIX) :]
    return trial_id if is_safe_name(trial_id) else None


def attempt_dir(study: Path, trial_id: str, attempt: int) -> Path:
    """``steps/trial_id=<id>/attempt=<a>``: the chunks of one attempt."""
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 0:
        raise ValueError(f"attempt must be an int >= 0, got {attempt!r}")
    return trial_steps_dir(study, trial_id) / f"attempt={attempt}"


def parse_attempt_dir(name: str) -> int | None:
    """The attempt number of a directory named ``attempt=<a>``, else None."""
    m = _ATTEMPT_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def chunk_name(first: int, last: int) -> str:
    """The committed file name of a chunk holding steps ``first..last``."""
    return f"part-{first:0{_STEP_DIGITS}d}-{last:0{_STEP_DIGITS}d}.parquet"


def parse_chunk_name(name: str) -> tuple[int, int] | None:
    """``(first, last)`` of a committed chunk name; None for anything else (temp, hidden)."""
    m = _CHUNK_RE.fullmatch(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def trials_dir(study: Path) -> Path:
    """``trials/``: one record per trial."""
    return Path(study) / TRIALS_DIR


def trial_record_path(study: Path, trial_id: str) -> Path:
    """``trials/<trial_id>.json``."""
    return trials_dir(study) / f"{check_name(trial_id, 'trial id')}.json"


def trial_error_path(study: Path, trial_id: str) -> Path:
    """``trials/<trial_id>.error.txt``: a failed trial's tracebacks, kept with the study
    (Ray's copy lives in its session folder, which is temporary)."""
    return trials_dir(study) / f"{check_name(trial_id, 'trial id')}.error.txt"


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


def atomic_write(path: Path, write, mode: int | None = None) -> None:
    """Create or replace ``path`` atomically: ``write(f)`` fills a hidden temp file in the
    same directory, which is fsynced and renamed over ``path``; then the directory is
    fsynced. Readers see the old file or the new one, never a part. Creates the parent.
    ``mode``: the file's permissions, set before it has any content (0o600: owner only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    objectstore.after_write(path)  # an object-store root: upload the committed file


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """``atomic_write`` of a bytes payload."""
    atomic_write(path, lambda f: f.write(data), mode)


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
def stop_path(study: Path, trial_id: str) -> Path:
    """``control/<trial_id>.stop``: the file through which the driver asks a trial to stop."""
    return Path(study) / CONTROL_DIR / f"{check_name(trial_id, 'trial id')}.stop"


def run_lock_path(study: Path) -> Path:
    """``.run.lock``: held (fcntl) by the one ``opt-study run``/``resume`` of the study; it names
    its holder (opt_study.storage.runlock). Hidden: not data."""
    return Path(study) / RUN_LOCK


def checkpoint_dir(study: Path, trial_id: str) -> Path:
    """``checkpoints/<trial_id>``: DeepSpeed's checkpoint folder of one trial (its tags
    ``step-<s>/`` and ``latest`` are DeepSpeed's names)."""
    return Path(study) / CHECKPOINTS_DIR / check_name(trial_id, "trial id")


def snapshots_dir(study: Path) -> Path:
    """``snapshots/``: every trial's parameter snapshots."""
    return Path(study) / SNAPSHOTS_DIR


def snapshot_trial_dir(study: Path, trial_id: str) -> Path:
    """``snapshots/<trial_id>``."""
    return snapshots_dir(study) / check_name(trial_id, "trial id")


def snapshot_step_dir(study: Path, trial_id: str, step: int) -> Path:
    """``snapshots/<trial_id>/step-<s>``: one snapshot (rank files, meta.json, COMMITTED)."""
    return snapshot_trial_dir(study, trial_id) / f"step-{_count(step, 'step')}"


def parse_snapshot_step_dir(name: str) -> int | None:
    """The step of a directory named ``step-<s>``, else None."""
    m = _SNAPSHOT_STEP_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def snapshot_rank_file(study: Path, trial_id: str, step: int, rank: int, world: int) -> Path:
    """``snapshots/<trial_id>/step-<s>/rank-<r>-of-<W>.pt``: one rank's fragments."""
    return snapshot_step_dir(study, trial_id, step) / f"rank-{_count(rank, 'rank')}-of-{_count(world, 'world')}.pt"


def replay_dir(study: Path) -> Path:
    """``replay/``: the checkpoint-replay dataset."""
    return Path(study) / REPLAY_DIR


def replay_trial_dir(study: Path, trial_id: str) -> Path:
    """``replay/trial_id=<id>``."""
    return replay_dir(study) / f"{_TRIAL_PREFIX}{check_name(trial_id, 'trial id')}"


REPLAY_OBJECTIVES = ("eval", "train")  # F of a replay: the held-out set, or each snapshot's training batch


def replay_path(study: Path, trial_id: str, reference: str, objective: str = "eval") -> Path:
    """``replay/trial_id=<id>/reference=<ref>.parquet`` (the evaluation objective) or
    ``reference=<ref>.objective=train.parquet``: one (trial, reference, objective) replay file."""
    return replay_trial_dir(study, trial_id) / replay_file_name(reference, objective)


def replay_file_name(reference: str, objective: str = "eval") -> str:
    suffix = "" if check_objective(objective) == "eval" else f".objective={objective}"
    return f"reference={check_reference(reference)}{suffix}.parquet"


def check_objective(objective: str) -> str:
    if objective in REPLAY_OBJECTIVES:
        return objective
    raise ValueError(f"objective must be eval or train, got {objective!r}")


def check_reference(reference: str) -> str:
    """ "final", "init" or a non-negative step number, as a string (a replay reference, which
    becomes part of a file name)."""
    if reference in ("final", "init") or (isinstance(reference, str) and reference.isdigit() and reference.isascii()):
        return reference
    raise ValueError(f"reference must be final, init or a snapshot step, got {reference!r}")


def mlflow_queue_dir(study: Path) -> Path:
    """``mlflow_queue/``: the MLflow writes not delivered yet."""
    return Path(study) / MLFLOW_QUEUE_DIR


def report_dir(study: Path) -> Path:
    """``report/``: the default folder of ``opt-study report`` (index.html and its figures)."""
    return Path(study) / REPORT_DIR


def ray_dir(study: Path) -> Path:
    """``ray/``: Ray Tune's experiment state, one ``run-<i>`` per batch of trials."""
    return Path(study) / RAY_DIR


def ray_train_dir(study: Path) -> Path:
    """``ray/train/``: Ray Train's state of the trials that run as worker groups."""
    return ray_dir(study) / "train"


def _count(n: int, what: str) -> int:
    """``n`` as a non-negative int (it becomes part of a name; numpy integers are fine)."""
    try:
        n = operator.index(n)
    except TypeError:
        n = -1
    if n < 0:
        raise ValueError(f"{what} must be an int >= 0, got {n!r}")
    return n
