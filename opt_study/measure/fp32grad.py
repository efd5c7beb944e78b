"""fp32 loss AND gradient at an fp32 master point, for measured steps under bf16/fp16
(measure.fp32_grads; docs/METRICS.md §Precision).

Why: fp32eval.py already re-evaluates ℓ_t and ℓ⁺_t in fp32 at the fp32 points, but g_t and g⁺_t
of a bf16 trial come from a bf16 backward at bf16-rounded weights x̃ (|x̃_i − x_i| ≤ u|x_i|,
u = 2^-8; Higham 2002, §2.2). The noise floor must then carry u_bf16·‖g⁺ − g‖·(2‖x‖ + ‖sΔ‖) and
u_bf16·(Σ|g||x| + Σ|g⁺||p|) (metrics.noise_floor), which on a non-convex MLP were 17-222× the
convexity gap: every step `indeterminate`. A gradient computed in fp32 at the fp32 point has
the fp32 floor's terms only (u = 2^-24, r_G = 0 for s = 1).

What ``loss_and_grad`` computes: this rank's mean fp32 loss over its micro-batches of step t, and
this rank's fragments (a shards.FlatShard laid out as ``ShardView.params()`` / ``bounds()``) of

    g = 1/(A·W) · Σ_{ranks r} Σ_{micro-batches m} ∇ℓ_{r,m}(point)

the same mean DeepSpeed's reduced gradient g_t is (loss scaled by 1/A per micro-batch, averaged
over the W data-parallel ranks), unclipped (DeepSpeed clips inside step(), after the hook read
g_t). Every ℓ_{r,m} replays step t's RNG state, so its dropout masks are step t's.

How, reusing fp32eval's pieces: the point's parameters are assembled whole on every rank
(fp32eval._Fp32Point.full: one SUM all-reduce of this rank's fragment in a zero buffer per
parameter), as NEW fp32 leaf tensors with requires_grad; the forward is the workload's
``model_loss_fn(module, batch)`` run through ``torch.func.functional_call`` with those leaves in
place of the module's parameters (tied parameters stay tied), autocast off and full-fp32 matrix
products (fp32eval._autocast_off), DeepSpeed's module forward hooks detached
(deepspeed_state.without_deepspeed_forward_hooks); the gradient is ``torch.autograd.grad`` with
respect to the leaves. So the engine's parameters, their ``.grad``, their ``.data`` and
DeepSpeed's gradient hooks (which hang on the parameters' AccumulateGrad nodes, never reached
by a graph whose leaves are other tensors) are not touched: training stays bit-for-bit the same
(tests/unit/test_fp32_grads.py). The gradient sum over ranks is one all-reduce of the flat fp32
gradient (distributed.all_reduce_sum); afterwards the RNG state and the module buffers are put
back.

Memory, stated plainly: per rank, one full fp32 copy of the trainable parameters, one full fp32
gradient vector and the autograd graph of one micro-batch in fp32, while it runs. At ZeRO 0-2
the bf16 weights are replicated already, so this is 2× (parameters) + 2× (gradient) the bf16
model, the same order as the training step's own. At ZeRO-3 it is the whole unsharded model in
fp32 on every rank, what ZeRO-3 exists to avoid: ``enabled`` leaves it off there under ``auto``,
and ``true`` turns it on knowingly. Frozen parameters and floating buffers stay as the engine
holds them (bf16), as in fp32eval.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from opt_study import distributed
from opt_study.measure import deepspeed_state as ds
from opt_study.measure import fp32eval
from opt_study.measure import probe as probe_mod
from opt_study.measure.shards import FlatShard, flatten

FP32_GRADS = ("auto", True, False)  # measure.fp32_grads


def enabled(option, precision: str, zero_stage: int) -> bool:
    """measure.fp32_grads resolved for a trial: ``auto`` is on under bf16/fp16 at ZeRO 0-2 (where
    the bf16 backward makes the floor vacuous) and off in fp32 (the training gradient is
    already the fp32 gradient: recomputing it would only cost a backward) and at ZeRO-3 (the
    memory above); ``true`` is on under bf16/fp16 at every stage (a no-op in fp32)."""
    if precision not in ("bf16", "fp16") or option is False:
        return False
    return option is True or zero_stage != 3


class _Call(torch.nn.Module):
    """``fn(inner, batch)`` as a module's forward, so functional_call can run the workload's
    loss (which calls the model itself) with other tensors for ``inner``'s parameters."""

    def __init__(self, inner: torch.nn.Module, fn):
        super().__init__()
        self.inner, self.fn = inner, fn

    def forward(self, batch):
        return self.fn(self.inner, batch)


def loss_and_grad(
    engine, view, frags, batches: list, rng_states: list, model_loss_fn
) -> tuple[torch.Tensor, FlatShard]:
    """(this rank's mean fp32 loss over ``batches`` as a float64 0-dim tensor on the engine's
    device, this rank's fragments of the fp32 gradient g of the module docstring) at the point
    whose fragments on this rank are ``frags``. Collective: every rank calls it with its own
    fragments and micro-batches. Leaves the engine, the RNG streams and the module buffers as
    they were."""
    module = engine.module
    point = fp32eval._Fp32Point(view, frags)
    with torch.no_grad():
        leaves = [point.full(p).detach().requires_grad_(True) for _, p in view.named]
    wrapper = _Call(module, model_loss_fn)
    params = {f"inner.{name}": leaf for (name, _), leaf in zip(view.named, leaves)}
    numels = [leaf.numel() for leaf in leaves]
    flat = torch.zeros(sum(numels), dtype=torch.float32, device=engine.device)
    parts = flat.split(numels)
    after = probe_mod.rng_state()
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    total = torch.zeros((), dtype=torch.float64, device=engine.device)
    try:
        with ds.without_deepspeed_forward_hooks(module), fp32eval._autocast_off(engine.device):
            with torch.enable_grad():
                for batch, st in zip(batches, rng_states):
                    probe_mod.set_rng_state(st)  # step t's dropout masks
                    loss = functional_call(wrapper, params, (batch,)).float()
                    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                    with torch.no_grad():
                        for dst, g in zip(parts, grads):
                            if g is not None:
                                dst.add_(g.reshape(-1))
                    total += loss.detach().double().reshape(())
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        probe_mod.set_rng_state(after)
    distributed.all_reduce_sum(flat)  # Σ over ranks of each rank's Σ over its micro-batches
    flat /= len(batches) * view.world  # the mean over A·W micro-batches, as DeepSpeed's g_t
    bounds = view.bounds()
    return total / max(len(batches), 1), flatten([part[lo:hi] for part, (lo, hi) in zip(parts, bounds)])


def probe(m, s: float, delta: FlatShard, losses: torch.Tensor, slot: dict, model_loss_fn, loss_fn) -> FlatShard:
    """The measured step's probe with fp32 gradients, on the measurer ``m`` (hook.StepMeasurer):
    ℓ_t, g_t at x_t and ℓ⁺_t, g⁺_t at p = x_t + sΔ_t (s = 1: the masters x_{t+1} themselves),
    all from ``loss_and_grad``, with their rounding magnitudes M, M⁺ (lossscale, the same
    forwards). Fills this rank's shares into ``losses`` at ``slot``; replaces ``m.g_t`` by the
    fp32 g_t (every sum of the step then reads it; ``m.g_train`` keeps the training gradient)
    and sets ``m.grad_precision`` = "fp32". Returns g⁺. No weight is written (the point is
    handed over as fragments, also for s ≠ 1), and no engine forward or backward runs, except
    at ZeRO-3 on a curvature step: the critical sharpness's engine forwards without a backward
    leave ZeRO-3 parameters gathered, which the engine probe's forward + backward used to
    release (found by the multi-rank harness's engine snapshot), so that probe still runs there,
    at x_{t+1}, with its results discarded (probe.run_probe restores everything else)."""
    if m.info.zero_stage == 3 and m.cadence.curvature(m.step):
        probe_mod.run_probe(m.engine, m.view, m.batches, m.rng_states, loss_fn, 3)
    at = m.view.params() if s == 1.0 else FlatShard(torch.add(m.x_t.flat, delta.flat, alpha=s), m.x_t.sizes)
    ev = (m.engine, m.view)
    (loss_p, g_plus), scale_p = m._captured(loss_and_grad, *ev, at, m.batches, m.rng_states, model_loss_fn)
    (loss_t, g_t), scale = m._captured(loss_and_grad, *ev, m.x_t, m.batches, m.rng_states, model_loss_fn)
    world = m.info.world_size
    losses[slot["loss"]] = loss_t / world
    losses[slot["loss_probe"]] = loss_p / world
    for name, value in (("loss_scale", scale), ("loss_probe_scale", scale_p)):
        if value is not None:
            losses[slot[name]] = value / world
    m.g_t, m.grad_precision = g_t, "fp32"
    return g_plus
