"""The fixed curvature batch (``measure.curvature_batch: {size: N, seed: S}``, docs/METRICS.md
§Online curvature): the batch every curvature quantity is measured on instead of the step's own.

Cohen et al. 2021 (https://arxiv.org/abs/2103.00065, §2 and App. B) measure λ_max on one fixed
subset of the training set, so the sharpness series has no batch-to-batch noise and two steps'
values differ only because x moved. Here the subset is drawn once per trial:

- the N samples are the workload's own training batch of a *virtual* step VIRTUAL_STEP + S,
  ``train_batch(VIRTUAL_STEP + S, 0, N)``: a pure function of (trial seed, S) like every training
  batch (workloads/base.py), past any real step (training.steps ≤ 1e9 < 2^32), so it neither
  reads nor advances the training stream and never repeats a training batch's draw;
- rank r of W takes rows [rN/W, (r+1)N/W) and cuts them into grad_accum equal micro-batches (the
  config refuses an N not divisible by W x grad_accum): the probe's loss, a mean of micro-batch
  means averaged over ranks, is then the mean over all N rows whatever W, so a sharded
  measurement equals the single-process one on the same global batch;
- each micro-batch's forward replays an RNG state from a private stream of (S, rank, micro-batch):
  fixed dropout masks at every curvature step, without touching the training RNG. Dropout masks
  (and BatchNorm's batch statistics) depend on the partition, so with either the value is fixed
  across steps but not identical across world sizes.
"""

from __future__ import annotations

import random

import torch

from opt_study.config.measure import batch_label
from opt_study.measure import probe

label = batch_label  # the curvature_batch column's value: one definition, in config.measure
VIRTUAL_STEP = 2**32  # the fixed batch is step VIRTUAL_STEP + S's draw: no real step reaches it


def rows(size: int, rank: int, world: int, grad_accum: int) -> list[slice]:
    """This rank's micro-batches as row slices of the global batch of ``size`` rows."""
    per_rank = size // world
    per_micro = per_rank // grad_accum
    if per_micro * grad_accum * world != size:
        raise ValueError(f"curvature batch of {size} rows does not split into {world} x {grad_accum} micro-batches")
    return [slice(rank * per_rank + m * per_micro, rank * per_rank + (m + 1) * per_micro) for m in range(grad_accum)]


def draw(workload, fixed, rank: int, world: int, scale, device) -> tuple[list, list] | None:
    """(this rank's micro-batches on ``device``, their RNG states) of the fixed batch, or None
    for ``measure.curvature_batch: step``; ``scale`` is the ScaleConfig (its grad_accum). Called
    once per trial, before training. Every tensor of a batch holds its samples along dim 0."""
    if fixed is None:
        return None
    grad_accum = scale.grad_accum
    whole = workload.train_batch(VIRTUAL_STEP + fixed.seed, 0, fixed.size)
    batches = [tuple(t[s].to(device) for t in whole) for s in rows(fixed.size, rank, world, grad_accum)]
    return batches, [_rng_state(fixed.seed, rank, m) for m in range(grad_accum)]


def _rng_state(seed: int, rank: int, micro: int) -> tuple:
    """The RNG state micro-batch ``micro``'s forward replays (probe.set_rng_state), made in a fork
    so the global generators are as they were."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(random.Random(f"opt_study.curvature_batch:{seed}:{rank}:{micro}").getrandbits(63))
        return probe.rng_state()
