"""fp32 parameter snapshots for checkpoint replay (docs/METRICS.md §Reference-point metrics).

A trial with ``measure.snapshot_every: k > 0`` saves x_0 before its first step, x_s after every
step where s % k == 0 (s = the number of updates applied) and its last iterate. Each rank saves
only its own fp32 master fragments (``ShardView.params()``, trimmed to ``ShardView.bounds()``):
no rank gathers a full vector. Layout under the study dir (paths from ``storage.layout``)::

    snapshots/<trial_id>/step-<s>/
        rank-<r>-of-<W>.pt   torch.save({"bounds": int64 [P, 2], "fragments": {name: fp32 1-D}})
        meta.json            trial, step, world, ZeRO stage, precision, parameter names, shapes,
                             numels and every rank's fragment bounds [W][P][2]
        COMMITTED            written last, atomically: a snapshot without it is ignored

Commit protocol (collective; every rank calls ``maybe_save`` at every step): rank 0 removes an
old ``COMMITTED`` (a restarted attempt rewrites the same steps), barrier, every rank writes its
file atomically (temp + fsync + rename), barrier, rank 0 writes ``meta.json`` then
``COMMITTED``. A reader therefore never sees a committed snapshot made of two attempts' files.
The study dir must be shared by all ranks (one node, or a network file system).

Rank files are read with ``torch.load(weights_only=True)`` only: they hold tensors, strings
and ints, so a tampered file cannot run code.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from opt_study import distributed
from opt_study.measure import deepspeed_state
from opt_study.measure.cadence import due
from opt_study.storage import layout, objectstore

COMMITTED = "COMMITTED"
META = "meta.json"
FORMAT = 1


class SnapshotSaver:
    """Saves one trial's snapshots; construct it on every rank (a collective) after the engine.

    ``every`` = measure.snapshot_every (0: every method is a no-op, no collective).
    """

    def __init__(self, study_dir, trial_id: str, view, zero_stage: int, precision: str, every: int):
        self.study_dir, self.trial_id, self.view, self.every = Path(study_dir), trial_id, view, every
        self.rank, self.world = view.rank, view.world
        if every <= 0:
            return
        layout.check_name(trial_id, "trial id")
        own = torch.tensor(view.bounds(), dtype=torch.float64).reshape(-1, 2)
        # on the engine's device: NCCL reduces only GPU tensors
        table = torch.zeros(self.world, own.shape[0], 2, dtype=torch.float64, device=view.engine.device)
        table[self.rank] = own.to(table.device)
        distributed.all_reduce_sum(table)  # every rank's bounds, for meta.json (once per trial)
        table = table.cpu()
        params = [p for _, p in view.named]
        self.meta = {
            "format": FORMAT,
            "trial_id": trial_id,
            "world": self.world,
            "zero_stage": zero_stage,
            "precision": precision,
            "names": view.names,
            "shapes": [deepspeed_state.full_shape(p) for p in params],
            "numels": [deepspeed_state.full_numel(p) for p in params],
            "bounds": table.long().tolist(),
        }

    def is_due(self, step: int, last: bool) -> bool:
        """Whether ``maybe_save`` saves after step index ``step`` (0-based) of the loop."""
        return self.every > 0 and (due(step, self.every) or last)

    def save_initial(self) -> None:
        """x_0, before the first step (saved as step-0)."""
        if self.every > 0:
            self._save(0)

    def maybe_save(self, step: int, last: bool = False) -> bool:
        """After ``engine.step()`` of loop step ``step``: saves x_{step+1} when due; ``last``
        marks the trial's final step (completed or stopped), which is always saved.
        Every rank must pass the same arguments (the decision depends on them only)."""
        if not self.is_due(step, last):
            return False
        self._save(step + 1)
        return True

    def _save(self, s: int) -> None:
        d = layout.snapshot_step_dir(self.study_dir, self.trial_id, s)
        if self.rank == 0:
            layout.remove_tree(d / COMMITTED)
        distributed.barrier()
        # copy=True: torch.save of a view would write the view's whole storage
        frags = {
            name: t[: hi - lo].detach().to("cpu", torch.float32, copy=True)
            for name, t, (lo, hi) in zip(self.view.names, self.view.params(), self.view.bounds())
        }
        bounds = torch.tensor(self.view.bounds(), dtype=torch.int64).reshape(-1, 2)
        layout.atomic_write(
            layout.snapshot_rank_file(self.study_dir, self.trial_id, s, self.rank, self.world),
            lambda f: torch.save({"bounds": bounds, "fragments": frags}, f),
        )
        distributed.barrier()
        if self.rank == 0:
            missing = [
                r
                for r in range(self.world)
                if not objectstore.exists(
                    layout.snapshot_rank_file(self.study_dir, self.trial_id, s, r, self.world), poll=False
                )
            ]
            if missing:  # the study dir is not shared by the ranks: say so instead of committing
                raise RuntimeError(
                    f"snapshot step-{s}: rank files {missing} not visible from rank 0; "
                    "snapshots need a study dir shared by all ranks or an object store"
                )
            layout.atomic_write_bytes(d / META, json.dumps({**self.meta, "step": s}).encode())
            layout.atomic_write_bytes(d / COMMITTED, b"")


# ----------------------------------------------------------------------------------- reading
def committed_steps(study_dir, trial_id: str) -> list[int]:
    """The committed snapshot steps of a trial, ascending (empty if it saved none)."""
    root = layout.snapshot_trial_dir(study_dir, trial_id)
    if not root.is_dir():
        return []
    steps = ((layout.parse_snapshot_step_dir(d.name), d) for d in root.iterdir())
    return sorted(s for s, d in steps if s is not None and (d / COMMITTED).is_file())


def snapshot_trials(study_dir) -> list[str]:
    """Trial ids that have at least one committed snapshot."""
    root = layout.snapshots_dir(study_dir)
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if d.is_dir() and committed_steps(study_dir, d.name))


def read_meta(study_dir, trial_id: str, step: int) -> dict:
    d = layout.snapshot_step_dir(study_dir, trial_id, step)
    if not (d / COMMITTED).is_file():
        raise FileNotFoundError(f"no committed snapshot at {d}")
    meta = json.loads((d / META).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{d / META}: snapshot format {meta.get('format')!r}, expected {FORMAT}")
    return meta


def load_fragments(study_dir, trial_id: str, step: int, rank: int, world: int) -> dict:
    """One rank's file of a committed snapshot: {"bounds": int64 [P, 2], "fragments": {name: t}}."""
    path = layout.snapshot_rank_file(study_dir, trial_id, step, rank, world)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # it holds objects, not tensors: opt_study did not write it
        raise ValueError(
            f"{path}: the weights-only load refuses it ({str(e).splitlines()[-1][:200]}); not loaded"
        ) from None
    if not isinstance(data, dict) or set(data) != {"bounds", "fragments"}:
        raise ValueError(f"{path}: not a snapshot rank file")
    return data


def resolve_reference(study_dir, trial_id: str, reference: str) -> int:
    """The snapshot step of a reference: "final" (the last committed), "init" (0) or a step."""
    steps = committed_steps(study_dir, trial_id)
    if not steps:
        raise FileNotFoundError(
            f"trial {trial_id} has no committed snapshots under "
            f"{layout.snapshot_trial_dir(study_dir, trial_id)} (set measure.snapshot_every)"
        )
    if reference == "final":
        return steps[-1]
    step = 0 if reference == "init" else _parse_step(reference)
    if step not in steps:
        raise ValueError(f"trial {trial_id} has no snapshot at step {step}; saved: {steps}")
    return step


def _parse_step(reference: str) -> int:
    if not reference.isdigit():
        raise ValueError(f"reference must be final, init or a snapshot step, got {reference!r}")
    return int(reference)
