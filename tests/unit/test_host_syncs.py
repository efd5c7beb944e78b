"""Host syncs per training step, counted on CPU (issue 16 item 6): a Python number read from a
tensor (`.item()`, `float()`, `bool()`) dispatches `aten._local_scalar_dense`, which on a GPU waits
for every queued kernel. A TorchDispatchMode sees each one with the Python stack that made it
(the profiler's events carry no stack for it here). Counted: the ones opt_study's own code makes (torch's
Adam reads its CPU step counter with `.item()`, which is no device sync). An unmeasured step makes
none at ZeRO-0 and one at ZeRO 1-3 (DeepSpeed's global gradient norm, `engine_grad_norm`); a
measured step adds the reads of its one packed all-reduce. The read-back itself (`.to("cpu")`)
is no `aten::item`, so it is not counted on CPU."""

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
    return reads.own, bool(row.get("measured"))


@pytest.mark.parametrize("stage, unmeasured_syncs", [(0, 0), (2, 1)])
def test_host_syncs_per_step(spec_factory, stage, unmeasured_syncs):
    spec = spec_factory(
        training={"steps": 20, "eval_every": 20, "grad_clip": 1.0},
        measure={"every": 5},
        scale={"grad_accum": 2, "zero_stage": stage},
        optimizers=[{"name": "adamw", "params": {"lr": 0.01}}],
    )
    c = build(spec, TrialPlan("adamw-000-s0", "adamw", "adamw", {"lr": 0.01}, seed=0, index=0), StepMeasurer)
    for s in range(2):  # warm-up: lazy state, first-call allocations
        train_step(c, s, False)
    unmeasured, measured = _own_items(c, 2), _own_items(c, 4)
    assert unmeasured == (unmeasured_syncs, False), unmeasured
    assert measured[1] and measured[0] <= unmeasured_syncs + 2, measured
