"""Trial checkpoints: DeepSpeed's own (model, optimizer and ZeRO partitions, per rank) in the
study's layout, `<study>/checkpoints/<trial_id>/step-<s>/`, so one mechanism serves every restart:
Ray Train restarting a worker group after a worker died, Tune retrying an in-process trial, and
`opt-study resume` after the driver died. The loop itself finds the latest checkpoint on start.

The storage root is trusted: DeepSpeed checkpoints are pickles (SECURITY.md).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from opt_study import distributed
from opt_study.storage import layout, objectstore


def latest_step(study_dir: Path, trial_id: str) -> int | None:
    """The step recorded by DeepSpeed's `latest` file (written after a complete save), or None."""
    f = layout.checkpoint_dir(study_dir, trial_id) / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return int(tag.split("-", 1)[1]) if tag.startswith("step-") else None


def save(engine, study_dir: Path, trial_id: str, next_step: int, state: dict, keep: int = 2) -> None:
    """All ranks: save the engine at the boundary before `next_step` (rows up to it are flushed
    first by the caller, so a restart's rows start exactly where the checkpoint does)."""
    d = layout.checkpoint_dir(study_dir, trial_id)
    tag = f"step-{next_step}"
    engine.save_checkpoint(str(d), tag=tag, client_state={"next_step": next_step, **state})
    _push_own_files(d / tag, distributed.rank())
    distributed.barrier()
    if distributed.rank() == 0:
        objectstore.push(d / "latest")  # the commit marker goes up after every rank's files
    # Every rank prunes its machine's copy (other nodes' disks would otherwise keep every tag);
    # rank 0 also deletes from the object store, once.
    _prune(d, keep, store=distributed.rank() == 0)


# DeepSpeed names each rank's partition files `..zero_pp_rank_<r>_..`; the others (the model
# states at ZeRO 0-2) are rank 0's.
_RANK_RE = re.compile(r"zero_pp_rank_(\d+)_")


def owner(name: str) -> int:
    """The rank that writes (and alone reads back) checkpoint file `name`; the files without a
    rank in their name are read by every rank and written by rank 0."""
    m = _RANK_RE.search(name)
    return int(m.group(1)) if m else 0


def pull(study_dir: Path, trial_id: str, rank: int) -> None:
    """On an object-store root, fetch what this rank loads: `latest`, the shared model states
    and its own partition files, not the other ranks' (no-op on a local root)."""
    objectstore.pull(
        layout.checkpoint_dir(study_dir, trial_id),
        select=lambda rel: _RANK_RE.search(rel) is None or owner(rel.rsplit("/", 1)[-1]) == rank,
    )


def _push_own_files(tag_dir: Path, rank: int) -> None:
    """On an object-store root, upload the files this rank wrote (no-op on a local root)."""
    if objectstore.mirror_for(tag_dir) is None or not tag_dir.is_dir():
        return
    for f in sorted(tag_dir.iterdir()):
        if f.is_file() and owner(f.name) == rank:
            objectstore.push(f)


def load(engine, study_dir: Path, trial_id: str) -> dict | None:
    """All ranks: restore the latest checkpoint into `engine`; its client state, or None if none.

    Rank 0's `latest` decides the tag for every rank: ranks on other machines read their own
    working copies, which must not make them load different steps (or some none)."""
    step = distributed.broadcast_object(latest_step(study_dir, trial_id) if distributed.rank() == 0 else None)
    if step is None:
        return None
    d = layout.checkpoint_dir(study_dir, trial_id)
    path, client_state = engine.load_checkpoint(str(d), tag=f"step-{step}")
    if path is None:
        raise RuntimeError(
            f"trial {trial_id}: checkpoint step-{step} could not be loaded on rank {distributed.rank()} from {d}"
        )
    return client_state


def _prune(d: Path, keep: int, store: bool) -> None:
    """Remove all but the `keep` newest tags that hold files (an emptied folder is no tag);
    `store`: from the object store too."""
    tags = sorted(
        (int(p.name.split("-", 1)[1]), p)
        for p in d.glob("step-*")
        if p.is_dir() and any(f.is_file() for f in p.iterdir())
    )
    for _, p in tags[:-keep]:
        layout.remove_tree(p) if store else shutil.rmtree(p, ignore_errors=True)


def remove(study_dir: Path, trial_id: str, store: bool = True) -> None:
    """A finished trial's checkpoints are no longer needed (snapshots for replay are separate).
    Every rank removes its machine's copy; `store`: rank 0 also removes them from the store."""
    d = layout.checkpoint_dir(study_dir, trial_id)
    layout.remove_tree(d) if store else shutil.rmtree(d, ignore_errors=True)
