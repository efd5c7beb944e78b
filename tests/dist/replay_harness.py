"""Checkpoint replay at world W, under `torchrun --nproc_per_node W tests/dist/replay_harness.py
OUT.json CASES STORAGE`: one process group, a loop over cases (ZeRO stage x workload).

Per case: a real `run_trial` that saves snapshots (opt_study.trial.snapshots), then
`replay_rank` on the same process group. In the test only, rank 0 reassembles every snapshot's
full vector from the rank files and recomputes F, ∇F and the replay columns in float64 on one
process (the oracle); the engine's reduced gradient is also gathered (DeepSpeed's
`safe_get_full_grad`, an independent path) for teacher-forced checks of the sums. Rank 0 writes
scale-aware errors as JSON; tests/multirank/test_replay.py asserts on them.
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch
import yaml

from opt_study import distributed
from opt_study.measure.hook import StepMeasurer
from opt_study.plan import TrialPlan
from opt_study.replay.job import HessianOptions
from opt_study.replay.worker import replay_rank
from opt_study.results.parquet import read_steps
from opt_study.results.replay_store import read_replay
from opt_study.trial import loop as trial_mod
from opt_study.trial import snapshots
from opt_study.trial.loop import run_trial
from opt_study.validate import parse_study
from opt_study.workloads import make_workload

from harness import full_grads, full_params, run_cases, zero_config  # tests/dist/harness.py (the script's directory)

# Once opt_study.trial saves snapshots itself, the measurer below only records; before that it
# also drives the saver through the measurer seam. Saving twice would be harmless anyway (the
# same values, the same collective order).
TRIAL_SAVES = hasattr(trial_mod, "snapshots")


class SnapshotMeasurer(StepMeasurer):
    """Records the full parameters after every step (test only) and, if the trial loop does not
    save snapshots itself, saves them through the real SnapshotSaver."""

    study_dir = trial_id = None
    last = None

    def __init__(self, engine, info, cfg, **kw):
        super().__init__(engine, info, cfg, **kw)
        self.stage = info.zero_stage
        self.full = {0: full_params(engine, self.stage)}
        self.saver = None
        if not TRIAL_SAVES:
            self.saver = snapshots.SnapshotSaver(
                self.study_dir, self.trial_id, self.view, info.zero_stage, info.precision, cfg.snapshot_every
            )
            self.saver.save_initial()
        SnapshotMeasurer.last = self

    def end(self, step, loss_local, loss_fn, **kw):
        row = super().end(step, loss_local, loss_fn, **kw)
        if self.saver is not None:
            self.saver.maybe_save(step, last=step + 1 == self.total)
        self.full[step + 1] = full_params(self.engine, self.stage)
        return row


def spec_for(case: dict, storage: str):
    """The case's spec; rank 0 also stores it as the study's spec.yaml (what the CLI replays)."""
    doc = spec_doc(case, storage)
    spec = parse_study(doc)
    if distributed.rank() == 0:
        spec.study_dir.mkdir(parents=True, exist_ok=True)
        (spec.study_dir / "spec.yaml").write_text(yaml.safe_dump(doc))
    return spec


def spec_doc(case: dict, storage: str) -> dict:
    wl = {
        "mlp": {
            "type": "mlp_classify",
            "dataset": "digits",
            "hidden": [15],
            "dropout": 0.1,
            "val_fraction": case.get("val_fraction", 0.1),
        },
        "quadratic": {"type": "quadratic", "dim": 16, "cols": 4, "noise": 0.3},
    }[case["workload"]]
    steps = case["steps"]
    return {
        "study": {"name": f"r{case['id']}", "storage": storage},
        "workload": wl,
        "scale": {
            "workers": distributed.world_size(),
            "zero_stage": case["stage"],
            "micro_batch_size": case.get("mbs", 8),
            "grad_accum": case.get("accum", 1),
            "launcher": "worker_group" if distributed.world_size() > 1 else "auto",
        },
        "training": {"steps": steps, "eval_every": steps},
        "optimizers": [{"name": "adamw", "params": {"lr": case.get("lr", 0.05)}}],
        "measure": {"every": 0, "snapshot_every": case["every"]},
    }


# ------------------------------------------------------------------------- the float64 oracle
def assemble(study_dir, trial_id: str, step: int) -> torch.Tensor:
    """The full parameter vector of a snapshot from all rank files (test only); checks that the
    fragments cover every element exactly once."""
    meta = snapshots.read_meta(study_dir, trial_id, step)
    w = meta["world"]
    parts = [snapshots.load_fragments(study_dir, trial_id, step, r, w)["fragments"] for r in range(w)]
    out = []
    for i, name in enumerate(meta["names"]):
        v = torch.zeros(meta["numels"][i], dtype=torch.float64)
        hits = torch.zeros(meta["numels"][i], dtype=torch.int64)
        for r in range(w):
            lo, hi = meta["bounds"][r][i]
            v[lo:hi] = parts[r][name].double()
            hits[lo:hi] += 1
        assert bool((hits == 1).all()), f"{name}: fragments do not partition the parameter"
        out.append(v)
    return torch.cat(out)


def oracle(spec, x: torch.Tensor, world: int):
    """F and ∇F in float64 on one process: every rank's evaluation batches, eval mode."""
    wl = make_workload(spec.workload.type, spec.workload.params, 0)
    model = wl.build_model().double().eval()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.vector_to_parameters(x.clone(), params)
    batches = [b for r in range(world) for b in wl.eval_batches(spec.scale.micro_batch_size, r, world)]
    loss = sum(wl.loss(model, tuple(t.double() if t.is_floating_point() else t for t in b)) for b in batches) / len(
        batches
    )
    grads = torch.autograd.grad(loss, params)
    return float(loss), torch.cat([g.reshape(-1) for g in grads]), wl


def oracle_train(spec, x: torch.Tensor, world: int, step: int):
    """f(x; B_step) and its gradient in float64 on one process: the global training batch of
    ``step`` (every rank's micro-batches), for a workload without dropout."""
    wl = make_workload(spec.workload.type, spec.workload.params, 0)
    model = wl.build_model().double().train()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.vector_to_parameters(x.clone(), params)
    mbs, accum = spec.scale.micro_batch_size, spec.scale.grad_accum
    batches = [wl.train_batch(step, m * world + r, mbs) for m in range(accum) for r in range(world)]
    loss = sum(wl.loss(model, tuple(t.double() if t.is_floating_point() else t for t in b)) for b in batches)
    loss = loss / len(batches)
    grads = torch.autograd.grad(loss, params)
    return float(loss), torch.cat([g.reshape(-1) for g in grads])


def rel(a, b, scale) -> float:
    if a is None or b is None:
        return math.inf
    return abs(a - b) / max(scale, 1e-300)


def check_train(case, spec, rows, engine_g, recorded, trial_loss) -> dict:
    """The training objective: teacher-forced sums, f(x_e; B_e) against the trial's own training
    loss at step e (same weights, batch and dropout masks), and, without dropout, float64."""
    errs: dict[str, float] = {}

    def put(k, e):
        errs[k] = max(errs.get(k, 0.0), e)

    world, sd, tid = distributed.world_size(), spec.study_dir, f"t{case['id']}"
    y = assemble(sd, tid, rows[0]["ref_step"])
    for r in rows:
        e = r["step"]
        x = assemble(sd, tid, e)
        put("snapshot_vs_trained_params", float((x - recorded[e]).abs().max()))
        g, d = engine_g[e], x - y
        put("tf_ip_grad_dist", rel(r["ip_grad_dist"], float(g @ d), float(g.norm() * d.norm())))
        put("tf_sq_grad", rel(r["sq_grad"], float(g @ g), float(g @ g)))
        if e in trial_loss:  # the last snapshot's batch B_T is one the trial never stepped on
            put("trial_train_loss", rel(r["loss_x"], trial_loss[e], abs(trial_loss[e])))
        if case["workload"] == "quadratic":  # no dropout: the float64 model sees the same function
            loss_x, g64 = oracle_train(spec, x, world, e)
            loss_y, _ = oracle_train(spec, y, world, e)
            put("fp64_loss_x", rel(r["loss_x"], loss_x, abs(loss_x)))
            put("fp64_loss_y", rel(r["loss_y"], loss_y, abs(loss_y)))
            put("fp64_ip_grad_dist", rel(r["ip_grad_dist"], float(g64 @ d), float(g64.norm() * d.norm())))
            put("fp64_grad", float((g - g64).norm() / g64.norm()))
    return errs


def check(case, spec, rows, engine_g, final_eval, recorded) -> dict:
    errs: dict[str, float] = {}

    def put(k, e):
        errs[k] = max(errs.get(k, 0.0), e)

    world = distributed.world_size()
    sd, tid = spec.study_dir, f"t{case['id']}"
    ref_step = rows[0]["ref_step"]
    y = assemble(sd, tid, ref_step)
    loss_y, _, wl = oracle(spec, y, world)
    for r in rows:
        e = r["step"]
        x = assemble(sd, tid, e)
        put("snapshot_vs_trained_params", float((x - recorded[e]).abs().max()))  # bit-for-bit
        loss_x, g64, _ = oracle(spec, x, world)
        g = engine_g[e]
        d = x - y
        # teacher-forced: the same gradient the engine reduced, full float64 sums
        put("tf_ip_grad_dist", rel(r["ip_grad_dist"], float(g @ d), float(g.norm() * d.norm())))
        put("tf_sq_grad", rel(r["sq_grad"], float(g @ g), float(g @ g)))
        put("tf_sq_dist", rel(r["sq_dist"], float(d @ d), float(d @ d)) if e != ref_step else abs(r["sq_dist"]))
        # against the float64 model: fp32 forward/backward rounding is part of the error
        put("fp64_loss_x", rel(r["loss_x"], loss_x, abs(loss_x)))
        put("fp64_loss_y", rel(r["loss_y"], loss_y, abs(loss_y)))
        put("fp64_loss_gap", rel(r["loss_gap"], loss_x - loss_y, abs(loss_x)))
        put("fp64_ip_grad_dist", rel(r["ip_grad_dist"], float(g64 @ d), float(g64.norm() * d.norm())))
        put("fp64_grad", float((g - g64).norm() / g64.norm()))
        if r.get("hessian_top"):
            put_hessian(put, r, case, wl, spec, x, world)
    last = max(r["step"] for r in rows)
    put("final_eval_loss", rel(next(r["loss_x"] for r in rows if r["step"] == last), final_eval, abs(final_eval)))
    return errs


def put_hessian(put, r, case, wl, spec, x, world) -> None:
    if case["workload"] == "quadratic":  # H = A ⊗ I_cols: closed forms
        lam = float(wl.spectrum.max())
        trace = float(wl.cfg.cols * torch.trace(wl.A))
        a = wl.A
        var = 2 * wl.cfg.cols * (float((a * a).sum()) - float((torch.diagonal(a) ** 2).sum()))
    else:  # exact float64 Hessian of the oracle's F
        h = exact_hessian(spec, x, world)
        ev = torch.linalg.eigvalsh(h)
        lam, trace = float(ev.max()), float(torch.trace(h))
        var = 2 * (float((h * h).sum()) - float((torch.diagonal(h) ** 2).sum()))
    put("hessian_lambda_max", rel(r["hessian_top"][0], lam, abs(lam)))
    m = r["hutchinson_samples"]
    # Hutchinson is random: its error in units of its true standard deviation sqrt(var / m)
    put("hutchinson_sigmas", abs(r["hutchinson_trace"] - trace) / math.sqrt(var / m))


def exact_hessian(spec, x, world) -> torch.Tensor:
    wl = make_workload(spec.workload.type, spec.workload.params, 0)
    model = wl.build_model().double().eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in model.named_parameters() if p.requires_grad]
    batches = [
        tuple(t.double() if t.is_floating_point() else t for t in b)
        for r in range(world)
        for b in wl.eval_batches(spec.scale.micro_batch_size, r, world)
    ]

    def f(flat):
        ps, off = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            ps[n] = flat[off : off + k].reshape(s)
            off += k
        return sum(wl.loss(lambda inp: torch.func.functional_call(model, ps, (inp,)), b) for b in batches) / len(
            batches
        )

    return torch.autograd.functional.hessian(f, x.clone())


# ------------------------------------------------------------------------------------ driver
def run_case(case: dict, storage: str) -> dict:
    spec = spec_for(case, storage)
    tid = f"t{case['id']}"
    plan = TrialPlan(trial_id=tid, label="x", optimizer="adamw", hparams={"lr": case.get("lr", 0.05)}, seed=0, index=0)
    SnapshotMeasurer.study_dir, SnapshotMeasurer.trial_id = spec.study_dir, tid
    if distributed.rank() == 0:
        (spec.study_dir / "plan.json").write_text(json.dumps([plan.as_dict()]))
    reports = []
    engine_g = {}
    stage = case["stage"]

    def on_grad(step, view):
        engine_g[step] = full_grads(view.engine, stage)

    hess = HessianOptions(**case["hessian"]) if case.get("hessian") else None
    with zero_config(case.get("ds_extra")):
        t0 = time.time()
        run_trial(spec, plan, report=reports.append, measurer_cls=SnapshotMeasurer)
        recorded = SnapshotMeasurer.last.full
        t1 = time.time()
        objective = case.get("objective", "eval")
        ref = case.get("reference", "final")
        rows = replay_rank(spec, plan, spec.study_dir, ref, hess, on_grad=on_grad, objective=objective)
        t2 = time.time()
    out = {
        "case": case,
        "train_s": t1 - t0,
        "replay_s": t2 - t1,
        "steps": snapshots.committed_steps(spec.study_dir, tid),
        "n_rows": len(rows),
    }
    if distributed.rank() == 0:
        stored = read_replay(spec.study_dir, tid, ref, objective).to_pylist()
        out["stored_equals_returned"] = [{k: s[k] for k in r} for s, r in zip(stored, rows)] == rows
        out["stored_objective"] = sorted({s["objective"] for s in stored})
        if objective == "train":
            steps = read_steps(spec.study_dir, trial_ids=[tid]).to_pylist()
            trial_loss = {int(r["step"]): float(r["loss"]) for r in steps}
            out["errors"] = check_train(case, spec, rows, engine_g, recorded, trial_loss)
        else:
            out["errors"] = check(case, spec, rows, engine_g, reports[-1]["eval_loss"], recorded)
        out["rows"] = rows
    return out


def main() -> None:
    """argv: OUT.json CASES STORAGE (the studies stay there for the CLI and file-level tests)."""
    out_path, cases, storage = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    distributed.init_process_group("gloo")
    run_cases(out_path, cases, storage, run_case)


if __name__ == "__main__":
    main()
