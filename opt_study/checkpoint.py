"""Trial checkpoints: DeepSpeed's own (model, optimizer and ZeRO partitions, per rank) in the
study's layout, `<study>/checkpoints/<trial_id>/step-<s>/`, so one mechanism serves every restart:
Ray Train restarting a worker group after a worker died, Tune retrying an in-process trial, and
`opt-study resume` after the driver died. The loop itself finds the latest checkpoint on start.

The storage root is trusted: DeepSpeed checkpoints are pickles (SECURITY.md).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from opt_study import distributed


def ckpt_dir(study_dir: Path, trial_id: str) -> Path:
    return Path(study_dir) / "checkpoints" / trial_id


def latest_step(study_dir: Path, trial_id: str) -> int | None:
    """The step recorded by DeepSpeed's `latest` file (written after a complete save), or None."""
    f = ckpt_dir(study_dir, trial_id) / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return int(tag.split("-", 1)[1]) if tag.startswith("step-") else None


def save(engine, study_dir: Path, trial_id: str, next_step: int, state: dict, keep: int = 2) -> None:
    """All ranks: save the engine at the boundary before `next_step` (rows up to it are flushed
    first by the caller, so a restart's rows start exactly where the checkpoint does)."""
    d = ckpt_dir(study_dir, trial_id)
    engine.save_checkpoint(str(d), tag=f"step-{next_step}", client_state={"next_step": next_step, **state})
    distributed.barrier()
    if distributed.rank() == 0:
        _prune(d, keep)


def load(engine, study_dir: Path, trial_id: str) -> dict | None:
    """All ranks: restore the latest checkpoint into `engine`; its client state, or None if none."""
    if latest_step(study_dir, trial_id) is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir(study_dir, trial_id)))
    if path is None:
        return None
    return client_state


def _prune(d: Path, keep: int) -> None:
    steps = sorted((int(p.name.split("-", 1)[1]), p) for p in d.glob("step-*") if p.is_dir())
    for _, p in steps[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def remove(study_dir: Path, trial_id: str) -> None:
    """A finished trial's checkpoints are no longer needed (snapshots for replay are separate)."""
    shutil.rmtree(ckpt_dir(study_dir, trial_id), ignore_errors=True)
