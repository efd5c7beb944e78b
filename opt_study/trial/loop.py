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

from opt_study import distributed, optim
from opt_study.config import Spec
from opt_study.measure import curvature_batch
from opt_study.measure.cadence import Cadence
from opt_study.measure.extra import ExtraMetrics
from opt_study.measure.hook import StepMeasurer
from opt_study.measure.probe import rng_state, set_rng_state
from opt_study.plan import TrialPlan
from opt_study.results.parquet import StepWriter, next_attempt
from opt_study.storage import layout, objectstore
from opt_study.trial import checkpoint, control, snapshots
from opt_study.trial import engine as engine_mod
from opt_study.workloads import make_workload

Report = Callable[[dict], None]
# A trial's progress between evaluations goes to `progress` (the study console's board), never to
# `report`: Tune counts every report (ASHA's rungs) and Ray Train's report is a barrier of all ranks.
PROGRESS_EVERY_S = 5.0


@dataclass
class TrialState:
    step: int = 0
    best_eval: float = math.inf
    last_eval: float = math.nan
    last_loss: float = math.nan
    initial_loss: float | None = None
    status: str = "running"
    nodes: str = ""
    start_time: float = field(default_factory=time.time)
    # every evaluation reported so far, carried by each checkpoint: Ray Train's controller collects
    # reports on a poll, so a group killed soon after reporting may lose several; the restarted
    # group repeats them all and the controller drops those it had forwarded (launch.is_new_report)
    reports: list = field(default_factory=list)


def _to_device(batch, device):
    return tuple(t.to(device, non_blocking=True) for t in batch)


def evaluate(engine, workload, mbs: int, device) -> float:
    """Mean loss over the fixed evaluation set, split across ranks (one all-reduce)."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # NCCL reduces device tensors only
    with torch.no_grad():
        for batch in workload.eval_batches(mbs, distributed.rank(), distributed.world_size()):
            total[0] += float(workload.loss(engine, _to_device(batch, device)))
            total[1] += 1
    engine.train()
    distributed.all_reduce_sum(total)
    return float(total[0] / total[1]) if total[1] > 0 else math.nan


@dataclass
class Ctx:
    """What one rank's loop holds: the engine, its data and the sinks."""

    spec: Spec
    plan: TrialPlan
    eng: Any
    client_opt: torch.optim.Optimizer
    workload: Any
    measurer: StepMeasurer
    device: torch.device
    rank: int
    world: int
    base_lr: float
    writer: Any = None
    attempt: int = 0
    cadence: Cadence | None = None  # which steps are measured / evaluated / logged (build sets it)


def build(spec: Spec, plan: TrialPlan, measurer_cls) -> Ctx:
    """Process group, workload, model, optimizer, DeepSpeed engine and the step measurer."""
    scale, training = spec.scale, spec.training
    device = engine_mod.setup_process(scale)
    workload = make_workload(spec.workload.type, spec.workload.params, plan.seed)
    model = workload.build_model()
    hparams = optim.resolve_hparams(plan.optimizer, plan.hparams)
    client_opt = optim.build_optimizer(plan.optimizer, model.parameters(), hparams, scale.zero_stage, scale.precision)
    eng, info = engine_mod.build_engine(model, client_opt, scale, training.grad_clip)
    # A whole-tensor rule at ZeRO 1-3 learns where this rank's fp32 fragments live (optim.whole_tensor).
    engine_mod.attach_fragments(eng, client_opt, info)
    # A layer-wise or matrix rule must see the model's own tensors, not ZeRO's flat partitions.
    optim.check_model_shapes(client_opt, eng.module)
    # Built before any checkpoint is loaded, so x_0 is the deterministic initial point even
    # after a restart (build_model is a pure function of the seed).
    cadence = Cadence.from_spec(spec)  # the one rule for measured / evaluated / logged steps
    measurer = measurer_cls(
        eng,
        info,
        spec.measure,
        precision=scale.precision,
        cadence=cadence,
        seed=plan.seed,
        norms=spec.measure.norms,
        small_batch=scale.micro_batch_size,
        # measure.curvature_batch: drawn once, here, from the workload's pure batch function
        curvature_batch=curvature_batch.draw(
            workload, spec.measure.curvature_batch, distributed.rank(), distributed.world_size(), scale, device
        ),
    )
    return Ctx(
        spec,
        plan,
        eng,
        client_opt,
        workload,
        measurer,
        device,
        distributed.rank(),
        distributed.world_size(),
        float(hparams["lr"]),
        cadence=cadence,
    )


def step_seed(seed: int, rank: int, step: int) -> int:
    """The global RNG seed of one rank's step: dropout masks depend on (seed, rank, step) only,
    so a trial resumed from a checkpoint replays exactly the masks it would have drawn."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2**63 - 1)


def train_step(c: Ctx, step: int, stop_vote: bool) -> dict:
    """One optimizer step over A micro-batches (DeepSpeed accumulates; step() at the boundary)."""
    training, A, b = c.spec.training, c.spec.scale.grad_accum, c.spec.scale.micro_batch_size
    factor = optim.schedule_factor(step, training.steps, training.schedule)
    # eng.optimizer: ZeRO may rebuild the client optimizer, so set lr on what actually steps
    optim.apply_lr_factor(c.eng.optimizer, factor)
    lr = c.base_lr * factor
    optim.train_mode(c.client_opt)  # gradients at the training iterate (Schedule-Free's y)
    torch.manual_seed(step_seed(c.plan.seed, c.rank, step))
    t0 = time.perf_counter()
    c.measurer.begin(step)
    # summed on the device (float64, as before on the host): no host sync per micro-batch; the
    # measurer reads it once, after the step's all-reduce
    loss_sum = torch.zeros((), dtype=torch.float64, device=c.device)
    units, batches = 0, []
    for m in range(A):
        batch = _to_device(c.workload.train_batch(step, m * c.world + c.rank, b), c.device)
        batches.append(batch)
        c.measurer.before_micro(batch)
        loss = c.workload.loss(c.eng, batch)
        c.eng.backward(loss)
        if m == A - 1:
            c.measurer.at_boundary()
            side_backward(c, step, batches)
        c.eng.step()
        loss_sum += loss.detach().double()
        units += c.workload.units_per_batch(batch)
    fields = c.measurer.end(
        step,
        loss_sum / A,
        lambda mb: c.workload.loss(c.eng, mb),
        stop_vote=stop_vote,
        model_loss_fn=c.workload.loss,
        lr=lr,
        # DeepSpeed's norm, a device tensor at ZeRO 1-3: read back with the measurer's one
        # transfer of the step's values, not by a float() (a host sync) of its own
        carry={"engine_grad_norm": _engine_norm(c.eng)},
    )
    dt = time.perf_counter() - t0
    row = {
        "step": step,
        "lr": lr,
        "step_time_s": dt,
        "units_per_s": units * c.world / dt,
        "time_unix": time.time(),
        **fields,
    }
    if optim.is_sync_step(c.client_opt, step):
        # Lookahead pulled the fast weights to the slow ones: Δ is not an optimizer step of the
        # inner rule, so the row is flagged and left out of the inequality fractions
        # (docs/METRICS.md §Flags).
        row["flag"] = ",".join(x for x in (row.get("flag"), "lookahead_sync") if x)
    return row


def side_backward(c: Ctx, step: int, batches: list) -> None:
    """An optimizer that needs its own extra backward (Sophia's Hessian estimate) gets it here,
    after the boundary backward and before step(), with the RNG stream left as it was."""
    if not optim.needs_hessian(c.client_opt):
        return
    state = rng_state()
    optim.estimate_hessian(
        c.client_opt,
        lambda: sum(c.workload.loss(c.eng.module, mb) for mb in batches) / len(batches),
        seed=c.plan.seed * 1_000_003 + step,
    )
    set_rng_state(state)


def resume(c: Ctx, state: TrialState) -> int:
    """Load the trial's latest checkpoint if there is one; open this attempt's Parquet writer.

    Returns the first step to run. The attempt number is chosen by rank 0 and broadcast, so a
    worker group restarted by Ray Train never reuses one.
    """
    client = (
        checkpoint.load(c.eng, c.spec.study_dir, c.plan.trial_id) if c.spec.training.checkpoint_every != 0 else None
    )
    start = int(client["next_step"]) if client else 0
    if client:
        state.best_eval, state.initial_loss = client.get("best_eval", math.inf), client.get("initial_loss")
        state.reports = list(client.get("reports") or ([client["report"]] if client.get("report") else []))
    if c.rank == 0:
        c.attempt = next_attempt(c.spec.study_dir, c.plan.trial_id)
        c.writer = StepWriter(c.spec.study_dir, c.plan.trial_id, c.attempt, start_step=start)
    c.attempt = distributed.broadcast_object(c.attempt)
    return start


def _pull_trial(study_dir, trial_id: str) -> None:
    """All ranks, before resuming: on an object-store root, this trial's attempts and
    checkpoint files as the store holds them (a restarted group may run on other machines than
    the last one, or on this one with stale files). No-op on a local root."""
    if distributed.rank() == 0:  # only rank 0 opens the trial's next attempt
        objectstore.pull(layout.trial_steps_dir(study_dir, trial_id))
    checkpoint.pull(study_dir, trial_id, distributed.rank())
    distributed.barrier()


def run_trial(
    spec: Spec,
    plan: TrialPlan,
    report: Report,
    measurer_cls=StepMeasurer,
    node: str = "",
    progress: Report | None = None,
    repeat_report: bool = False,
) -> dict:
    """Train one trial to the end (or divergence, or a stop request); every rank runs this.

    Returns the final report metrics. `measurer_cls` is a test seam: the multi-rank tests pass a
    subclass that also gathers full tensors (in the test only) to check every measured number.
    `progress` (rank 0, every PROGRESS_EVERY_S of wall time) gets {step, loss, units_per_s}.
    `repeat_report`: on resuming, report again the evaluation made at the checkpoint's step. A
    worker group killed between committing a checkpoint and its report reaching Ray Train's
    controller would otherwise never report that evaluation; the controller drops the repeat
    when it did arrive (launch.is_new_report), so Tune sees each evaluation exactly once.
    """
    c = build(spec, plan, measurer_cls)
    training = spec.training
    state = TrialState()
    # where the ranks ran (the launcher passes its Ray node id): recorded with the trial
    state.nodes = ",".join(sorted(set(distributed.all_gather_object(node)))) if node else ""
    _pull_trial(spec.study_dir, plan.trial_id)
    start = resume(c, state)
    if repeat_report:
        for r in state.reports:
            report(r)
    # fp32 parameter snapshots for checkpoint replay (docs/METRICS.md §Reference-point metrics)
    saver = snapshots.SnapshotSaver(
        spec.study_dir,
        plan.trial_id,
        c.measurer.view,
        spec.scale.zero_stage,
        spec.scale.precision,
        spec.measure.snapshot_every,
    )
    if start == 0:
        saver.save_initial()
    cadence = c.cadence
    extra = ExtraMetrics(spec.measure.extra)
    posted = time.monotonic()
    for step in range(start, training.steps):
        row = train_step(c, step, stop_vote=c.rank == 0 and control.stop_requested(spec.study_dir, plan.trial_id))
        state.step, state.last_loss = step + 1, row["loss"]
        if state.initial_loss is None:
            state.initial_loss = row["loss"]
        status = _status(state, row, training, c.measurer.stop_requested, step)
        boundary = cadence.evaluated(step) or status != "running"
        if boundary and status != "diverged":
            optim.eval_mode(c.client_opt)  # evaluate at the evaluation iterate (Schedule-Free's x)
            state.last_eval = row["eval_loss"] = evaluate(c.eng, c.workload, spec.scale.micro_batch_size, c.device)
            optim.train_mode(c.client_opt)
            c.measurer.weights_moved()  # the round trip x -> y may not give y back bit for bit
            state.best_eval = min(state.best_eval, state.last_eval)
        if c.writer is not None and (cadence.logged(step) or boundary):  # measured rows: always
            if extra and row.get("measured"):  # user metrics (measure.extra), on rank 0 only
                row["extra"] = extra(row)
            c.writer.append({"trial_id": plan.trial_id, "attempt": c.attempt, **row})
        state.status = status
        if status != "diverged":
            saver.maybe_save(step, last=status != "running")
        if boundary and c.writer is not None:
            c.writer.flush()  # rows are durable before a checkpoint, a report or a stop
        if boundary:  # made before the checkpoint, which carries it
            state.reports.append(_report_metrics(state, row))
        if cadence.checkpointed(step) and status == "running":
            checkpoint.save(
                c.eng,
                spec.study_dir,
                plan.trial_id,
                step + 1,
                {
                    "best_eval": state.best_eval,
                    "initial_loss": state.initial_loss,
                    "reports": state.reports,
                },
            )
        if boundary:
            report(state.reports[-1])
        elif progress is not None and c.rank == 0 and time.monotonic() - posted >= PROGRESS_EVERY_S:
            posted = time.monotonic()
            progress({"step": state.step, "loss": float(row["loss"]), "units_per_s": row.get("units_per_s")})
        if status != "running":
            break
    if c.writer is not None:
        c.writer.close()
    distributed.barrier()
    # The checkpoints stay: the driver removes them once it has recorded the trial finished
    # (opt_study.study.recorder), so a driver that dies before that resumes, not reruns, it.
    return _report_metrics(state, {"loss": state.last_loss})


def _status(state: TrialState, row: dict, training, stop_requested: bool, step: int) -> str:
    """Divergence is data: a NaN/inf loss or one above `divergence_factor` x the first loss ends the
    trial as `diverged` at that step (the study goes on)."""
    loss = row["loss"]
    if not math.isfinite(loss) or (
        training.divergence_factor
        and state.initial_loss is not None
        and loss > training.divergence_factor * abs(state.initial_loss)
    ):
        return "diverged"
    if step + 1 == training.steps:
        return "completed"
    return "stopped" if stop_requested else "running"


def _engine_norm(eng):
    """DeepSpeed's own global gradient norm (None at ZeRO-0; a tensor or a float otherwise), as
    DeepSpeed holds it: an independent check column, read on the host by the measurer."""
    try:
        return eng.get_global_grad_norm()
    except Exception:  # noqa: BLE001 - some engine variants raise instead of returning None
        return None


def _report_metrics(state: TrialState, row: dict) -> dict:
    out = {
        "step": state.step,
        "loss": float(row.get("loss", math.nan)),
        "eval_loss": state.last_eval,
        "best_eval_loss": state.best_eval,
        "status": state.status,
        "finished": state.status != "running",
        "nodes": state.nodes,
    }
    for k in ("lr", "grad_norm", "units_per_s"):
        if k in row and row[k] is not None:
            out[k] = float(row[k])
    return out
