"""The ranks of a checkpoint-replay job (launched by opt_study.replay under torch.distributed.run).

Each rank builds the engine exactly as the trial did (`opt_study.trial.build`, so ZeRO
partitions the same way; the bounds stored with each snapshot are checked) and then:

1. loads the reference y's own-rank fragments into the engine (`ShardView.write_params`) and
   evaluates this rank's share of F(y);
2. for each snapshot x_e: loads its fragments; one forward + backward per evaluation batch with
   the accumulation boundary forced at the last one, and each loss divided by the number of
   batches (the engine averages over ranks), gives ∇F(x_e) in this rank's gradient fragments;
   then the partial sums ⟨x_e − y, g⟩, ‖x_e − y‖², ‖g‖² (x_e − y formed in float64, exact for
   fp32 values, so the inner product does not cancel when x_e ≈ y) plus the two loss shares
   are reduced with ONE all-reduce per snapshot;
3. optionally the top Hessian eigenvalues of F at x_e by Lanczos and a Hutchinson trace
   (opt_study.measure.curvature), from central differences of gradients computed as in 2.

With ``objective="eval"`` (the default) F is the mean loss over the workload's fixed evaluation
sample set (the set `opt_study.trial.evaluate` uses), in eval mode (no dropout). With
``objective="train"`` F changes with the snapshot: F_e = f(·; B_e), the loss of the global
training batch of the snapshot's step e (its A micro-batches on every rank), in train mode with
the dropout masks the trial drew at step e (`trial.loop.step_seed`, reseeded before every
evaluation, so f(x_e; B_e) and f(y; B_e) see the same masks). That is the training-objective
check of Tran, Zhang & Cutkosky (https://arxiv.org/abs/2407.01825): f(x_e; B_e) − f(y; B_e) ≤
⟨∇f(x_e; B_e), x_e − y⟩ for a convex f, on the function the optimizer actually stepped on.
f(x_e; B_e) is the trial's own training loss at step e. Rank 0 writes the rows with
opt_study.results.replay_store. Weights are what the forward sees: with bf16 training the
snapshot's fp32 masters are rounded to bf16 on load, as in training.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from opt_study import distributed
from opt_study.measure import curvature
from opt_study.replay.job import HessianOptions, add_hessian_args, hessian_options, load_trial
from opt_study.trial import snapshots
from opt_study.trial.loop import step_seed

SUMS = ("sq_param", "sq_grad", "ip_param_grad")  # of Fragment(x = x_e − y, g = ∇F(x_e))
STREAM_CURVATURE = 101  # random-stream id of the Lanczos start vector and Hutchinson probes


class EvalObjective:
    """F on the fixed evaluation set through a DeepSpeed engine, in this rank's shard form."""

    def __init__(self, engine, view, workload, batches, zero_stage: int):
        self.engine, self.view, self.workload, self.batches = engine, view, workload, batches
        self.stage = zero_stage
        self.sizes = [hi - lo for lo, hi in view.bounds()]
        if not batches:
            raise ValueError("the evaluation set gives this rank no batch")

    def write(self, frags: list[torch.Tensor]) -> None:
        self.view.write_params(frags)

    def loss(self) -> float:
        """This rank's mean loss over its evaluation batches (no collective)."""
        with torch.no_grad():
            return sum(float(self.workload.loss(self.engine, b)) for b in self.batches) / len(self.batches)

    def loss_and_grad(self, on_grad=None) -> tuple[float, list[torch.Tensor]]:
        """(this rank's mean loss, cloned fragments of ∇F): F's gradient over ALL ranks' batches.

        Each loss is divided by the batch count K (scale_wrt_gas off) and the boundary is forced
        at the last batch, so the engine's reduction (a mean over ranks) yields
        (1/W) Σ_r (1/K) Σ_k ∇ℓ_{r,k} = ∇F. The engine's gradient state is then cleared as after
        the probe (opt_study.measure.deepspeed_state.restore_after_probe). ``on_grad(view)`` is
        a test seam, called while the reduced gradient is readable.
        """
        from opt_study.measure.deepspeed_state import restore_after_probe

        k = len(self.batches)
        total = 0.0
        grads = None
        for m, batch in enumerate(self.batches):
            self.engine.set_gradient_accumulation_boundary(m == k - 1)
            loss = self.workload.loss(self.engine, batch)
            self.engine.backward(loss / k, scale_wrt_gas=False)
            total += float(loss.detach())
            if m == k - 1:
                grads = [g[:n].clone() for g, n in zip(self.view.clone_grads(), self.sizes)]
                if on_grad is not None:
                    on_grad(self.view)
        restore_after_probe(self.engine, self.stage)
        return total / k, grads

    def at_step(self, step: int) -> None:
        """The evaluation set does not depend on the snapshot."""

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(flat, self.sizes))

    def join(self, frags: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([f.reshape(-1) for f in frags]) if frags else torch.zeros(0)

    def flat_grad_at(self, x: torch.Tensor) -> torch.Tensor:
        """∇F at the local point x (flat), as a flat local tensor; moves the model to x."""
        self.write(self.split(x.float()))
        return self.join(self.loss_and_grad()[1])


class TrainObjective(EvalObjective):
    """F_e = f(·; B_e) through the engine: step e's training micro-batches of this rank, in train
    mode, each evaluation preceded by the trial's own reseeding for step e (the same masks)."""

    def __init__(self, engine, view, workload, zero_stage: int, *, seed: int, rank: int, world: int, mbs: int, accum):
        super().__init__(engine, view, workload, [None], zero_stage)
        self.seed, self.rank, self.world, self.mbs, self.accum = seed, rank, world, mbs, accum
        self.step = 0

    def at_step(self, step: int) -> None:
        self.step = step
        self.batches = [
            tuple(
                t.to(self.engine.device) for t in self.workload.train_batch(step, m * self.world + self.rank, self.mbs)
            )
            for m in range(self.accum)
        ]

    def _reseed(self) -> None:
        torch.manual_seed(step_seed(self.seed, self.rank, self.step))

    def loss(self) -> float:
        self._reseed()
        return super().loss()

    def loss_and_grad(self, on_grad=None) -> tuple[float, list[torch.Tensor]]:
        self._reseed()
        return super().loss_and_grad(on_grad)


def _own_fragments(study_dir, trial_id: str, step: int, view, device) -> list[torch.Tensor]:
    """This rank's fragments of snapshot ``step``, checked against the engine's layout."""
    meta = snapshots.read_meta(study_dir, trial_id, step)
    if meta["world"] != view.world or meta["names"] != view.names:
        raise ValueError(
            f"snapshot step-{step} of {trial_id} was saved by world {meta['world']} with "
            f"other parameters; replay needs the trial's own world size and model"
        )
    if [tuple(b) for b in meta["bounds"][view.rank]] != [tuple(b) for b in view.bounds()]:
        raise ValueError(
            f"snapshot step-{step}: the engine partitions the parameters differently "
            "from the trial (ZeRO stage, optimizer groups or DeepSpeed version changed)"
        )
    data = snapshots.load_fragments(study_dir, trial_id, step, view.rank, view.world)
    return [data["fragments"][n].to(device) for n in view.names]


def replay_rank(
    spec,
    plan,
    study_dir,
    reference: str = "final",
    hessian: HessianOptions | None = None,
    on_grad=None,
    objective: str = "eval",
) -> list[dict]:
    """One rank's part of the replay of trial ``plan`` against ``objective`` (eval or train; see
    the module docstring); every rank calls it, a collective.

    Returns the rows on every rank; rank 0 also writes them. ``on_grad(step, view)`` is a test
    seam (see EvalObjective.loss_and_grad).
    """
    from opt_study.measure.hook import StepMeasurer
    from opt_study.measure.sums import SUM_NAMES, Fragment, local_sums
    from opt_study.results.replay_store import write_replay
    from opt_study.storage.layout import check_objective, check_reference
    from opt_study.trial.loop import build

    check_reference(reference), check_objective(objective)
    ref_step = snapshots.resolve_reference(study_dir, plan.trial_id, reference)
    steps = snapshots.committed_steps(study_dir, plan.trial_id)
    c = build(spec, plan, StepMeasurer)
    view, stage, world = c.measurer.view, spec.scale.zero_stage, c.world
    meta = snapshots.read_meta(study_dir, plan.trial_id, ref_step)
    if meta["zero_stage"] != stage:
        raise ValueError(
            f"trial {plan.trial_id} saved its snapshots at ZeRO-{meta['zero_stage']}, the spec now says ZeRO-{stage}"
        )
    obj = _objective(objective, spec, plan, c, view)
    y = _own_fragments(study_dir, plan.trial_id, ref_step, view, c.device)
    loss_y_local = None
    if objective == "eval":  # F(y) once: the evaluation set is every snapshot's
        obj.write(y)
        loss_y_local = obj.loss()
    rows = []
    for e in steps:
        x = _own_fragments(study_dir, plan.trial_id, e, view, c.device)
        if objective == "train":  # F_e: f(y; B_e) on this snapshot's batch and masks
            obj.at_step(e)
            obj.write(y)
            loss_y_local = obj.loss()
        obj.write(x)
        seam = None if on_grad is None else (lambda v, e=e: on_grad(e, v))
        loss_x_local, g = obj.loss_and_grad(seam)
        frags = [Fragment(group=0, x=xi.double() - yi.double(), g=gi) for xi, yi, gi in zip(x, y, g)]
        sums = local_sums(frags, 1, only=SUMS)[:, 0]
        packed = torch.cat(
            [sums, torch.tensor([loss_x_local / world, loss_y_local / world], dtype=torch.float64, device=sums.device)]
        )
        distributed.all_reduce_sum(packed)  # the ONE collective of this snapshot
        val = {n: float(packed[SUM_NAMES.index(n)]) for n in SUMS}
        loss_x, loss_y = float(packed[-2]), float(packed[-1])
        row = {
            "step": e,
            "ref_step": ref_step,
            "loss_x": loss_x,
            "loss_y": loss_y,
            "ip_grad_dist": val["ip_param_grad"],
            "loss_gap": loss_x - loss_y,
            "sq_dist": val["sq_param"],
            "sq_grad": val["sq_grad"],
            "world": world,
            "zero_stage": stage,
        }
        if hessian is not None:
            row.update(_curvature(obj, x, hessian, e, c.rank))
        row["time_unix"] = time.time()
        rows.append(row)
    if c.rank == 0:
        write_replay(study_dir, plan.trial_id, reference, rows, objective)
    return rows


def _objective(objective: str, spec, plan, c, view) -> EvalObjective:
    stage, mbs = spec.scale.zero_stage, spec.scale.micro_batch_size
    if objective == "train":
        c.eng.train()  # the trial's mode: dropout on, with the step's masks
        return TrainObjective(
            c.eng,
            view,
            c.workload,
            stage,
            seed=plan.seed,
            rank=c.rank,
            world=c.world,
            mbs=mbs,
            accum=spec.scale.grad_accum,
        )
    c.eng.eval()  # F is the evaluation loss: no dropout
    batches = [tuple(t.to(c.device) for t in b) for b in c.workload.eval_batches(mbs, c.rank, c.world)]
    return EvalObjective(c.eng, view, c.workload, batches, stage)


def _curvature(obj: EvalObjective, x: list[torch.Tensor], opts: HessianOptions, step: int, rank: int) -> dict:
    """Top Ritz values and Hutchinson trace of F's Hessian at x (the model is left at x)."""
    from opt_study.workloads.base import generator

    reduce = distributed.all_reduce_sum
    xf = obj.join(x).double()
    eps = opts.fd_eps * max(curvature.global_norm(xf, reduce), 1.0)
    hvp = curvature.fd_hvp(obj.flat_grad_at, xf, eps)
    # Each rank draws its own part of the random vectors: the global vector has i.i.d.
    # entries whatever the partition, and is a pure function of (seed, step, rank).
    gen = generator(STREAM_CURVATURE, opts.seed, step, rank)
    n = xf.numel()
    v0 = torch.randn(n, generator=gen, dtype=torch.float64).to(xf.device)
    ritz, k = curvature.lanczos(hvp, v0, opts.lanczos_steps, reduce)
    probes = [
        (torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1).to(xf.device)
        for _ in range(opts.hutchinson_samples)
    ]
    trace, stderr = curvature.hutchinson(hvp, probes, reduce)
    obj.write(x)
    return {
        "hessian_top": [float(v) for v in ritz[: opts.top]],
        "lanczos_steps": k,
        "hutchinson_trace": None if math.isnan(trace) else trace,
        "hutchinson_stderr": None if math.isnan(stderr) else stderr,
        "hutchinson_samples": opts.hutchinson_samples,
    }


# ------------------------------------------------------------------------------ entry point
def main(argv: list[str] | None = None) -> None:
    """`python -m opt_study.replay.worker STUDY_DIR TRIAL REFERENCE [--objective train] [--hessian ...]`,
    per rank."""
    p = argparse.ArgumentParser(prog="python -m opt_study.replay.worker")
    p.add_argument("study_dir")
    p.add_argument("trial")
    p.add_argument("reference")
    p.add_argument("--objective", default="eval", choices=("eval", "train"))
    add_hessian_args(p)
    a = p.parse_args(argv)
    spec, plan = load_trial(a.study_dir, a.trial)
    try:
        replay_rank(spec, plan, Path(a.study_dir).resolve(), a.reference, hessian_options(a), objective=a.objective)
    except (ValueError, FileNotFoundError) as e:  # a refused or missing snapshot file: one line
        print(f"opt-study replay: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        distributed.destroy()


if __name__ == "__main__":
    main()
