"""The same-batch probe: forward + backward at p on step t's batch, leaving training untouched.

docs/METRICS.md §Probe contract: ℓ⁺_t = f(p; B_t), g⁺_t = ∇f(p; B_t) with the same micro-batches
and the same dropout masks as step t's forward; the weights already hold p = x_t + sΔ_t when this
runs (the hook sets and restores p for s ≠ 1). docs/STACK.md §The same-batch probe: measured on
DeepSpeed 0.19.8 (2 CPU ranks, ZeRO 0-3, GAS 1 and 2, dropout) that this sequence leaves a run
bit-for-bit identical to one that never probes;
tests/multirank/test_multirank.py re-checks it (s = 1, s ~ U[0, 1], fp32 and bf16), and snapshots the
engine around a probe. What each restore step prevents (docs/STACK.md ablations): without zero_grad
at ZeRO-0/3 the probe's gradient leaks into the next step; without resetting the boundary
override every micro-batch becomes a step; without replaying RNG states the probe sees other
dropout masks. The engine internals the restore touches are deepspeed_state.restore_after_probe.
"""

from __future__ import annotations

import random

import torch

from opt_study.measure import deepspeed_state as ds


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
    """Returns (this rank's mean probe loss over its micro-batches as a float64 0-dim tensor on
    the loss's device, cloned g⁺ fragments)."""
    after = rng_state()
    # The probe's train-mode forward updates module buffers (BatchNorm running statistics and
    # counters); keep them and put them back, so measuring never changes the evaluated model.
    buffers = [(b, b.detach().clone()) for b in engine.module.buffers()]
    n = len(batches)
    total = None  # summed on the device in float64: the same value as a Python float sum
    g_plus = None
    for m, (batch, st) in enumerate(zip(batches, rng_states)):
        # Force the accumulation boundary exactly where step t had it, so ZeRO reduces the
        # probe's gradient into the same partitioned buffers the shard view reads.
        ds.set_accumulation_boundary(engine, m == n - 1)
        set_rng_state(st)
        loss = loss_fn(batch)
        engine.backward(loss)
        term = loss.detach().double().reshape(())
        total = term if total is None else total + term
        if m == n - 1:
            g_plus = view.clone_grads()
    ds.restore_after_probe(engine, zero_stage)
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)
    set_rng_state(after)
    return total / n, g_plus


def run_forward(engine, batches, rng_states, loss_fn):
    """This rank's mean loss over step t's micro-batches at the weights the engine holds now, by
    forwards only (no backward, no gradient state touched), as a float64 0-dim tensor on the
    loss's device. Same masks and the same restores as ``run_probe``: each micro-batch's forward
    replays its RNG state; module buffers and the RNG state are put back afterwards."""
    after = rng_state()
    buffers = [(b, b.detach().clone()) for b in engine.module.buffers()]
    total = None
    with torch.no_grad():
        for batch, st in zip(batches, rng_states):
            set_rng_state(st)
            term = loss_fn(batch).detach().double().reshape(())
            total = term if total is None else total + term
        for b, saved in buffers:
            b.copy_(saved)
    set_rng_state(after)
    return total / len(batches)


def draw_s(probe_s: str, seed: int, step: int) -> float:
    """s of step t's probe (measure.probe_s): from a stream seeded by (trial seed, step) alone,
    so a resumed trial draws the same s and the training RNG is never touched."""
    if probe_s == "1":
        return 1.0
    rng = random.Random(f"opt_study.probe_s:{seed}:{step}")  # str seeds hash with SHA-512
    if probe_s == "uniform":
        return rng.random()
    return rng.expovariate(1.0)
