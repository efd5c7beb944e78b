"""The per-worker training loop of one trial. Knows nothing of Tune beyond a `report` callable.

Every rank runs `run_trial`; rank 0 also writes the trial's Parquet rows. The data a step sees is
a pure function of (seed, step, micro-batch index), so a restart at any step, or the measurement
probe re-reading a batch, needs no iterator state.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from opt_study import distributed, engine as engine_mod, optim
from opt_study.config import Spec
from opt_study.measure.hook import StepMeasurer
from opt_study.workloads import make_workload

Report = Callable[[dict], None]


@dataclass(frozen=True)
class TrialPlan:
    """One trial of a study, fixed before the study starts (stored in the trials table)."""

    trial_id: str
    label: str  # the optimizer entry's label (ASHA compares trials of one label only)
    optimizer: str
    hparams: dict[str, Any]
    seed: int
    index: int  # position within its optimizer's budget

    def as_dict(self) -> dict:
        return {"trial_id": self.trial_id, "label": self.label, "optimizer": self.optimizer,
                "hparams": dict(self.hparams), "seed": self.seed, "index": self.index}


@dataclass
class TrialState:
    step: int = 0
    best_eval: float = math.inf
    last_eval: float = math.nan
    last_loss: float = math.nan
    status: str = "running"
    start_time: float = field(default_factory=time.time)


def stop_path(study_dir, trial_id: str):
    """The file through which the study asks a running trial to stop (opt_study.study).

    Stopping is cooperative: Tune killing a worker-group trial's actor leaks Ray Train V2's
    placement group (ray-project/ray#54305), which then starves every later trial.
    """
    from pathlib import Path

    return Path(study_dir) / "control" / f"{trial_id}.stop"


def _to_device(batch, device):
    return tuple(t.to(device, non_blocking=True) for t in batch)


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    # ZeRO wraps the client optimizer but keeps its param_group dicts, so this reaches the rule.
    for g in opt.param_groups:
        g["lr"] = lr


def evaluate(engine, workload, mbs: int, device) -> float:
    """Mean loss over the fixed evaluation set, split across ranks (one all-reduce)."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for batch in workload.eval_batches(mbs, distributed.rank(), distributed.world_size()):
            total[0] += float(workload.loss(engine, _to_device(batch, device)))
            total[1] += 1
    engine.train()
    distributed.all_reduce_sum(total)
    return float(total[0] / total[1]) if total[1] > 0 else math.nan


def run_trial(spec: Spec, plan: TrialPlan, report: Report, attempt: int = 0,
              measurer_cls=StepMeasurer) -> dict:
    """Train one trial to the end (or divergence); returns the final summary on every rank.

    `measurer_cls` is a test seam: the multi-rank tests pass a subclass that also gathers full
    tensors (in the test only) to check every measured number against the reference.
    """
    scale, training = spec.scale, spec.training
    device = engine_mod.setup_process(scale)
    rank, world = distributed.rank(), distributed.world_size()
    torch.manual_seed(plan.seed * 1000 + rank)  # dropout masks differ per rank, fixed per seed

    workload = make_workload(spec.workload.type, spec.workload.params, plan.seed)
    model = workload.build_model()
    hparams = optim.resolve_hparams(plan.optimizer, plan.hparams)
    client_opt = optim.build_optimizer(plan.optimizer, model.parameters(), hparams)
    eng, info, _ = engine_mod.build_engine(model, client_opt, scale, training.grad_clip)

    writer = None
    if rank == 0:
        from opt_study.results.parquet import StepWriter
        writer = StepWriter(spec.study_dir, plan.trial_id, attempt, start_step=0)
    measurer = measurer_cls(eng, info, spec.measure, precision=scale.precision,
                            eval_every=training.eval_every, total_steps=training.steps,
                            seed=plan.seed, norms=spec.measure.norms)
    state = TrialState()
    stop_file = stop_path(spec.study_dir, plan.trial_id)
    base_lr = float(hparams["lr"])
    A, b = scale.grad_accum, scale.micro_batch_size
    units = 0
    for step in range(training.steps):
        lr = base_lr * optim.lr_factor(step, training.steps, training.schedule.type,
                                       training.schedule.warmup_steps, training.schedule.min_ratio)
        _set_lr(client_opt, lr)
        t0 = time.perf_counter()
        measurer.begin(step)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for m in range(A):
            batch = _to_device(workload.train_batch(step, m * world + rank, b), device)
            measurer.before_micro(batch)
            loss = workload.loss(eng, batch)
            eng.backward(loss)
            if m == A - 1:
                measurer.at_boundary()
            eng.step()
            loss_sum += loss.detach().double().cpu()
            units += workload.units_per_batch(batch)
        fields = measurer.end(step, loss_sum / A, lambda mb: workload.loss(eng, mb),
                              stop_vote=rank == 0 and stop_file.exists())
        dt = time.perf_counter() - t0
        row = {"step": step, "lr": lr, "step_time_s": dt, "units_per_s": workload.units_per_batch(batch) * A * world / dt,
               "engine_grad_norm": _engine_norm(eng), "time_unix": time.time(), **fields}
        state.step, state.last_loss = step + 1, row["loss"]
        diverged = not math.isfinite(row["loss"])
        stopping = measurer.stop_requested and not diverged
        boundary = (step + 1) % training.eval_every == 0 or step + 1 == training.steps or diverged or stopping
        if boundary and not diverged:
            state.last_eval = row["eval_loss"] = evaluate(eng, workload, b, device)
            state.best_eval = min(state.best_eval, state.last_eval)
        if writer is not None and (step % training.log_every == 0 or boundary):
            writer.append({"trial_id": plan.trial_id, "attempt": attempt, **row})
        if diverged:
            state.status = "diverged"
        elif step + 1 == training.steps:
            state.status = "completed"
        elif stopping:
            state.status = "stopped"
        if boundary:
            if writer is not None:
                writer.flush()  # rows are durable before a scheduler can stop the trial
            report(_report_metrics(state, row))
        if diverged or stopping:
            break
    if writer is not None:
        writer.close()
    return _report_metrics(state, {"loss": state.last_loss})


def _engine_norm(eng) -> float | None:
    """DeepSpeed's own global gradient norm (None at ZeRO-0): an independent check column."""
    try:
        n = eng.get_global_grad_norm()
    except Exception:  # noqa: BLE001 - some engine variants raise instead of returning None
        return None
    return None if n is None else float(n)


def _report_metrics(state: TrialState, row: dict) -> dict:
    out = {"step": state.step, "loss": float(row.get("loss", math.nan)),
           "eval_loss": state.last_eval, "best_eval_loss": state.best_eval,
           "status": state.status, "finished": state.status != "running"}
    for k in ("lr", "grad_norm", "units_per_s"):
        if k in row and row[k] is not None:
            out[k] = float(row[k])
    return out
