"""The same-batch probe: forward + backward at p on step t's batch, leaving training untouched.

METRICS.md: ℓ⁺_t = f(p; B_t), g⁺_t = ∇f(p; B_t) with the same micro-batches and the same dropout
masks as step t's forward; the weights already hold p = x_t + sΔ_t when this runs (the hook sets
and restores p for s ≠ 1). STACK.md measured on DeepSpeed 0.19.8 (2 CPU ranks, ZeRO 0-3, GAS 1
and 2, dropout) that this sequence leaves a run bit-for-bit identical to one that never probes;
tests/multirank/test_multirank.py re-checks it (s = 1, s ~ U[0, 1], fp32 and bf16), and snapshots the
engine around a probe. What each restore step prevents (STACK.md ablations): without zero_grad
at ZeRO-0/3 the probe's gradient leaks into the next step; without resetting the boundary
override every micro-batch becomes a step; without replaying RNG states the probe sees other
dropout masks.
"""
from __future__ import annotations

import torch


def rng_state() -> tuple:
    """The RNG state a forward will consume (CPU and, on GPU, the current CUDA generator)."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def run_probe(engine, view, batches, rng_states, loss_fn, zero_stage: int):
    """Returns (this rank's mean probe loss over its micro-batches, cloned g⁺ fragments)."""
    after = rng_state()
    # The probe's train-mode forward updates module buffers (BatchNorm running statistics and
    # counters); keep them and put them back, so measuring never changes the evaluated model.
    buffers = [(b, b.detach().clone()) for b in engine.module.buffers()]
    n = len(batches)
    total = 0.0
    g_plus = None
    for m, (batch, st) in enumerate(zip(batches, rng_states)):
        # Force the accumulation boundary exactly where step t had it, so ZeRO reduces the
        # probe's gradient into the same partitioned buffers the shard view reads.
        engine.set_gradient_accumulation_boundary(m == n - 1)
        set_rng_state(st)
        loss = loss_fn(batch)
        engine.backward(loss)
        total += float(loss.detach())
        if m == n - 1:
            g_plus = view.clone_grads()
    _restore(engine, zero_stage)
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)
    set_rng_state(after)
    return total / n, g_plus


def _restore(engine, zero_stage: int) -> None:
    """Put the engine back exactly as step() left it (gradient buffers, counters, boundary).

    Dispatches on the stage DeepSpeed really runs. ZeRO-1 with bf16 is DeepSpeed's
    BF16_Optimizer: its zero_grad(set_to_none) clears its lp grads and zeroes its fp32
    accumulation buffers, as its step() leaves them; it has no micro_step_id (setting one would
    add state that a run without the probe lacks).
    """
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else zero_stage
    if stage == 0:
        engine.zero_grad()
    else:
        zo = engine.optimizer
        zo.zero_grad(set_to_none=True)
        for k in list(getattr(zo, "averaged_gradients", {}) or {}):
            zo.averaged_gradients[k] = None
        if stage in (1, 2):
            for k in list(getattr(zo, "all_grad_tensors", {}) or {}):
                zo.all_grad_tensors[k] = None
            if hasattr(zo, "micro_step_id"):
                zo.micro_step_id = -1
    engine.set_gradient_accumulation_boundary(None)  # the override is sticky otherwise
