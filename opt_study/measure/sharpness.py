"""Online curvature on a curvature step, on this rank's shard (docs/METRICS.md §Online curvature).

Every quantity is of f(·; B_t), the loss on step t's own micro-batches with step t's dropout
masks, around x_t, the point step t took its gradient at; with ``measure.curvature_batch:
{size, seed}`` B_t is instead the fixed curvature batch with its fixed masks (curvature_batch.py),
the same at every curvature step, for all three quantities (λc's line search included):

- ``sharpness``: λ_max of the Hessian by Lanczos (curvature.lanczos with a window of 2 basis
  vectors: memory a constant number of partitions) on Hessian-vector products by central
  differences of gradients (curvature.fd_hvp). Each gradient is the same-batch probe
  (probe.run_probe) at a point x_t ± εv written into the shards (ShardView.write_params).
- ``sharpness_precond`` (``measure.preconditioned_sharpness``, Adam family): λ_max(P⁻¹H) with
  P = diag(√v̂) + ε from the optimizer's second moment, v̂ = v/(1 − β2^k) (Cohen et al. 2022,
  https://arxiv.org/abs/2207.14484), by the same Lanczos on the symmetric P^{-1/2} H P^{-1/2}
  (same eigenvalues as P⁻¹H); null for an optimizer without ``exp_avg_sq``.
- ``critical_sharpness``: λc = 2/ηc of Kalra et al. 2026 (https://arxiv.org/abs/2601.16979):
  ηc the step along the update direction d_t = −Δ_t/η_t at which the loss stops decreasing,
  found by curvature.critical_step on forwards only (probe.run_forward) at x_t + τΔ_t.

Lanczos vectors are this rank's parts (float64), inner products are local dots plus SUM
all-reduces through opt_study.distributed. Afterwards x_{t+1} is written back exactly as the probe
with s ≠ 1 does (ShardView.write_params, bit-for-bit: the low-precision weights are the same
round-to-nearest copy of the same fp32 masters step() made), and every probe and forward restores
the engine's gradient state, buffers and RNG, so the trajectory does not change.
"""

from __future__ import annotations

import random
import time

import torch

from opt_study import distributed
from opt_study.measure import curvature
from opt_study.measure import deepspeed_state as ds
from opt_study.measure import probe as probe_mod
from opt_study.measure.shards import FlatShard, flatten

# ε of the central differences, relative to max(‖x‖, 1): the replay's measured default
# (curvature.py: 3e-6 to 3e-4 agreed within 4e-4 on mlp_classify; ReLU kinks forbid larger).
FD_EPS = 3e-5
LANCZOS_WINDOW = 2  # basis vectors kept: three-term Lanczos, constant memory


class StepObjective:
    """f(·; B_t) through the engine, at points given as this rank's flat fp32 parts."""

    def __init__(self, engine, view, zero_stage: int, batches, rng_states, loss_fn, sizes):
        self.engine, self.view, self.stage = engine, view, zero_stage
        self.batches, self.rng_states, self.loss_fn, self.sizes = batches, rng_states, loss_fn, sizes

    def write(self, point: torch.Tensor) -> None:
        self.view.write_params(FlatShard(point.float(), self.sizes))

    def grad_at(self, point: torch.Tensor) -> torch.Tensor:
        """∇f(point; B_t), this rank's flat part (collective: every rank calls it together)."""
        self.write(point)
        _, g = probe_mod.run_probe(self.engine, self.view, self.batches, self.rng_states, self.loss_fn, self.stage)
        return g.flat

    def loss_at(self, point: torch.Tensor) -> float:
        """f(point; B_t), the mean over every rank's micro-batches (one all-reduce)."""
        self.write(point)
        local = probe_mod.run_forward(self.engine, self.batches, self.rng_states, self.loss_fn)
        total = (local / distributed.world_size()).reshape(1)
        distributed.all_reduce_sum(total)
        return float(total[0])  # host sync: the line search's decision is a Python one


def start_vector(n: int, seed: int, step: int, rank: int, device) -> torch.Tensor:
    """This rank's part of the Lanczos start vector: i.i.d. normal entries from a private stream
    of (trial seed, step, rank), so the global vector is i.i.d. whatever the partition and the
    training RNG is never touched."""
    gen = torch.Generator().manual_seed(random.Random(f"opt_study.sharpness:{seed}:{step}:{rank}").getrandbits(63))
    return torch.randn(n, generator=gen, dtype=torch.float64).to(device)


def sharpness(obj: StepObjective, x_t: FlatShard, steps: int, v0: torch.Tensor) -> tuple[float, int]:
    """(λ_max of ∇²f(x_t; B_t), Lanczos steps taken)."""
    reduce = distributed.all_reduce_sum
    x = x_t.flat.double()
    eps = FD_EPS * max(curvature.global_norm(x, reduce), 1.0)
    ritz, k = curvature.lanczos(curvature.fd_hvp(obj.grad_at, x, eps), v0, steps, reduce, LANCZOS_WINDOW)
    return float(ritz[0]), k


def preconditioner_root(engine, view, sizes) -> torch.Tensor | None:
    """P^{-1/2} on this rank's part (float64), P = diag(√v̂) + ε, v̂ = v/(1 − β2^k) (Cohen et al.
    2022, https://arxiv.org/abs/2207.14484); None on every rank when any rank lacks Adam's second
    moment (one MAX all-reduce makes the decision common, so every rank joins the same Lanczos)."""
    hyper = ds.adam_second_moment_hyper(engine)
    frags = view.optim_state("exp_avg_sq") if hyper is not None else None
    v = flatten(frags) if frags is not None else None
    missing = torch.tensor([float(v is None or v.sizes != tuple(sizes))], dtype=torch.float64)
    distributed.all_reduce_max(missing)
    if missing.item():  # host sync: whether to measure is a Python decision
        return None
    beta2, eps, k = hyper
    p = (v.flat.double() / (1.0 - beta2**k)).sqrt() + eps
    return p.rsqrt()


def preconditioned_sharpness(obj: StepObjective, x_t: FlatShard, steps: int, v0: torch.Tensor, root) -> float:
    """λ_max(P⁻¹H) = λ_max(P^{-1/2} H P^{-1/2}) at x_t (``root`` = P^{-1/2}): Lanczos on
    v ↦ r ⊙ H(r ⊙ v), each H(u) as ‖u‖·H(u/‖u‖) so the difference step stays ε along a unit
    vector however P scales u."""
    reduce = distributed.all_reduce_sum
    x = x_t.flat.double()
    hvp = curvature.fd_hvp(obj.grad_at, x, FD_EPS * max(curvature.global_norm(x, reduce), 1.0))

    def op(v: torch.Tensor) -> torch.Tensor:
        u = root * v
        n = curvature.global_norm(u, reduce)
        return root * (n * hvp(u / n)) if n > 0 else torch.zeros_like(v)

    ritz, _ = curvature.lanczos(op, v0, steps, reduce, LANCZOS_WINDOW)
    return float(ritz[0])


def critical_sharpness(obj: StepObjective, x_t: FlatShard, delta: FlatShard, lr: float, forwards: int) -> float | None:
    """λc = 2/ηc along d_t = −Δ_t/η_t: the line search runs in τ = η/η_t on x_t + τΔ_t (τ = 1 is
    the real update), so ηc = τc·η_t. None without a positive lr or a bracket in the budget."""
    if not lr or lr <= 0:
        return None
    tau_c, _ = curvature.critical_step(lambda tau: obj.loss_at(torch.add(x_t.flat, delta.flat, alpha=tau)), forwards)
    return None if tau_c is None or tau_c <= 0 else 2.0 / (tau_c * lr)


def measure(engine, view, zero_stage: int, step_data, x_t: FlatShard, delta: FlatShard, lr, cfg, ids) -> dict:
    """The curvature columns of a curvature step (names.CURVATURE_NAMES); every rank calls it.

    ``step_data`` = (micro-batches, their RNG states, loss_fn through the engine); ``cfg`` the
    MeasureConfig (lanczos_steps, critical_forwards); ``ids`` = (trial seed, step, rank). The
    model holds x_{t+1} before and after."""
    batches, rng_states, loss_fn = step_data
    obj = StepObjective(engine, view, zero_stage, batches, rng_states, loss_fn, x_t.sizes)
    x_next = flatten(view.params())  # x_{t+1} exactly, to restore
    t0 = time.perf_counter()
    out: dict = {"sharpness": None, "sharpness_precond": None, "critical_sharpness": None}
    try:
        v0 = start_vector(x_t.flat.numel(), *ids, device=x_t.flat.device)
        if cfg.lanczos_steps:
            out["sharpness"], _ = sharpness(obj, x_t, cfg.lanczos_steps, v0)
        root = (
            preconditioner_root(engine, view, x_t.sizes) if cfg.lanczos_steps and cfg.preconditioned_sharpness else None
        )
        if root is not None:
            out["sharpness_precond"] = preconditioned_sharpness(obj, x_t, cfg.lanczos_steps, v0, root)
        if cfg.critical_forwards:
            out["critical_sharpness"] = critical_sharpness(obj, x_t, delta, lr, cfg.critical_forwards)
    finally:
        view.write_params(x_next)
    out["curvature_time_s"] = time.perf_counter() - t0
    return out
