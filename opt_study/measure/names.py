"""Every name the measurement produces, in ONE place (docs/METRICS.md §Raw sums and §Derived metrics).

Pure Python, no torch: ``opt_study.results.schema`` builds its columns from these tuples, the
fused kernel's layout check (fused_sums.py vs ``N_SUMS`` / ``enum Sum`` in csrc/fused_sums.cpp)
and the sums (sums.py) index by them, and tests/unit/test_names.py proves that the lists cannot
drift: every derived name has a formula in ``metrics.derive``, a line in
``reference.reference_metrics`` and a schema column; every raw sum has operands here, a column in
the kernel and the schema, and a line in ``reference.reference_sums``.

Adding a derived metric: its name in DERIVED_NAMES and its formula in ``metrics.derive`` (one
edit in measure), its line in ``reference.reference_metrics``, and a test. The Parquet schema, the
SQL views (``results.query``, through ``schema``) and the multi-rank harness pick it up.

Adding a raw sum: its name in SUM_NAMES and its operands in SUM_TERMS, the same column in
csrc/fused_sums.cpp (``N_SUMS``, ``enum Sum``, ``has()``, the update), its line in
``reference.reference_sums`` and in the harness's SUM_OPERANDS.
"""

from __future__ import annotations

# --------------------------------------------------------------------------------- raw sums
# The vectors a sum reads, in sums.Fragment's field order; the fused kernel takes 7 pointers in
# this order (csrc/fused_sums.cpp, N_VECS).
VECTOR_NAMES: tuple[str, ...] = ("x", "g", "delta", "g_plus", "x0", "delta_prev", "g_prev")

# Differences formed per chunk in fp32 before a dot (never as ‖a‖² − 2⟨a,b⟩ + ‖b‖², which
# cancels catastrophically when g⁺ ≈ g): name -> (minuend, subtrahend).
SUM_DIFFS: dict[str, tuple[str, str]] = {"x_minus_x0": ("x", "x0"), "gp_minus_g": ("g_plus", "g")}
# Elementwise magnitudes |v_i| (exact in any precision): operands of the noise floor's
# weight-rounding sums Σ|g_i||x_i| (docs/METRICS.md §Noise floor): name -> vector.
SUM_ABS: dict[str, str] = {"abs_x": "x", "abs_g": "g", "abs_g_plus": "g_plus", "abs_delta": "delta"}


def operand_vectors(operand: str) -> tuple[str, ...]:
    """The vectors one operand of SUM_TERMS reads (a difference reads two)."""
    if operand in SUM_DIFFS:
        return SUM_DIFFS[operand]
    return (SUM_ABS[operand],) if operand in SUM_ABS else (operand,)


# Every raw sum of docs/METRICS.md is one dot product over parameter elements: name -> its operands
# (vectors, or differences of SUM_DIFFS). The order is the row order of sums.local_sums /
# flat_sums and the column order of the fused kernel's `enum Sum`.
SUM_TERMS: dict[str, tuple[str, str]] = {
    "sq_grad": ("g", "g"),  # ‖g_t‖²
    "sq_grad_probe": ("g_plus", "g_plus"),  # ‖g⁺_t‖²
    "sq_update": ("delta", "delta"),  # ‖Δ_t‖²
    "sq_param": ("x", "x"),  # ‖x_t‖²
    "sq_dist_init": ("x_minus_x0", "x_minus_x0"),  # ‖x_t − x_0‖²
    "ip_grad_update": ("g", "delta"),  # ⟨g_t, Δ_t⟩
    "ip_probe_update": ("g_plus", "delta"),  # ⟨g⁺_t, Δ_t⟩
    "sq_grad_diff": ("gp_minus_g", "gp_minus_g"),  # ‖g⁺_t − g_t‖²
    "ip_param_update": ("x", "delta"),  # ⟨x_t, Δ_t⟩
    "ip_param_grad": ("x", "g"),  # ⟨x_t, g_t⟩
    "ip_update_prev": ("delta", "delta_prev"),  # ⟨Δ_t, Δ_{t−1}⟩
    "ip_grad_prev": ("g", "g_prev"),  # ⟨g_t, g_{t−1}⟩
    # ‖Δ_{t−1}‖², ‖g_{t−1}‖²: the denominators of cos_update_prev and cos_grad_prev. The step
    # before a measured step is usually not measured, so they must travel with this step's sums.
    "sq_update_prev": ("delta_prev", "delta_prev"),
    "sq_grad_prev": ("g_prev", "g_prev"),
    # Σ|g_i||x_i|, Σ|g⁺_i||x_i|, Σ|g⁺_i||Δ_i|: how far a gradient read at weights rounded to the
    # training precision can move the convexity gaps (the noise floor's weight-rounding term,
    # docs/METRICS.md §Noise floor; Σ|g⁺_i||p_i| ≤ abs_probe_param + |s|·abs_probe_update)
    "abs_grad_param": ("abs_g", "abs_x"),
    "abs_probe_param": ("abs_g_plus", "abs_x"),
    "abs_probe_update": ("abs_g_plus", "abs_delta"),
}
SUM_NAMES: tuple[str, ...] = tuple(SUM_TERMS)

# The scalars packed after the sums into the step's ONE all-reduce (sums.pack). Each rank
# contributes its share of the global mean loss (ℓ_r / N for N equal ranks), so the SUM
# all-reduce yields the global mean directly. `stop_votes` rides the same reduction: rank 0 puts 1
# when the study asked the trial to stop (opt_study.trial), so every rank learns it on the same
# step without a collective of its own. `sq_grad_small` is the mean over all N·A micro-batches of
# ‖g_{r,m}‖², each micro-batch's gradient read before DeepSpeed reduces it (the small-batch term
# of the gradient noise scale; NaN when off). `loss_scale` and `loss_probe_scale` are the rounding
# magnitudes M of ℓ_t and ℓ⁺_t (lossscale.Capture, the same averaging as the losses): the loss
# terms of the noise floor (docs/METRICS.md §Noise floor; NaN where the loss is not a covered
# cross-entropy, and on unmeasured steps).
LOSS_SCALE_NAMES: tuple[str, ...] = ("loss_scale", "loss_probe_scale")
# The next-batch identity (measure.next_batch; measure/next_batch.py, docs/METRICS.md §Next-batch
# gap) rides the same vector: this rank's share of f(x_{t−1}; B_t) and its partial ⟨g_t, Δ_{t−1}⟩
# (NaN when off or when Δ_{t−1} was not kept).
NEXT_BATCH_RAW: tuple[str, ...] = ("nb_loss_prev", "nb_ip_grad_update")
# ... and the rounding magnitude M of f(x_{t−1}; B_t) (lossscale.Capture over that forward), for
# the next-batch gap's noise floor
NEXT_BATCH_SCALE = "nb_loss_prev_scale"
# measure.grad_history (measure/grad_history.py): this rank's partial ⟨g_t, S_t⟩ and ‖S_t‖²,
# S_t = Σ_{s<t} g_s the running sum of every step's gradient (ZQZCalin/trainit's g(1:n-1))
GRAD_HISTORY_RAW: tuple[str, ...] = ("grad_history_ip", "grad_history_sq")
LOSS_NAMES: tuple[str, ...] = (
    "loss",
    "loss_probe",
    "stop_votes",
    "sq_grad_small",
    *LOSS_SCALE_NAMES,
    *NEXT_BATCH_RAW,
    NEXT_BATCH_SCALE,
    *GRAD_HISTORY_RAW,
)

# Every step (unless measure.norms is off): the three norms, square roots of these sums.
NORM_OF: dict[str, str] = {"grad_norm": "sq_grad", "update_norm": "sq_update", "param_norm": "sq_param"}
NORM_NAMES: tuple[str, ...] = tuple(NORM_OF)
NORM_SUMS: tuple[str, ...] = tuple(NORM_OF.values())

# ‖Δ_{t−1}‖² and ‖g_{t−1}‖² are step t−1's own sq_update and sq_grad, over the very buffers kept
# as Δ_{t−1} and g_{t−1}: a rank keeps its partial values from step t−1's sums (hook.py).
PREV_OF: dict[str, str] = {"sq_update_prev": "sq_update", "sq_grad_prev": "sq_grad"}

# The probe's scalars on a measured row: ℓ⁺_t and the segment factor s (p = x_t + sΔ_t).
PROBE_NAMES: tuple[str, ...] = ("loss_probe", "probe_s")
# The gradient noise scale (measure.noise_scale): its raw term and B_simple (hook.py).
NOISE_RAW = "sq_grad_small"
NOISE_DERIVED = "noise_scale_simple"

# Per parameter TENSOR (not group: a group merges weight and bias), measured steps only: these
# sums of each tensor i ride the same all-reduce as a [len(TENSOR_SUMS), P] block after the loss
# terms (hook.StepMeasurer._reduce). After it, TENSOR_NORM_OF's columns are Σ_i √(sum_i): the
# numerator Σ_i ‖g⁺_i − g_i‖ and denominator Σ_i ‖Δ_i‖ of the authors' smoothness
# (smoothness_authors; docs/METRICS.md §Derived metrics).
TENSOR_NORM_OF: dict[str, str] = {"tensor_norm_grad_diff": "sq_grad_diff", "tensor_norm_update": "sq_update"}
TENSOR_NAMES: tuple[str, ...] = tuple(TENSOR_NORM_OF)
TENSOR_SUMS: tuple[str, ...] = tuple(TENSOR_NORM_OF.values())

# Online curvature (measure.curvature_every; measure/sharpness.py, docs/METRICS.md §Online
# curvature), on curvature steps only: λ_max of the Hessian on the step's batch (Lanczos), the
# critical sharpness λc = 2/ηc along the update direction, and the wall time of both.
# ``sharpness_precond``: λ_max(P⁻¹H) with Adam's P = diag(√v̂) + ε (measure.preconditioned_sharpness).
CURVATURE_NAMES: tuple[str, ...] = ("sharpness", "sharpness_precond", "critical_sharpness", "curvature_time_s")
# Which batch those were measured on (measure.curvature_batch): "step" or "fixed:size=N,seed=S"
# (measure/curvature_batch.py), a string column beside them.
CURVATURE_BATCH = "curvature_batch"

# The next-batch identity of the previous update (measure.next_batch; measure/next_batch.py,
# docs/METRICS.md §Next-batch gap), on measured steps t whose Δ_{t−1} and x_{t−1} were kept: the
# raw f(x_{t−1}; B_t) and ⟨g_t, Δ_{t−1}⟩, then ℓ_t − f(x_{t−1}; B_t) and that gap minus the
# inner product (≤ 0 under convexity). ZQZCalin/trainit's `loss/fn-f(n-1)` and
# `update/<gn, xn-x(n-1)>` with their n = our t.
# With its noise floor (metrics.next_batch_floor) and class, like the same-batch gaps.
NEXT_BATCH_NAMES: tuple[str, ...] = (
    *NEXT_BATCH_RAW,
    "nb_loss_gap",
    "nb_convexity_gap",
    NEXT_BATCH_SCALE,
    "nb_noise_floor",
)
NEXT_BATCH_CLASS = "cls_nb_convexity"

# trainit's gradient-history cosine (measure.grad_history; measure/grad_history.py,
# docs/METRICS.md §Gradient history) on measured steps: ⟨g_t, S_t⟩, ‖S_t‖² and
# cos(g_t, S_t), S_t = Σ_{s<t} g_s over every step of the attempt.
GRAD_HISTORY_NAMES: tuple[str, ...] = (*GRAD_HISTORY_RAW, "cos_grad_history")

# The raw columns of a measured row (schema order): the probe's scalars, the totals over groups
# of every sum, the noise scale's raw term, the losses' rounding magnitudes, the per-tensor norms.
RAW_NAMES: tuple[str, ...] = PROBE_NAMES + SUM_NAMES + (NOISE_RAW,) + LOSS_SCALE_NAMES + TENSOR_NAMES
# The sums stored per parameter group on measured rows (the row's `groups` cell).
GROUP_SUM_NAMES: tuple[str, ...] = SUM_NAMES

# ------------------------------------------------------------------------------ derived metrics
# metrics.derive's float columns; their formulas are metrics.derive / metrics.group_metrics.
DERIVED_NAMES: tuple[str, ...] = (
    "loss_change",
    "convexity_gap_fwd",
    "convexity_gap_bwd",
    "trapezoid_residual",
    "smoothness_local",
    # the authors' L: Σ_i ‖g⁺_i − g_i‖ / Σ_i ‖sΔ_i‖ over parameter tensors i (TENSOR_NORM_OF)
    "smoothness_authors",
    "smoothness_descent",
    # its rounding band: 2·noise_floor/‖sΔ‖², the uncertainty of smoothness_descent
    "smoothness_descent_band",
    "curvature_secant",
    "step_alpha",
    "cos_grad_update",
    "cos_update_prev",
    "cos_grad_prev",
    "grad_norm",
    "update_norm",
    "param_norm",
    "update_to_param",
    "noise_floor",
)
# The inequality classes (metrics.classify) and their columns.
CLASSES: tuple[str, ...] = ("holds", "violated", "indeterminate")
CLASS_NAMES: tuple[str, ...] = ("cls_convexity_fwd", "cls_convexity_bwd")
FLAG = "flag"
# Everything metrics.derive returns, in its order.
OUTPUT_NAMES: tuple[str, ...] = DERIVED_NAMES + CLASS_NAMES + (FLAG,)
# The derived float columns of a measured row (schema order): derive's, minus the norms (every-step
# columns of their own), plus the noise scale.
ROW_DERIVED_NAMES: tuple[str, ...] = tuple(n for n in DERIVED_NAMES if n not in NORM_NAMES) + (NOISE_DERIVED,)

# The other fields of every step's row from StepMeasurer.end.
MEASURED = "measured"
LOSS_PRECISION = "loss_precision"
# the arithmetic of g and g⁺ of the row: "fp32" on measured steps with measure.fp32_grads
# (measure/fp32grad.py), else the training precision (docs/METRICS.md §Precision)
GRAD_PRECISION = "grad_precision"
GROUPS = "groups"

# ------------------------------------------------------------------------------- per trial
# The aggregates of the authors' code over a window (measure/authors.aggregate; docs/METRICS.md
# §Authors' aggregates): in the trial summary as authors_<name>.
AUTHORS_NAMES: tuple[str, ...] = (
    "n",
    "gap_mean",
    "gap_ema99",
    "gap_ema9999",
    "linear_over_loss_gap",
    "convexity_excess",
    "smoothness_max",
    "smoothness_ema99",
    "smoothness_ema9999",
)
# metrics.summarize's statistics (docs/METRICS.md §Aggregates).
SUMMARY_NAMES: tuple[str, ...] = (
    "n_measured",
    "n_flagged",
    *(f"frac_convexity_{side}_{c}" for side in ("fwd", "bwd") for c in CLASSES),
    "smoothness_local_median",
    "smoothness_local_max",
    "smoothness_ratio",
    *(f"authors_{k}" for k in AUTHORS_NAMES),
    # over the rows with a value (metrics.summarize): the median over the last quarter of them
    # (the late phase of the edge-of-stability readings) and the max
    "sharpness_late_median",
    "sharpness_max",
    "sharpness_precond_late_median",
    "critical_sharpness_late_median",
)
