"""The `measure` slice of a study: what is measured beyond the loss (docs/METRICS.md), and the
fixed curvature batch (`measure.curvature_batch`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from opt_study.config.errors import FieldError


@dataclass(frozen=True)
class MeasureConfig:
    every: int = 0  # measured-step cadence k; 0 = off (loss, lr and the norms are always recorded)
    # the probe point x_t + s*Δ_t: "1" (x_{t+1}), "uniform" (s ~ U[0,1]) or "exponential"
    # (s ~ Exp(1)); s is drawn per (trial seed, step) and stored in `probe_s` (docs/METRICS.md §Notation)
    probe_s: str = "1"
    norms: bool = True  # every step: ‖g‖, ‖Δ‖, ‖x‖ from the shards (off: loss and lr only)
    noise_scale: bool = False  # B_simple from per-rank micro-batch gradients (needs ranks x GAS >= 2)
    # fp32 parameter snapshots for checkpoint replay (opt_study.trial.snapshots): x_0, every
    # k-th iterate and the last one; 0 = none. Each rank writes its own shard to the study dir.
    snapshot_every: int = 0
    # user metrics, by import path (mypkg.metrics:fn) or entry-point name (group opt_study.metrics):
    # each is evaluated on measured steps and stored in the `extra` map column (opt_study.measure.extra)
    extra: tuple[str, ...] = ()
    # online curvature cadence k: every k-th step (a measured step) also measures the sharpness
    # λ_max (Lanczos) and the critical sharpness λc on the step's batch (or curvature_batch); 0 or null = off
    # (docs/METRICS.md §Online curvature)
    curvature_every: int | None = 0
    # the batch every curvature quantity (λ_max, λ_max(P⁻¹H), λc's line search) is measured on:
    # "step" (the step's own batch) or {size: N, seed: S}, a fixed batch of N training samples
    # drawn once per trial from (trial seed, S) and used at every curvature step, as Cohen et al.
    # 2021 measure on a fixed subset (N divisible by workers x grad_accum; S defaults to 0)
    curvature_batch: Any | str = "step"
    # Lanczos steps per sharpness measurement (2 gradient evaluations each); 0 = no λ_max
    lanczos_steps: int = 20
    # forward passes of the critical-sharpness line search (at least 3); 0 = no λc
    critical_forwards: int = 10
    # also λ_max(P⁻¹H), P = diag(√v̂) + ε from Adam's second moment (another 2·lanczos_steps
    # gradient evaluations; null for optimizers without one)
    preconditioned_sharpness: bool = False
    # on measured steps t, the next-batch identity of the previous update (ZQZCalin/trainit):
    # f(x_t; B_t) − f(x_{t−1}; B_t) and ⟨g_t, x_t − x_{t−1}⟩ in the nb_* columns; costs one forward
    # at x_{t−1} per measured step and keeps x_{t−1} (docs/METRICS.md §Next-batch gap)
    next_batch: bool = False
    # on measured steps, trainit's gradient-history cosine cos(g_t, Σ_{s<t} g_s) over every step
    # of the attempt; keeps the running gradient sum (docs/METRICS.md §Gradient history)
    grad_history: bool = False
    # under bf16/fp16, g_t and g⁺_t of measured steps from fp32 backwards at the fp32 master
    # points (as the losses already are), so the noise floor is the fp32 one: "auto" (on under
    # bf16/fp16 at ZeRO 0-2; off in fp32, where it would only repeat the gradient, and at ZeRO-3,
    # where it holds the whole model in fp32 per rank), true or false (docs/METRICS.md §Precision)
    fp32_grads: str | bool = "auto"

    PROBE_S = ("1", "uniform", "exponential")

    def __post_init__(self):
        if self.every < 0:
            raise FieldError("every", "must be >= 0 (0 turns measurement off)")
        if (
            isinstance(self.snapshot_every, bool)
            or not isinstance(self.snapshot_every, int)
            or not 0 <= self.snapshot_every <= 10**9
        ):
            raise FieldError("snapshot_every", "must be an integer in [0, 1e9] (0 saves no snapshots)")
        if len(set(self.extra)) != len(self.extra):
            raise FieldError("extra", "names a metric twice")
        self._check_curvature()
        if not isinstance(self.next_batch, bool):
            raise FieldError("next_batch", "must be true or false")
        if not isinstance(self.grad_history, bool):
            raise FieldError("grad_history", "must be true or false")
        if not (isinstance(self.fp32_grads, bool) or (isinstance(self.fp32_grads, str) and self.fp32_grads == "auto")):
            raise FieldError("fp32_grads", f'must be "auto", true or false, got {self.fp32_grads!r:.60}')
        if self.probe_s not in self.PROBE_S:
            raise FieldError(
                "probe_s", f"must be one of {', '.join(repr(v) for v in self.PROBE_S)} (the probe point x_t + s*Δ_t)"
            )

    def _check_curvature(self) -> None:
        k = 0 if self.curvature_every is None else self.curvature_every
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 10**9:
            raise FieldError("curvature_every", "must be an integer in [0, 1e9] or null (0/null: no curvature)")
        object.__setattr__(self, "curvature_every", k)  # null means off: one value for off
        for name, lo, hi in (("lanczos_steps", 0, 1000), ("critical_forwards", 0, 100)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise FieldError(name, f"must be an integer in [{lo}, {hi}]")
        if self.lanczos_steps == 1:
            raise FieldError("lanczos_steps", "must be 0 (off) or at least 2")
        if 0 < self.critical_forwards < 3:
            raise FieldError("critical_forwards", "must be 0 (off) or at least 3 (φ(0), a bracket, a refinement)")
        if k and not (self.lanczos_steps or self.critical_forwards):
            raise FieldError("curvature_every", "needs lanczos_steps or critical_forwards above 0")
        object.__setattr__(self, "curvature_batch", _curvature_batch(self.curvature_batch))
        if self.curvature_batch is not None and not k:
            raise FieldError("curvature_batch", "a fixed curvature batch needs curvature_every above 0")


@dataclass(frozen=True)
class CurvatureBatch:
    """measure.curvature_batch as a fixed batch: N global training samples from stream S."""

    size: int
    seed: int = 0

    @property
    def label(self) -> str:
        """The ``curvature_batch`` column's value (results/schema.py)."""
        return f"fixed:size={self.size},seed={self.seed}"


def _curvature_batch(value: Any) -> CurvatureBatch | None:
    """measure.curvature_batch normalised: None for "step", else a CurvatureBatch."""
    if value is None or value == "step" or isinstance(value, CurvatureBatch):
        return value if isinstance(value, CurvatureBatch) else None
    if not isinstance(value, Mapping):
        raise FieldError("curvature_batch", f'must be "step" or a mapping {{size: N, seed: S}}, got {value!r:.60}')
    unknown = sorted(set(value) - {"size", "seed"})
    if unknown:
        raise FieldError(f"curvature_batch.{str(unknown[0])[:60]}", "unknown key (allowed: seed, size)")
    if "size" not in value:
        raise FieldError("curvature_batch.size", "is required: the fixed batch's number of samples")
    size, seed = value["size"], value.get("seed", 0)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 10**6:
        raise FieldError("curvature_batch.size", f"must be an integer in [1, 1000000], got {size!r:.60}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise FieldError("curvature_batch.seed", f"must be an integer in [0, 2**31), got {seed!r:.60}")
    return CurvatureBatch(size, seed)


def batch_label(fixed: CurvatureBatch | None) -> str:
    """The ``curvature_batch`` column's value (and the study's MLflow param): "step" for the
    step's own batch, else "fixed:size=N,seed=S"."""
    return "step" if fixed is None else fixed.label
