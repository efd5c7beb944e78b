"""Every registered optimizer under real DeepSpeed on 2 CPU ranks, at every (ZeRO stage, precision)
it declares that a CPU runs (fp32, bf16):
`torchrun --nproc_per_node 2 tests/dist/zoo_harness.py OUT.json [NAMES_JSON]`.

One process group loops over the cases (a world costs one torchrun start-up). Each case runs the
real `opt_study.trial.run_trial` for 3 steps on `quadratic`. The measurer subclass below is the
test seam that does, at the points the loop will, the two calls the loop does not make yet:
Sophia's side backward (before engine.step()) and Schedule-Free's eval/train switch around
evaluation. Besides the sweep, three checks of the declarations:

- `lamb_equivalence`: LAMB at ZeRO-0 on 2 ranks equals the single-process optimizer on the same
  global batch, step for step (5 steps, parameters compared on rank 0).
- `shape_rule_zero2_guard`: NovoGrad (declared ZeRO-0 fp32 only) handed to a ZeRO-2 engine is
  caught by optim.check_model_shapes.
- `schedulefree_eval_at_x`: the eval loss run_trial reports for schedulefree_adamw equals the
  float64 loss at the averaged iterate x (and differs from the loss at y).
- `kron_ranks_agree`: PSGD-Kron at ZeRO-0 (every rank steps its own full copy, drawing its
  preconditioner probes at random) leaves the same weights on every rank after 5 steps.
- `whole_tensor`: every whole-tensor rule (optim.whole_tensor) at ZeRO 1, 2 and 3, gradient
  accumulation 1 and 2, fp32 and bf16, against the same rule at ZeRO-0 fp32: 10 steps on
  `mlp_classify` (six tensors, matrices and biases, spread over the ranks' owners), the weights
  after every run and the training losses.
Rank 0 writes the findings as JSON; tests/multirank/test_optim_multirank.py asserts on them.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time

import torch

from opt_study import distributed, optim
from opt_study.config import ScaleConfig
from opt_study.measure.hook import StepMeasurer
from opt_study.plan import TrialPlan
from opt_study.trial.loop import run_trial
from opt_study.validate import parse_study
from opt_study.workloads import make_workload

WORLD_MBS = 4


# Optimizers given only by import path (examples/custom_workload, on PYTHONPATH): swept like
# the built-ins, so a plugin's declared combinations are checked the same way.
PLUGINS = ("byo_example.opt:signum",)


def entries() -> dict:
    """Every optimizer the sweep runs: the registry's, then the plugins (by import path)."""
    return {**optim.OPTIMIZERS, **{n: optim.optimizer_entry(n) for n in PLUGINS}}


def cases(names: list[str] | None = None) -> list[dict]:
    """(optimizer, stage, precision) for every combination each entry declares that runs on CPU
    (fp16 needs a GPU: opt_study.optim.entry.CPU_PRECISIONS), optimizers in registry order."""
    out = []
    for name, e in entries().items():
        if names is None or name in names:
            out += [
                {"opt": name, "stage": s, "prec": p}
                for s, p in sorted(e.combos, key=_combo_order)
                if p in optim.CPU_PRECISIONS
            ]
    return out


def _combo_order(c: tuple[int, str]) -> tuple[int, int]:
    return optim.PRECISIONS.index(c[1]), c[0]  # per optimizer: its fp32 stages, then its bf16 stages


# The whole-tensor check's workload: three matrices and three biases, so both ranks own tensors.
MLP = {"type": "mlp_classify", "dataset": "digits", "hidden": [32, 16]}


def spec_for(
    opt: str, stage: int, steps: int, storage: str, tag: str, precision: str = "fp32", workload=None, gas: int = 1
):
    return parse_study(
        {
            "study": {"name": f"zoo-{tag}", "storage": storage},
            "workload": workload or {"type": "quadratic"},
            "scale": {
                "workers": distributed.world_size(),
                "zero_stage": stage,
                "micro_batch_size": WORLD_MBS,
                "launcher": "worker_group",
                "precision": precision,
                "grad_accum": gas,
            },
            "training": {"steps": steps, "eval_every": steps},
            "optimizers": [{"name": opt}],
            "measure": {"every": 0},
        }
    )


class ZooMeasurer(StepMeasurer):
    """Records losses and the final full parameters; makes the loop's future optimizer calls."""

    workload = None  # set by run_case: the trial's workload (same type, config and seed)
    last = None

    def __init__(self, engine, info, cfg, **kw):
        super().__init__(engine, info, cfg, **kw)
        self.losses, self.my_batches, self.x_eval = [], [], None
        ZooMeasurer.last = self

    def begin(self, step):
        optim.train_mode(self.engine.optimizer)  # the loop: before every training step
        self.my_batches = []
        super().begin(step)

    def before_micro(self, batch):
        self.my_batches.append(batch)
        super().before_micro(batch)

    def at_boundary(self):
        super().at_boundary()
        opt = self.engine.optimizer
        if optim.needs_hessian(opt):  # the loop: after the boundary backward, before step()
            batches, module = list(self.my_batches), self.engine.module
            loss_fn = lambda: sum(self.workload.loss(module, b) for b in batches) / len(batches)  # noqa: E731
            optim.estimate_hessian(opt, loss_fn, seed=self.step)

    def end(self, step, loss_local, loss_fn, **kw):
        row = super().end(step, loss_local, loss_fn, **kw)
        self.losses.append(row["loss"])
        if step + 1 == self.total:  # the loop: before evaluating (run_trial evaluates next)
            self.x_train = full_params(self.engine)
            optim.eval_mode(self.engine.optimizer)
            self.x_eval = full_params(self.engine)
        return row


def full_params(engine) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    ps = [p for p in engine.module.parameters() if p.requires_grad]
    if engine.zero_optimization_stage() == 0:
        return torch.cat([p.detach().double().reshape(-1) for p in ps])
    return torch.cat([safe_get_full_fp32_param(p).detach().double().reshape(-1) for p in ps])


def run_case(
    opt: str, stage: int, storage: str, tag: str, steps: int = 3, precision: str = "fp32", workload=None, gas: int = 1
) -> dict:
    spec = spec_for(opt, stage, steps, storage, tag, precision, workload, gas)
    ZooMeasurer.workload = make_workload(spec.workload.type, spec.workload.params, 0)
    # Lookahead's default k = 5 would never sync in 3 steps: k = 2 syncs after step 1.
    hparams = {"k": 2} if "k" in optim.optimizer_entry(opt).defaults and steps < 5 else {}
    plan = TrialPlan(trial_id=tag, label=opt, optimizer=opt, hparams=hparams, seed=0, index=0)
    reports: list[dict] = []
    t0 = time.time()
    summary = run_trial(spec, plan, report=reports.append, measurer_cls=ZooMeasurer)
    m = ZooMeasurer.last
    return {
        "opt": opt,
        "stage": stage,
        "prec": precision,
        "seconds": time.time() - t0,
        "losses": m.losses,
        "eval_loss": reports[-1]["eval_loss"] if reports else math.nan,
        "status": summary["status"],
        "x_train": m.x_train,
        "x_eval": m.x_eval,
    }


def quadratic_loss_at(x: torch.Tensor, centres: torch.Tensor, a: torch.Tensor) -> float:
    """float64 mean over samples of ½ tr((X − C_i)ᵀ A (X − C_i))."""
    d = x.view(1, *centres.shape[1:]) - centres.double()
    return float(0.5 * (d * torch.matmul(a, d)).sum(dim=(1, 2)).mean())


def lamb_reference(steps: int) -> torch.Tensor:
    """Single-process LAMB on the 2-rank run's global batch: ranks r = 0, 1 see train_batch(t, r)."""
    wl = make_workload("quadratic", None, 0)
    model = wl.build_model()
    opt = optim.build_optimizer("lamb", model.parameters(), {})
    world = distributed.world_size()
    for t in range(steps):
        opt.zero_grad()
        loss = sum(wl.loss(model, wl.train_batch(t, r, WORLD_MBS)) for r in range(world)) / world
        loss.backward()
        opt.step()
    return model.X.detach().double().reshape(-1)


def shape_rule_zero2_guard(name: str = "novograd") -> str:
    """The RuntimeError text check_model_shapes raises for a ZeRO-0-only rule inside a ZeRO-2
    engine ('' if none)."""
    from opt_study.trial import engine as engine_mod

    model = make_workload("quadratic", None, 0).build_model()
    client = optim.build_optimizer(name, model.parameters(), {})
    scale = ScaleConfig(
        workers=distributed.world_size(), zero_stage=2, micro_batch_size=WORLD_MBS, launcher="worker_group"
    )
    eng, _ = engine_mod.build_engine(model, client, scale, None)
    try:
        optim.check_model_shapes(client, eng.module)
    except RuntimeError as e:
        return str(e)
    return ""


def main() -> None:
    out_path = sys.argv[1]
    names = json.loads(sys.argv[2]) if len(sys.argv) > 2 else None
    distributed.init_process_group("gloo")
    results, extra = [], {}
    with tempfile.TemporaryDirectory() as storage:
        storage = distributed.broadcast_object(storage)
        for i, c in enumerate(cases(names)):
            try:
                r = run_case(c["opt"], c["stage"], storage, f"c{i}", precision=c["prec"])
                r.pop("x_train"), r.pop("x_eval")
                results.append(r)
            except Exception as e:  # noqa: BLE001 - recorded and asserted on by pytest
                import traceback

                results.append({**c, "error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()})
        if names is None:
            extra = checks(storage)
    if distributed.rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"world": distributed.world_size(), "results": results, **extra}, f)


def checks(storage: str) -> dict:
    out = {}
    t0 = time.time()
    r = run_case("lamb", 0, storage, "lamb5", steps=5)
    ref = lamb_reference(5)
    x0 = make_workload("quadratic", None, 0).X0.double().reshape(-1)
    out["lamb_equivalence"] = {
        "max_abs_diff": float((r["x_train"] - ref).abs().max()),
        "max_abs": float(ref.abs().max()),
        "moved": float((ref - x0).abs().max()),
    }
    out["shape_rule_zero2_guard"] = shape_rule_zero2_guard()
    r = run_case("schedulefree_adamw", 0, storage, "sfx", steps=3)
    wl = make_workload("quadratic", None, 0)
    out["schedulefree_eval_at_x"] = {
        "reported": r["eval_loss"],
        "at_x": quadratic_loss_at(r["x_eval"], wl.eval_centres, wl.A),
        "at_y": quadratic_loss_at(r["x_train"], wl.eval_centres, wl.A),
    }
    r = run_case("psgd_kron", 0, storage, "kron5", steps=5)
    xs = distributed.all_gather_object(r["x_train"])
    out["kron_ranks_agree"] = {
        "max_abs_diff": max(float((x - xs[0]).abs().max()) for x in xs),
        "moved": float((xs[0] - x0).abs().max()),
        "ranks": len(xs),
    }
    out["whole_tensor"] = whole_tensor_checks(storage)
    out["whole_tensor_matrix"] = {n: sorted(whole_tensor_matrix(n)) for n, e in entries().items() if e.whole_tensor}
    out["whole_tensor_resume"] = [whole_tensor_resume(storage, s) for s in (2, 3)]
    out["checks_seconds"] = time.time() - t0
    return out


WHOLE_TENSOR_STEPS = 10


def whole_tensor_matrix(name: str) -> set[tuple[int, str, int]]:
    """(stage, precision, accumulation) of the whole-tensor check for rule `name`: every sharded
    CPU combination it declares, fp32 at accumulation 1 and 2, bf16 at 1 (bf16's rounding, not
    the route, would set an accumulation-2 tolerance)."""
    e = entries()[name]
    sharded = [(s, p) for s, p in e.combos if s > 0 and p in optim.CPU_PRECISIONS]
    return {(s, p, g) for s, p in sharded for g in (1, 2) if (p, g) != ("bf16", 2)}


def whole_tensor_checks(storage: str) -> list[dict]:
    """Per whole-tensor rule, per (stage 1-3, precision, gradient accumulation): the largest
    absolute difference of the weights after 10 steps from the same rule's at ZeRO-0 fp32 (same
    accumulation; bf16 also from bf16 at ZeRO-1), that reference's largest weight and how far it
    moved, and both loss traces."""
    out = []
    x0 = full_x0(MLP, storage)
    for name, e in entries().items():
        if not e.whole_tensor:
            continue
        for gas in (1, 2):
            ref = run_case(name, 0, storage, f"wt-{name}-0-{gas}", WHOLE_TENSOR_STEPS, workload=MLP, gas=gas)
            bf16_first = None
            for s, prec in sorted(c for c in e.combos if c[0] > 0 and c[1] in optim.CPU_PRECISIONS):
                if (s, prec, gas) not in whole_tensor_matrix(name):
                    continue
                r = run_case(name, s, storage, f"wt-{name}-{s}-{prec}-{gas}", WHOLE_TENSOR_STEPS, prec, MLP, gas)
                row = {
                    "opt": name,
                    "stage": s,
                    "prec": prec,
                    "gas": gas,
                    "max_abs_diff": float((r["x_train"] - ref["x_train"]).abs().max()),
                    "max_abs": float(ref["x_train"].abs().max()),
                    "moved": float((ref["x_train"] - x0).abs().max()),
                    "lr": float(optim.resolve_hparams(name, {})["lr"]),
                    "losses": r["losses"],
                    "ref_losses": ref["losses"],
                }
                if prec == "bf16":
                    bf16_first = bf16_first if bf16_first is not None else (s, r["x_train"])
                    row["vs_stage"] = bf16_first[0]
                    row["max_abs_diff_vs_stage"] = float((r["x_train"] - bf16_first[1]).abs().max())
                out.append(row)
    return out


def whole_tensor_resume(storage: str, stage: int, name: str = "muon") -> dict:
    """A 6-step run that checkpoints after step 3, then the same trial started again: it resumes
    from that checkpoint (the owners' rule state comes back through DeepSpeed's checkpoint,
    `WholeTensorOptimizer.state_dict`) and must end on the first run's weights."""
    spec = parse_study(
        {
            "study": {"name": f"zoo-wtr{stage}", "storage": storage},
            "workload": MLP,
            "scale": {
                "workers": distributed.world_size(),
                "zero_stage": stage,
                "micro_batch_size": WORLD_MBS,
                "launcher": "worker_group",
            },
            "training": {"steps": 6, "eval_every": 3, "checkpoint_every": 3},
            "optimizers": [{"name": name}],
            "measure": {"every": 0},
        }
    )
    ZooMeasurer.workload = make_workload(spec.workload.type, spec.workload.params, 0)
    plan = TrialPlan(trial_id="r", label=name, optimizer=name, hparams={}, seed=0, index=0)
    run_trial(spec, plan, report=lambda r: None, measurer_cls=ZooMeasurer)
    first = ZooMeasurer.last.x_train
    run_trial(spec, plan, report=lambda r: None, measurer_cls=ZooMeasurer)
    again = ZooMeasurer.last
    return {
        "opt": name,
        "stage": stage,
        "steps_rerun": len(again.losses),
        "max_abs_diff": float((again.x_train - first).abs().max()),
    }


def full_x0(workload: dict, storage: str) -> torch.Tensor:
    spec = spec_for("adamw", 0, 1, storage, "x0", workload=workload)
    model = make_workload(spec.workload.type, spec.workload.params, 0).build_model()
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters() if p.requires_grad])


if __name__ == "__main__":
    main()
