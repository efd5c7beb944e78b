"""Checkpoint-replay rows (docs/METRICS.md §Reference-point metrics): schema, atomic writer, reader.

One file per (trial, reference, objective), rewritten whole by each replay of it::

    replay/trial_id=<id>/reference=<ref>.parquet                    objective eval
    replay/trial_id=<id>/reference=<ref>.objective=train.parquet    objective train

One row per snapshot x_e of the trial (opt_study.trial.snapshots), against the reference y:

- ``trial_id`` string, ``step`` int64 (the snapshot's step e: e updates applied),
  ``reference`` string ("final", "init" or a step, as asked), ``ref_step`` int64 (its step);
- ``objective``: "eval" (F = the mean loss over the fixed evaluation sample set, eval mode) or
  "train" (F = f(·; B_e), the loss of the global training batch of the snapshot's step e, in
  train mode with that step's dropout masks: the authors' training-objective check);
- ``loss_x`` = F(x_e), ``loss_y`` = F(y);
- ``ip_grad_dist`` = ⟨∇F(x_e), x_e − y⟩, ``loss_gap`` = F(x_e) − F(y) (convexity: ip ≥ gap),
  ``sq_dist`` = ‖x_e − y‖², ``sq_grad`` = ‖∇F(x_e)‖²;
- optional curvature of F at x_e: ``hessian_top`` list<double> (the largest Lanczos Ritz
  values, descending), ``lanczos_steps`` int32, ``hutchinson_trace`` (mean of zᵀHz over
  ``hutchinson_samples`` Rademacher z) and ``hutchinson_stderr`` (its standard error);
- ``world`` int32, ``zero_stage`` int32, ``time_unix`` float64.

``trial_id`` and ``reference`` are stored in the file (``opt_study.results.query`` reads the
dataset with hive_partitioning off). Written to a hidden temporary file, fsynced and renamed.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from opt_study.storage import layout

REPLAY_SCHEMA = pa.schema(
    [
        pa.field("trial_id", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("reference", pa.string(), nullable=False),
        pa.field("ref_step", pa.int64(), nullable=False),
        pa.field("objective", pa.string()),
        pa.field("loss_x", pa.float64()),
        pa.field("loss_y", pa.float64()),
        pa.field("ip_grad_dist", pa.float64()),
        pa.field("loss_gap", pa.float64()),
        pa.field("sq_dist", pa.float64()),
        pa.field("sq_grad", pa.float64()),
        pa.field("hessian_top", pa.list_(pa.float64())),
        pa.field("lanczos_steps", pa.int32()),
        pa.field("hutchinson_trace", pa.float64()),
        pa.field("hutchinson_stderr", pa.float64()),
        pa.field("hutchinson_samples", pa.int32()),
        pa.field("world", pa.int32()),
        pa.field("zero_stage", pa.int32()),
        pa.field("time_unix", pa.float64()),
    ]
)
COLUMNS: tuple[str, ...] = tuple(REPLAY_SCHEMA.names)


def write_replay(study_dir, trial_id: str, reference: str, rows: list[dict], objective: str = "eval") -> Path:
    """Replace the replay file of (trial, reference, objective) with ``rows`` (dicts keyed by
    COLUMNS; nullable columns may be omitted). Raises ValueError on an unknown column or a row of
    another trial or reference."""
    path = layout.replay_path(Path(study_dir), trial_id, reference, objective)
    for r in rows:
        unknown = set(r) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown replay columns {sorted(unknown)}")
        if r.get("trial_id", trial_id) != trial_id or r.get("reference", reference) != reference:
            raise ValueError(f"row of {r.get('trial_id')}/{r.get('reference')} in the file of {trial_id}/{reference}")
    full = [
        {**{c: None for c in COLUMNS}, **r, "trial_id": trial_id, "reference": reference, "objective": objective}
        for r in rows
    ]
    table = pa.Table.from_pylist(full, schema=REPLAY_SCHEMA)
    layout.atomic_write(path, lambda f: pq.write_table(table, f, compression="zstd"))
    return path


def read_replay(
    study_dir, trial_id: str | None = None, reference: str | None = None, objective: str | None = None
) -> pa.Table:
    """The replay rows of a study (optionally one trial, one reference and/or one objective),
    sorted by (trial_id, objective, reference, step); an empty table with REPLAY_SCHEMA if there
    are none. Files written before the objective column existed read as objective "eval"."""
    root = layout.replay_dir(Path(study_dir))
    tdirs = (
        [layout.replay_trial_dir(Path(study_dir), trial_id)]
        if trial_id
        else (sorted(root.glob("trial_id=*")) if root.is_dir() else [])
    )
    objectives = [layout.check_objective(objective)] if objective else list(layout.REPLAY_OBJECTIVES)
    files = [
        f
        for d in tdirs
        if d.is_dir()
        for f in sorted(d.glob("reference=*.parquet"))
        if not f.name.startswith((".", "_")) and _matches(f.name, reference, objectives)
    ]
    if not files:
        return REPLAY_SCHEMA.empty_table()
    table = pa.concat_tables([_read(f) for f in files])
    keys = ["trial_id", "objective", "reference", "step"]
    return table.sort_by([(k, "ascending") for k in keys])


def _matches(name: str, reference: str | None, objectives: list[str]) -> bool:
    ref = name[len("reference=") :].split(".", 1)[0]
    if reference is not None and ref != layout.check_reference(reference):
        return False
    return any(name == layout.replay_file_name(ref, o) for o in objectives)


def _read(path: Path) -> pa.Table:
    table = pq.read_table(path)
    if "objective" not in table.column_names:  # written before objectives existed: the eval set's
        table = table.append_column("objective", pa.array(["eval"] * table.num_rows, pa.string()))
    return table.select(COLUMNS).cast(REPLAY_SCHEMA)
