"""Host syncs per training step, counted on CPU (issue 16 item 6): a Python number read from a
tensor (`.item()`, `float()`, `bool()`) dispatches `aten._local_scalar_dense`, which on a GPU waits
for every queued kernel. A TorchDispatchMode sees each one with the Python stack that made it
(the profiler's events carry no stack for it here). Counted: the ones opt_study's own code makes (torch's
Adam reads its CPU step counter with `.item()`, which is no device sync). An unmeasured step makes
none, at ZeRO-0 and at ZeRO 1-3: DeepSpeed's global gradient norm (`engine_grad_norm`, a device
tensor at ZeRO 1-3) rides on the step's one read-back of the packed values instead of a `float()`
of its own; a measured step adds the reads of its one packed all-reduce. The read-back itself
(`.to("cpu")`) is no `aten::item`, so it is not counted on CPU."""

from __future__ import annotations

import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from opt_study.measure.hook import StepMeasurer
from opt_study.plan import TrialPlan
from opt_study.trial.loop import build, train_step

OWN = f"{os.sep}opt_study{os.sep}"


class _ScalarReads(TorchDispatchMode):
    """Counts aten._local_scalar_dense calls whose nearest Python caller outside torch is
    opt_study's code."""

    def __init__(self):
        super().__init__()
        self.own = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frames = reversed(traceback.extract_stack()[:-1])  # [:-1]: not this method
            caller = next((f.filename for f in frames if f"{os.sep}torch{os.sep}" not in f.filename), "")
            self.own += OWN in caller
        return func(*args, **(kwargs or {}))


def _own_items(c, step: int) -> tuple[int, bool]:
    with _ScalarReads() as reads:
        row = train_step(c, step, False)
    # the carried norm is DeepSpeed's own value, exactly (None where DeepSpeed reports none)
    n = c.eng.get_global_grad_norm()
    assert row["engine_grad_norm"] == (None if n is None else float(n)), (row["engine_grad_norm"], n)
    assert c.spec.scale.zero_stage == 0 or isinstance(n, torch.Tensor)  # ZeRO 1-3: a device tensor
    return reads.own, bool(row.get("measured"))


# norms off: an unmeasured step reduces the losses alone (StepMeasurer._loss_only_row), the norm rides there
@pytest.mark.parametrize("stage, norms, unmeasured_syncs", [(0, True, 0), (2, True, 0), (2, False, 0)])
def test_host_syncs_per_step(spec_factory, stage, norms, unmeasured_syncs):
    spec = spec_factory(
        training={"steps": 20, "eval_every": 20, "grad_clip": 1.0},
        measure={"every": 5, "norms": norms},
        scale={"grad_accum": 2, "zero_stage": stage},
        optimizers=[{"name": "adamw", "params": {"lr": 0.01}}],
    )
    c = build(spec, TrialPlan("adamw-000-s0", "adamw", "adamw", {"lr": 0.01}, seed=0, index=0), StepMeasurer)
    for s in range(2):  # warm-up: lazy state, first-call allocations
        train_step(c, s, False)
    unmeasured, measured = _own_items(c, 2), _own_items(c, 4)
    assert unmeasured == (unmeasured_syncs, False), unmeasured
    # the measured step's two: the per-tensor norm sums (Σ_i √sum_i) read from the host copy
    assert measured == (unmeasured_syncs + 2, True), measured
