"""The next-batch identity of the previous update (docs/METRICS.md §Next-batch gap).

The authors' later code, ZQZCalin/trainit (https://github.com/ZQZCalin/trainit), logs at its
iteration n, on the batch z_n it trains on, with x_{n−1} kept from the iteration before:

    loss/fn-f(n-1)         = f(x_n, z_n) − f(x_{n−1}, z_n)          loggers/demo.py line 249
    update/<gn, xn-x(n-1)> = ⟨∇f(x_n, z_n), x_n − x_{n−1}⟩          loggers/demo.py line 236

f(x_{n−1}, z_n) is one extra forward at the kept x_{n−1} on z_n (_src/train/train_lm.py lines
86-97; the PyTorch pipeline, experiments/train_neurips_pipeline.py lines 441-458 and 487-491,
the same, there in train mode with fresh dropout masks; here f(·; B_t) is one function: step t's
own masks, replayed). This is the online-learning identity: the update Δ_{n−1} = x_n − x_{n−1} was chosen before
z_n was seen, and f(x_n, z_n) − f(x_{n−1}, z_n) ≤ ⟨∇f(x_n, z_n), Δ_{n−1}⟩ for convex f(·, z_n).

Their n is our step t: on a measured step t (with measure.next_batch) the hook holds x_t, g_t and
ℓ_t of the training step itself, and Δ_{t−1} and x_{t−1} kept from step t−1 (hook.StepMeasurer,
_keep_prev). So the row of step t carries the identity of the *previous* update on *this* step's
batch; it needs one forward at x_{t−1} on B_t (``loss_at``) and one dot (``ip_partial``), both
joining the step's ONE all-reduce as two scalars of names.LOSS_NAMES.
"""

from __future__ import annotations

import math

import torch

from opt_study.measure import fp32eval, metrics
from opt_study.measure import probe as probe_mod
from opt_study.measure.names import NEXT_BATCH_CLASS, NEXT_BATCH_RAW, NEXT_BATCH_SCALE, SUM_NAMES
from opt_study.measure.shards import FlatShard, flatten
from opt_study.measure.sums import flat_sums, group_runs


def loss_at(engine, view, x_prev: FlatShard, batches, rng_states, loss_fn, model_loss_fn=None) -> torch.Tensor:
    """This rank's mean loss f(x_{t−1}; B_t) over step t's micro-batches with step t's dropout masks
    (float64 0-dim tensor on the loss's device). Collective: every rank calls it.

    ``model_loss_fn`` given: fp32eval's fp32 forward at the fp32 point, with DeepSpeed's hooks
    detached and nothing written. The hook passes it for bf16/fp16 trials, whose measured ℓ_t is
    an fp32 re-evaluation, and at ZeRO-3: a forward without its backward through ZeRO-3's
    gather/release hooks leaves the parameters that the recorded trace expects the backward to
    reuse gathered (found by the harness's engine snapshot at stage3_param_persistence_threshold
    0), state a run without the forward lacks. Otherwise (fp32 at ZeRO 0-2) the engine's own
    forward (``loss_fn``, the path ℓ_t came from, so x_{t−1} = x_t gives a gap of exactly 0) with
    x_{t−1} written into the shards (ShardView.write_params: fp32 masters and the weights the
    forward reads) and x_{t+1} written back bit-for-bit afterwards, as the probe does for s ≠ 1
    (docs/METRICS.md §Probe contract); run_forward puts back the RNG and module buffers and
    touches no gradient.
    """
    if model_loss_fn is not None:
        return fp32eval.evaluate_losses(engine, view, x_prev, batches, rng_states, model_loss_fn)
    x_next = flatten(view.params())  # x_{t+1} exactly, to restore
    view.write_params(x_prev)
    try:
        return probe_mod.run_forward(engine, batches, rng_states, loss_fn)
    finally:
        view.write_params(x_next)


def measure(m, losses: torch.Tensor, slot: dict, loss_fn, model_loss_fn) -> None:
    """measure.next_batch on the measurer ``m`` (hook.StepMeasurer): this rank's shares of
    f(x_{t−1}; B_t) and of its rounding magnitude M (lossscale.Capture over that forward, like
    the other forwards), and its partial ⟨g_t, Δ_{t−1}⟩, into ``losses`` at ``slot`` (the
    LOSS_NAMES index of each name). Nothing on an attempt's first step, where Δ_{t−1} and x_{t−1}
    were not kept (the same on every rank: the cadence). Under bf16/fp16 the forward is fp32
    (fp32eval), as the measured ℓ_t it is subtracted from; at ZeRO-3 too (``loss_at``)."""
    if not (m.next_batch and m.prev_x is not None and m.prev_delta is not None):
        return
    fp32 = model_loss_fn if m.refit_fp32 or m.info.zero_stage == 3 else None
    replay = (m.batches, m.rng_states, loss_fn, fp32)
    loss_prev, scale = m._captured(loss_at, m.engine, m.view, m.prev_x, *replay)
    world = m.info.world_size
    losses[slot["nb_loss_prev"]] = loss_prev / world
    losses[slot[NEXT_BATCH_SCALE]] = scale / world
    losses[slot["nb_ip_grad_update"]] = ip_partial(m.x_t, m.g_t, m.prev_delta)


def ip_partial(x: FlatShard, g: FlatShard, delta_prev: FlatShard) -> torch.Tensor:
    """This rank's partial ⟨g_t, Δ_{t−1}⟩ (float64 0-dim): the raw sums' own ``flat_sums`` (fused
    kernel or torch path, the error bound of docs/METRICS.md §Raw sums) for ⟨g, Δ⟩ with Δ_{t−1}
    handed in Δ's place, over one run of the whole shard."""
    runs = group_runs(x.sizes, [0] * len(x.sizes))
    out = flat_sums({"x": x.flat, "g": g.flat, "delta": delta_prev.flat}, runs, 1, only=("ip_grad_update",))
    return out[SUM_NAMES.index("ip_grad_update"), 0]


def columns(scalars: dict, totals: dict, precision: str, loss_precision: str) -> dict:
    """names.NEXT_BATCH_NAMES and NEXT_BATCH_CLASS from the reduced scalars and the step's total
    sums (None where undefined):

    nb_loss_gap      = ℓ_t − f(x_{t−1}; B_t)                 trainit's loss/fn-f(n-1)
    nb_convexity_gap = nb_loss_gap − ⟨g_t, Δ_{t−1}⟩           ≤ 0 if f(·; B_t) is convex on the segment
    nb_noise_floor   = metrics.next_batch_floor, and cls_nb_convexity the gap's class against it
    """
    loss, prev, ip = (scalars[k] for k in ("loss", *NEXT_BATCH_RAW))
    m, m_prev = scalars["loss_scale"], scalars[NEXT_BATCH_SCALE]
    gap = loss - prev
    floor = math.nan
    if math.isfinite(prev):
        sc = (m, m_prev)
        floor = metrics.next_batch_floor(totals, loss, prev, precision, loss_precision=loss_precision, loss_scales=sc)
    vals = {
        "nb_loss_prev": prev,
        "nb_ip_grad_update": ip,
        "nb_loss_gap": gap,
        "nb_convexity_gap": gap - ip,
        NEXT_BATCH_SCALE: m_prev,
        "nb_noise_floor": floor,
    }
    out = {k: float(v) if math.isfinite(v) else None for k, v in vals.items()}
    out[NEXT_BATCH_CLASS] = metrics.classify(out["nb_convexity_gap"], out["nb_noise_floor"])
    return out
