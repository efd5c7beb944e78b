"""The per-step schema of the Parquet dataset, versioned.

One row per optimizer step of one attempt of one trial. The identity columns are never
null; every metric is nullable (null where not computed on that step: the measurement
columns are filled only on measured steps, ``eval_loss`` only on evaluation steps).

Columns (definitions of every column in docs/METRICS.md):

- identity: ``trial_id`` string, ``attempt`` int32, ``step`` int64, ``time_unix`` float64
  (wall clock when the row was produced), ``measured`` bool (the measurement hook ran).
- training: ``loss, lr, grad_norm, update_norm, param_norm, engine_grad_norm, step_time_s,
  units_per_s, eval_loss`` (float64). ``engine_grad_norm`` is the engine's own report
  (DeepSpeed's global norm), kept beside ours as a cross-check.
- raw sums (measured steps): ``loss_probe, probe_s, sq_grad, sq_grad_probe, sq_update,
  sq_param, sq_dist_init, ip_grad_update, ip_probe_update, sq_grad_diff, ip_param_update,
  ip_param_grad, ip_update_prev, ip_grad_prev, sq_update_prev, sq_grad_prev`` (float64;
  the last two are ‖Δ_{t−1}‖², ‖g_{t−1}‖², the denominators of the `*_prev` cosines).
- ``sq_grad_small`` (raw) and ``noise_scale_simple`` (derived): the gradient noise scale
  B_simple in samples (McCandlish et al. 2018), when ``measure.noise_scale`` is on.
- ``groups``: the raw sums per parameter group, list<struct<name, sums...>> (measured steps).
- derived (measured steps): ``loss_change, convexity_gap_fwd, convexity_gap_bwd,
  trapezoid_residual, smoothness_local, smoothness_descent, curvature_secant, step_alpha,
  cos_grad_update, cos_update_prev, cos_grad_prev, update_to_param, noise_floor`` (float64).
- ``flag`` string: why derived metrics are null on a measured step (e.g. a zero update).
- ``loss_precision`` string: the precision ``loss`` and ``loss_probe`` of the row were evaluated
  in: the training precision (``fp32``, ``bf16``, ``fp16``) on unmeasured steps, ``fp32`` on
  measured steps (docs/METRICS.md §Precision: losses that enter differences are re-evaluated in fp32 under
  bf16/fp16, so a bf16 run's measured rows carry fp32 losses).
- ``grad_precision`` string: the arithmetic of the backward that produced ``g`` (and ``g⁺``) of
  the row: ``fp32`` on measured steps with ``measure.fp32_grads`` on (measure/fp32grad.py; the
  sums, ``grad_norm`` and the noise floor of the row are then of the fp32 gradient), else the
  training precision. Null in files written before it.
- ``cls_convexity_fwd``, ``cls_convexity_bwd`` string: ``holds`` / ``violated`` /
  ``indeterminate`` (within the noise floor).

- online curvature (curvature steps, ``measure.curvature_every``): ``sharpness`` (λ_max of the
  Hessian on the step's batch), ``critical_sharpness`` (λc = 2/ηc along the update direction),
  ``curvature_time_s`` (float64); ``curvature_batch`` string: the batch they were measured on,
  ``step`` (the step's own) or ``fixed:size=N,seed=S`` (``measure.curvature_batch``).

- next-batch identity of the previous update (measured steps, ``measure.next_batch``):
  ``nb_loss_prev`` (f(x_{t−1}; B_t)), ``nb_ip_grad_update`` (⟨g_t, Δ_{t−1}⟩), ``nb_loss_gap``
  (ℓ_t − f(x_{t−1}; B_t)), ``nb_convexity_gap`` (the gap minus the inner product),
  ``nb_loss_prev_scale`` (the rounding magnitude of f(x_{t−1}; B_t)), ``nb_noise_floor``
  (float64); ``cls_nb_convexity`` string (its class against the floor).
- gradient history (measured steps, ``measure.grad_history``): ``grad_history_ip``
  (⟨g_t, S_t⟩), ``grad_history_sq`` (‖S_t‖²), ``cos_grad_history`` (float64), S_t = Σ_{s<t} g_s.

- ``extra`` map<string, float64>: the study's user metrics (``measure.extra``) on measured steps.

Version history: 1 = the columns above (``loss_precision``, ``extra``, the curvature and the
next-batch columns added within version 1:
new nullable columns, null in files written before them). A reader of a newer version may see more columns;
removing or retyping a column requires a new version.
"""

from __future__ import annotations

import pyarrow as pa

from opt_study.measure import names

STEP_SCHEMA_VERSION = 1

IDENTITY_COLUMNS: tuple[str, ...] = ("trial_id", "attempt", "step", "time_unix", "measured")

# The measurement's columns come from opt_study.measure.names (a new metric there becomes a
# column here; tests/unit/test_names.py checks both sides).
TRAINING_COLUMNS: tuple[str, ...] = (
    "loss",
    "lr",
    *names.NORM_NAMES,
    "engine_grad_norm",
    "step_time_s",
    "units_per_s",
    "eval_loss",
)

RAW_SUM_COLUMNS: tuple[str, ...] = names.RAW_NAMES

# The raw sums stored per parameter group (docs/METRICS.md §Raw sums):
# one list<struct> cell per row, e.g. [{name: "blocks.0", sq_grad: ..., ...}, ...]; DuckDB reads
# it with UNNEST(groups). Totals over groups are the top-level columns.
GROUP_SUM_COLUMNS: tuple[str, ...] = names.GROUP_SUM_NAMES
GROUPS_TYPE = pa.list_(
    pa.struct([pa.field("name", pa.string())] + [pa.field(c, pa.float64()) for c in GROUP_SUM_COLUMNS])
)

DERIVED_COLUMNS: tuple[str, ...] = names.ROW_DERIVED_NAMES

# User metrics (measure.extra, opt_study.measure.extra): {name: value} on measured steps, one map
# cell per row, so a study's own metrics need no schema change; DuckDB reads extra['name'].
EXTRA_TYPE = pa.map_(pa.string(), pa.float64())

# Online curvature (curvature steps only): sharpness, critical_sharpness, curvature_time_s.
CURVATURE_COLUMNS: tuple[str, ...] = names.CURVATURE_NAMES

# The next-batch identity of the previous update (measured steps with measure.next_batch):
# nb_loss_prev, nb_ip_grad_update, nb_loss_gap, nb_convexity_gap.
NEXT_BATCH_COLUMNS: tuple[str, ...] = names.NEXT_BATCH_NAMES
# The gradient-history cosine (measured steps with measure.grad_history).
GRAD_HISTORY_COLUMNS: tuple[str, ...] = names.GRAD_HISTORY_NAMES

# Every float64 metric column, in schema order: training, raw sums, derived, curvature, next batch.
METRIC_COLUMNS: tuple[str, ...] = (
    TRAINING_COLUMNS + RAW_SUM_COLUMNS + DERIVED_COLUMNS + CURVATURE_COLUMNS + NEXT_BATCH_COLUMNS + GRAD_HISTORY_COLUMNS
)

CLASS_COLUMNS: tuple[str, ...] = (*names.CLASS_NAMES, names.NEXT_BATCH_CLASS)
CLASS_VALUES: frozenset[str] = frozenset(names.CLASSES)

STEP_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("trial_id", pa.string(), nullable=False),
        pa.field("attempt", pa.int32(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("time_unix", pa.float64(), nullable=False),
        *[pa.field(name, pa.float64()) for name in METRIC_COLUMNS],
        pa.field("flag", pa.string()),
        *[pa.field(name, pa.string()) for name in CLASS_COLUMNS],
        pa.field("loss_precision", pa.string()),
        pa.field(names.GRAD_PRECISION, pa.string()),
        pa.field(names.CURVATURE_BATCH, pa.string()),
        pa.field("measured", pa.bool_(), nullable=False),
        pa.field("groups", GROUPS_TYPE),
        pa.field("extra", EXTRA_TYPE),
    ],
    metadata={"opt_study.step_schema_version": str(STEP_SCHEMA_VERSION)},
)

COLUMN_NAMES: tuple[str, ...] = tuple(STEP_SCHEMA.names)
REQUIRED_COLUMNS: frozenset[str] = frozenset(f.name for f in STEP_SCHEMA if not f.nullable)
_COLUMN_SET: frozenset[str] = frozenset(COLUMN_NAMES)


def schema_version(schema: pa.Schema) -> int | None:
    """The step-schema version stored in a Parquet file's schema metadata, or None."""
    meta = schema.metadata or {}
    raw = meta.get(b"opt_study.step_schema_version")
    return int(raw) if raw is not None else None


def check_keys(row: dict) -> None:
    """Raise ValueError naming every key of ``row`` that is not a column of the schema."""
    unknown = row.keys() - _COLUMN_SET
    if unknown:
        raise ValueError(f"unknown step column(s): {sorted(unknown)}; allowed: {COLUMN_NAMES}")
