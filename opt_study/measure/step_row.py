"""A step's one all-reduce and the row it becomes (hook.StepMeasurer.end calls these).

``reduce_step`` packs this rank's partial sums, its loss terms and (measured steps) the
per-tensor block into ONE float64 vector, SUM-reduces it and reads it back once (the step's only
host sync); ``norm_row`` and ``measured_fields`` turn the global values into the row's columns
(docs/METRICS.md §Every-step columns, §Raw sums, §Derived metrics).
"""

from __future__ import annotations

import math

import torch

from opt_study import distributed
from opt_study.measure import grad_history, metrics, next_batch
from opt_study.measure.carry import Carry
from opt_study.measure.names import (
    GRAD_HISTORY_RAW,
    GRAD_PRECISION,
    GROUPS,
    LOSS_PRECISION,
    LOSS_SCALE_NAMES,
    MEASURED,
    NOISE_DERIVED,
    NOISE_RAW,
    NORM_NAMES,
    NORM_OF,
    TENSOR_NORM_OF,
    TENSOR_SUMS,
)
from opt_study.measure.noise_scale import noise_scale_simple
from opt_study.measure.sums import pack, unpack


def reduce_step(local: torch.Tensor, losses: torch.Tensor, n_groups: int, per_tensor=None, carried=None):
    """The ONE collective of the step's measurements: this rank's sums, loss terms and (measured
    steps) per-tensor block packed into one float64 vector, SUM-reduced, split again (setting
    p for s ≠ 1 and the fp32 re-evaluations under bf16 communicate too, in the probe: they move
    weights, not measurements). ``carried``'s tensors join the vector after the reduce and come
    back with it. Returns the per-group sums, the scalars (``stop_votes`` among them) and
    names.TENSOR_NAMES' values ({} without the block)."""
    carried = carried or Carry(None)
    packed = pack(local, losses)
    n = packed.numel()
    if per_tensor is not None:
        packed = torch.cat([packed, per_tensor.to(packed.device, torch.float64).reshape(-1)])
    distributed.all_reduce_sum(packed)
    n_reduced = packed.numel()
    host = carried.append(packed).detach().to("cpu", torch.float64)  # host sync: the step's ONE read-back
    carried.read(host[n_reduced:].tolist())
    host = host[:n_reduced]
    per_group, scalars = unpack(host[:n], n_groups)
    tensor_norms = {}
    if per_tensor is not None:  # Σ_i √(sum_i) over tensors, after the reduce (never per rank)
        block = host[n:].view(len(TENSOR_SUMS), -1)
        roots = {k: float(block[TENSOR_SUMS.index(v)].sqrt().sum()) for k, v in TENSOR_NORM_OF.items()}
        tensor_norms = {k: finite(v) for k, v in roots.items()}
    return per_group, scalars, tensor_norms


def norm_row(totals: dict, scalars: dict, measured: bool, loss_precision: str, grad_precision: str) -> dict:
    """Every step's fields: the loss and the three norms (square roots of the total sums)."""
    row = {"loss": scalars["loss"]}
    row.update({name: root(totals[NORM_OF[name]]) for name in NORM_NAMES})
    row.update({MEASURED: measured, LOSS_PRECISION: loss_precision, GRAD_PRECISION: grad_precision})
    return row


def measured_fields(
    per_group: dict,
    totals: dict,
    scalars: dict,
    s: float,
    groups: list[str],
    precisions: tuple[str, str],
    noise_batch: tuple[int, int],
) -> dict:
    """A measured step's fields: the total and per-group sums, the probe's scalars, the noise
    scale and every derived metric (metrics.derive). ``precisions``: (the gradients', the
    losses'); ``noise_batch``: (small, big) batch of the noise scale B_simple."""
    grad_precision, loss_precision = precisions
    out = dict(totals)
    out.update({"loss_probe": scalars["loss_probe"], "probe_s": s, NOISE_RAW: finite(scalars[NOISE_RAW])})
    out.update({k: finite(scalars[k]) for k in LOSS_SCALE_NAMES})
    out.update(next_batch.columns(scalars, totals, grad_precision, loss_precision))
    out.update(grad_history.columns(*(scalars[k] for k in GRAD_HISTORY_RAW), totals["sq_grad"]))
    out[NOISE_DERIVED] = noise_scale_simple(out[NOISE_RAW], totals["sq_grad"], *noise_batch)
    derived = metrics.derive(
        totals,
        scalars["loss"],
        scalars["loss_probe"],
        s,
        grad_precision,  # the gradients' arithmetic: "fp32" with measure.fp32_grads
        loss_precision=loss_precision,
        loss_scales=tuple(scalars[k] for k in LOSS_SCALE_NAMES),
    )
    out.update({k: v for k, v in derived.items() if k not in NORM_NAMES})
    out[GROUPS] = {name: {k: float(v[j]) for k, v in per_group.items()} for j, name in enumerate(groups)}
    return out


def finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def root(v: float) -> float:
    return math.sqrt(v) if v >= 0 else math.nan
