"""Trial checkpoints: DeepSpeed's own (model, optimizer and ZeRO partitions, per rank) in the
study's layout, `<study>/checkpoints/<trial_id>/step-<s>/`, so one mechanism serves every restart:
Ray Train restarting a worker group after a worker died, Tune retrying an in-process trial, and
`opt-study resume` after the driver died. The loop itself finds the checkpoint on start.

A checkpoint is complete or absent. DeepSpeed's `latest` is written by rank 0 before the other
ranks have finished their partitions, so it is neither written (`save_latest=False`) nor read.
Instead (docs/DESIGN.md §Exactly-once storage):

1. rank 0 removes what an earlier attempt left under the tag; barrier;
2. every rank writes its files (DeepSpeed), fsyncs them and hashes them (sha256);
3. the digests are gathered on rank 0, which writes `step-<s>/COMMITTED` last (atomically,
   uploaded after every rank's files on an object store): {"step", "world", "files": {name: sha256}};
4. barrier; then older tags and incomplete ones are pruned.

`load` takes the newest tag with a marker whose files every rank finds with their recorded
digests, by explicit tag, and reads it with `torch.load(weights_only=True)` only
(`measure.deepspeed_state.use_weights_only_loads`): a planted pickle cannot run code (SECURITY.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

from opt_study import distributed
from opt_study.measure import deepspeed_state
from opt_study.storage import layout, objectstore

MARKER = "COMMITTED"
FORMAT = 1
_TAG_RE = re.compile(r"step-([0-9]+)")
# DeepSpeed names each rank's partition files `..zero_pp_rank_<r>_..`; the others (the model
# states at ZeRO 0-2) are rank 0's.
_RANK_RE = re.compile(r"zero_pp_rank_(\d+)_")


def owner(name: str) -> int:
    """The rank that writes (and alone reads back) checkpoint file `name`; the files without a
    rank in their name are read by every rank and written by rank 0."""
    m = _RANK_RE.search(name)
    return int(m.group(1)) if m else 0


def _reads(name: str, rank: int) -> bool:
    """Whether `rank` loads file `name`: its own partitions and the shared (rank-less) files."""
    return _RANK_RE.search(name) is None or owner(name) == rank


# ---------------------------------------------------------------------------------- saving
def save(engine, study_dir: Path, trial_id: str, next_step: int, state: dict, keep: int = 2) -> None:
    """All ranks: save the engine at the boundary before `next_step` (rows up to it are flushed
    first by the caller, so a restart's rows start exactly where the checkpoint does)."""
    d = layout.checkpoint_dir(study_dir, trial_id)
    tag = f"step-{next_step}"
    rank = distributed.rank()
    if rank == 0:  # a dead attempt's files under this tag must never mix with this save's
        layout.remove_tree(d / tag)
    distributed.barrier()
    engine.save_checkpoint(str(d), tag=tag, client_state={"next_step": next_step, **state}, save_latest=False)
    own = _sync_own_files(d / tag, rank)
    _push_own_files(d / tag, rank)
    gathered = distributed.all_gather_object(own)
    if rank == 0:  # the commit, last: every rank's files are on disk (and in the store) now
        files = {name: digest for part in gathered for name, digest in part.items()}
        marker = {"format": FORMAT, "step": next_step, "world": distributed.world_size(), "files": files}
        layout.atomic_write_bytes(d / tag / MARKER, json.dumps(marker, sort_keys=True).encode())
    distributed.barrier()  # nobody prunes the previous checkpoint before this one counts
    # Every rank prunes its machine's copy (other nodes' disks would otherwise keep every tag);
    # rank 0 also deletes from the object store, once.
    _prune(d, keep, store=rank == 0)


def _sync_own_files(tag_dir: Path, rank: int) -> dict[str, str]:
    """fsync the files this rank wrote (DeepSpeed does not) and return their sha256 digests."""
    out = {}
    for f in sorted(tag_dir.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.name != MARKER and owner(f.name) == rank:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            out[f.name] = _sha256(f)
    layout.fsync_dir(tag_dir)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _push_own_files(tag_dir: Path, rank: int) -> None:
    """On an object-store root, upload the files this rank wrote (no-op on a local root)."""
    if objectstore.mirror_for(tag_dir) is None or not tag_dir.is_dir():
        return
    for f in sorted(tag_dir.iterdir()):
        if f.is_file() and f.name != MARKER and owner(f.name) == rank:
            objectstore.push(f)


# --------------------------------------------------------------------------------- reading
def _tags(d: Path) -> list[tuple[int, Path]]:
    """Every `step-<s>` folder of a trial, newest first."""
    if not d.is_dir():
        return []
    tags = ((_TAG_RE.fullmatch(p.name), p) for p in d.iterdir() if p.is_dir() and not p.is_symlink())
    return sorted(((int(m.group(1)), p) for m, p in tags if m), reverse=True)


def read_marker(tag_dir: Path) -> dict | None:
    """The commit marker of a tag folder, or None when it is missing or not one of ours."""
    try:
        marker = json.loads((tag_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    ok = (
        isinstance(marker, dict)
        and marker.get("format") == FORMAT
        and isinstance(marker.get("files"), dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in marker["files"].items())
        and f"step-{marker.get('step')}" == tag_dir.name
    )
    return marker if ok else None


def complete_steps(study_dir: Path, trial_id: str) -> list[int]:
    """The steps of the trial's committed checkpoints, newest first (files not verified here)."""
    return [s for s, p in _tags(layout.checkpoint_dir(study_dir, trial_id)) if read_marker(p) is not None]


def latest_step(study_dir: Path, trial_id: str) -> int | None:
    """The newest committed checkpoint's step, or None."""
    steps = complete_steps(study_dir, trial_id)
    return steps[0] if steps else None


def verify(tag_dir: Path, rank: int, world: int) -> str | None:
    """Why this rank cannot load the checkpoint in `tag_dir` (None: it can): the marker is ours
    and of this world size, no file is there that it does not list, and every file this rank
    reads has its recorded digest (a partition cut short by a dying rank does not)."""
    marker = read_marker(tag_dir)
    if marker is None:
        return "no commit marker"
    if marker.get("world") != world:
        return f"written by {marker.get('world')} ranks, this trial has {world}"
    files = marker["files"]
    present = {f.name for f in tag_dir.iterdir() if f.is_file() and not f.name.startswith(".")} - {MARKER}
    if present - set(files):
        return f"files not in its marker: {sorted(present - set(files))[:3]}"
    for name, digest in sorted(files.items()):
        if _reads(name, rank) and (name not in present or _sha256(tag_dir / name) != digest):
            return f"{name} is missing or differs from its recorded sha256"
    return None


def pull(study_dir: Path, trial_id: str, rank: int) -> None:
    """On an object-store root, fetch what this rank loads: the markers, the shared model states
    and its own partition files, not the other ranks' (no-op on a local root)."""
    objectstore.pull(
        layout.checkpoint_dir(study_dir, trial_id),
        select=lambda rel: _reads(rel.rsplit("/", 1)[-1], rank),
    )


def load(engine, study_dir: Path, trial_id: str) -> dict | None:
    """All ranks: restore the newest complete checkpoint into `engine`; its client state, or None
    if there is none.

    Rank 0's listing decides the candidates for every rank (ranks on other machines read their
    own working copies, which must not make them load different steps); a candidate is taken
    only when every rank verified its files, else the next older one is tried."""
    d = layout.checkpoint_dir(study_dir, trial_id)
    rank, world = distributed.rank(), distributed.world_size()
    steps = distributed.broadcast_object(complete_steps(study_dir, trial_id) if rank == 0 else None)
    for step in steps:
        why = verify(d / f"step-{step}", rank, world)
        problems = [p for p in distributed.all_gather_object(why) if p]
        if problems:
            if rank == 0:
                warnings.warn(f"trial {trial_id}: checkpoint step-{step} skipped: {problems[0]}", stacklevel=2)
            continue
        deepspeed_state.use_weights_only_loads(engine)
        try:
            path, client_state = engine.load_checkpoint(str(d), tag=f"step-{step}")
        except pickle.UnpicklingError as e:  # the engine may be half-restored: no fallback
            raise RuntimeError(
                f"trial {trial_id}: checkpoint {d / f'step-{step}'} holds objects a weights-only load refuses, "
                f"so opt_study did not write it; it was not loaded (remove it to start the trial over): "
                f"{str(e).splitlines()[-1][:300]}"
            ) from None
        if path is None:
            raise RuntimeError(f"trial {trial_id}: checkpoint step-{step} could not be loaded on rank {rank} from {d}")
        return client_state
    return None


# -------------------------------------------------------------------------------- removing
def _prune(d: Path, keep: int, store: bool) -> None:
    """Keep the `keep` newest committed tags; remove the older ones and every incomplete one
    (all ranks are past the commit barrier, so none is being written). `store`: from the object
    store too."""
    committed = 0
    for _, p in _tags(d):
        if read_marker(p) is not None and committed < keep:
            committed += 1
            continue
        layout.remove_tree(p) if store else shutil.rmtree(p, ignore_errors=True)
    if store:  # DeepSpeed's pointer from older versions: never read, so never left to mislead
        layout.remove_tree(d / "latest")


def remove(study_dir: Path, trial_id: str, store: bool = True) -> None:
    """A finished trial's checkpoints are no longer needed (snapshots for replay are separate);
    the driver calls this once it has recorded the trial finished. `store`: also remove them
    from the object store."""
    d = layout.checkpoint_dir(study_dir, trial_id)
    layout.remove_tree(d) if store else shutil.rmtree(d, ignore_errors=True)
