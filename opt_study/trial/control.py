"""The channel through which the driver asks a running trial to stop (ASHA's decision).

Stopping is cooperative: Tune killing a worker-group trial's actor leaks Ray Train V2's
placement group (ray-project/ray#54305), which then starves every later trial. So the driver
writes a stop file and the trial's rank 0 polls for it once a step; its vote is carried to every
rank in the step's packed all-reduce (opt_study.measure.hook). No torch here: the driver imports it.

A launcher may also stop a trial for its own reasons (the pool launcher, when Tune ends its
trainable: opt_study.study.pool): `stop_here` asks the trial running in this process, through the
same vote, without a stop file, so the trial's record is the driver's to write.
"""

from __future__ import annotations

from pathlib import Path

from opt_study.storage import layout, objectstore

_HERE: set[str] = set()  # trials this process was asked to stop (stop_here)


def stop_here(trial_id: str) -> None:
    """Ask the trial running in this process (its rank 0) to stop at its next step."""
    _HERE.add(trial_id)


def forget_stop_here(trial_id: str) -> None:
    _HERE.discard(trial_id)


def request_stop(study_dir: Path, trial_id: str) -> None:
    """Driver side. atomic_write: on an object-store root the file is uploaded, so a rank 0 on
    another node sees it (opt_study.storage.objectstore.exists)."""
    layout.atomic_write_bytes(layout.stop_path(study_dir, trial_id), b"")


def stop_requested(study_dir: Path, trial_id: str) -> bool:
    """Trial side (rank 0, once a step): has the driver asked this trial to stop? On an
    object-store root the store is asked at most every REMOTE_POLL_S seconds."""
    return trial_id in _HERE or objectstore.exists(layout.stop_path(study_dir, trial_id))
