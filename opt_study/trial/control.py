"""The channel through which the driver asks a running trial to stop (ASHA's decision).

Stopping is cooperative: Tune killing a worker-group trial's actor leaks Ray Train V2's
placement group (ray-project/ray#54305), which then starves every later trial. So the driver
writes a stop file and the trial's rank 0 polls for it once a step; its vote is carried to every
rank in the step's packed all-reduce (opt_study.measure.hook). No torch here: the driver imports it.
"""

from __future__ import annotations

from pathlib import Path

from opt_study.storage import layout, objectstore


def request_stop(study_dir: Path, trial_id: str) -> None:
    """Driver side. atomic_write: on an object-store root the file is uploaded, so a rank 0 on
    another node sees it (opt_study.storage.objectstore.exists)."""
    layout.atomic_write_bytes(layout.stop_path(study_dir, trial_id), b"")


def stop_requested(study_dir: Path, trial_id: str) -> bool:
    """Trial side (rank 0, once a step): has the driver asked this trial to stop? On an
    object-store root the store is asked at most every REMOTE_POLL_S seconds."""
    return objectstore.exists(layout.stop_path(study_dir, trial_id))
