"""Multi-rank checks, run under `torchrun --nproc_per_node W tests/dist/harness.py OUT.json CASES`.

One process group, a loop over cases (ZeRO stage x workload x gradient accumulation), so a world
size costs one torchrun job (CI budget). For every case it runs the real `opt_study.trial.run_trial`
with a measurer subclass that, in the test only, also gathers FULL tensors through DeepSpeed's own
`safe_get_full_*` API (an independent path: full-size all-reduces per parameter) and then checks
every raw sum, loss and derived metric against `opt_study.measure.reference` at every measured step
(teacher forcing, docs/METRICS.md §Correctness contract). Rank 0 writes the findings as JSON;
pytest asserts on them.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from opt_study import distributed
from opt_study.measure import curvature, names, reference
from opt_study.measure.hook import StepMeasurer
from opt_study.measure.shards import ShardView
from opt_study.plan import TrialPlan
from opt_study.trial.loop import run_trial
from opt_study.validate import parse_study


def full_params(engine, stage: int, precision: str = "fp32") -> torch.Tensor:
    """The full fp32 master vector: the module's own weights only at ZeRO-0 fp32 (under bf16 they
    are bf16 copies; the masters live in the optimizer and DeepSpeed's API gathers them)."""
    from deepspeed.utils import safe_get_full_fp32_param

    ps = [p for p in engine.module.parameters() if p.requires_grad]
    if stage == 0 and precision == "fp32":
        return torch.cat([p.detach().double().reshape(-1) for p in ps])
    return torch.cat([safe_get_full_fp32_param(p).detach().double().reshape(-1) for p in ps])


def full_grads(engine, stage: int, precision: str = "fp32") -> torch.Tensor:
    from deepspeed.utils import safe_get_full_grad

    ps = [p for p in engine.module.parameters() if p.requires_grad]
    if stage == 0 and precision == "fp32":
        return torch.cat([p.grad.detach().double().reshape(-1) for p in ps])
    return torch.cat([safe_get_full_grad(p).detach().double().reshape(-1) for p in ps])


def full_vhat(engine, stage: int, precision: str = "fp32") -> torch.Tensor:
    """The full Adam preconditioner P = √v̂ + ε (float64), v̂ = exp_avg_sq / (1 − β2^k), from the
    client's state at ZeRO-0 fp32 and DeepSpeed's safe_get_full_optimizer_state otherwise (an
    independent path to the adapter's fragments; a collective at ZeRO 1-3)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    opt = engine.optimizer
    client = getattr(opt, "optimizer", opt)
    ps = [p for p in engine.module.parameters() if p.requires_grad]
    if stage == 0 and precision == "fp32":
        v = torch.cat([client.state[p]["exp_avg_sq"].double().reshape(-1) for p in ps])
    else:
        v = torch.cat([safe_get_full_optimizer_state(p, "exp_avg_sq").double().reshape(-1) for p in ps])
    (_, beta2), eps = client.param_groups[0]["betas"], client.param_groups[0]["eps"]
    k = int(float(next(st["step"] for st in client.state.values() if "step" in st)))
    return (v / (1 - beta2**k)).sqrt() + eps


def engine_snapshot(engine, stage: int, precision: str = "fp32") -> dict:
    """Everything a probe could disturb: optimizer state, counters, buffers, RNG, weights, ZeRO
    gradient bookkeeping. Deep copies, compared exactly."""
    opt = engine.optimizer
    client = getattr(opt, "optimizer", opt)
    state = {
        f"{i}.{k}": v.detach().clone() if torch.is_tensor(v) else v
        for i, st in enumerate(client.state.values())
        for k, v in st.items()
    }
    snap = {
        "state": state,
        "rng": torch.get_rng_state().clone(),
        "counters": (
            engine.global_steps,
            engine.micro_steps,
            engine.global_samples,
            engine.is_gradient_accumulation_boundary(),
            getattr(opt, "micro_step_id", None),
        ),
        "buffers": {n: b.detach().clone() for n, b in engine.module.named_buffers()},
        "params": full_params(engine, stage, precision),
        # the weights the forward reads (bf16 copies under bf16), not only the masters
        "weights": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
        "lr": [g["lr"] for g in client.param_groups],
    }
    if stage in (1, 2, 3):
        snap["avg_grads"] = sorted(
            k for k, v in (getattr(opt, "averaged_gradients", {}) or {}).items() if v is not None
        )
    if stage == 0:
        snap["grads"] = [p.grad is None for p in engine.module.parameters()]
    return snap


def diff_snapshots(a: dict, b: dict) -> list[str]:
    out = []
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            bad = [n for n in x if not (torch.equal(x[n], y[n]) if torch.is_tensor(x[n]) else x[n] == y[n])]
            out += [f"{k}.{n}" for n in bad]
        elif torch.is_tensor(x):
            out += [] if torch.equal(x, y) else [k]
        elif x != y:
            out.append(f"{k}: {x} != {y}")
    return out


class RecordingView(ShardView):
    """A ShardView that also records the full tensors at the moments the measurer reads shards."""

    def clone_params(self):
        self.full_x = full_params(self.engine, self.stage, self.precision)
        return super().clone_params()

    def clone_grads(self):
        self.full_g = full_grads(self.engine, self.stage, self.precision)
        return super().clone_grads()


class RecordingMeasurer(StepMeasurer):
    last = None  # the instance of the most recent run, for the caller to inspect
    reference_fn = None  # run_case sets reference_losses_fn(spec) before each case
    grads_fn = None  # and reference_grads_fn(spec): float64 gradients (measure.fp32_grads)

    def __init__(self, engine, info, cfg, **kw):
        super().__init__(engine, info, cfg, **kw)
        self.view.__class__ = RecordingView
        self.view.stage, self.view.precision = info.zero_stage, info.precision
        self.log: list[dict] = []
        # each parameter tensor's full numel, in full_params' order (ZeRO-3 keeps it in ds_numel)
        self.sizes = [int(getattr(p, "ds_numel", p.numel())) for _, p in self.view.named]
        self.reference_losses = RecordingMeasurer.reference_fn  # fp32 losses of a plain model
        self.reference_grads = RecordingMeasurer.grads_fn
        RecordingMeasurer.last = self

    def begin(self, step):
        super().begin(step)
        # gathered here, not in clone_params: a norms-only step reuses the buffer x_{t+1} was
        # written into (hook._norms_only_row) and copies nothing
        x = full_params(self.engine, self.view.stage, self.view.precision) if self.x_t is not None else None
        self.rec = {"step": step, "sizes": self.sizes, "x": x}

    def at_boundary(self):
        super().at_boundary()
        keeps = self.x_t is not None  # a norms-only step reads g_t in place, without clone_grads
        self.rec["g"] = full_grads(self.engine, self.view.stage, self.view.precision) if keeps else None

    def end(self, step, loss_local, loss_fn, **kw):
        self.view.full_g = None
        self.rec["lr"] = kw.get("lr")
        stage, precision = self.view.stage, self.view.precision
        before = engine_snapshot(self.engine, stage, precision) if self.measured else None
        batches, rng_states = self.batches, self.rng_states
        kept_before = self._kept_numel()  # x_{t−1} (next_batch), Δ_{t−1}, g_{t−1} still held
        row = super().end(step, loss_local, loss_fn, **kw)
        if before is not None:  # the probe ran inside end(): nothing of the engine may differ
            self.rec["probe_state_diff"] = diff_snapshots(before, engine_snapshot(self.engine, stage, precision))
        train = torch.tensor([float(loss_local) / self.info.world_size], dtype=torch.float64, device=self.engine.device)
        distributed.all_reduce_sum(train)  # the training forward's own loss (bf16 under bf16)
        self.rec["train_loss"] = float(train[0])
        self.rec["kept_numel"] = max(kept_before, self._kept_numel())
        self.rec["local_numel"] = self.view.local_numel()
        self.rec["g_plus"] = self.view.full_g if self.measured else None
        self.rec["x_next"] = full_params(self.engine, stage, precision)
        if row.get("sharpness_precond") is not None:  # the same on every rank: a common collective
            self.rec["precond"] = full_vhat(self.engine, stage, precision)
        if self.measured and self.reference_losses is not None:
            # fp32 forwards of a plain copy of the model at x_t and p = x_t + sΔ_t (p formed as
            # the hook forms it, fp32 x + s·Δ), on this rank's micro-batches with their masks
            x, s = self.rec["x"], row["probe_s"]
            p = torch.add(x.float(), (self.rec["x_next"] - x).float(), alpha=s)
            points = [x.float(), p]
            if row.get("nb_loss_prev") is not None:  # and x_{t−1} (step t−1's record), same masks
                assert self.log[-1]["step"] == step - 1
                points.append(self.log[-1]["x"].float())
            self.rec["ref_losses"] = self.reference_losses(points, batches, rng_states)
        if self.measured and row.get(names.GRAD_PRECISION) == "fp32" and precision != "fp32":
            self._record_fp32_grads(row, batches, rng_states)
        self.rec["row"] = row
        self.rec["norms_only"] = self.g_sq is not None
        self.rec["engine_norm"] = self.engine.get_global_grad_norm()
        self.log.append(self.rec)
        return row

    def _probe(self, *a):
        out = super()._probe(*a)
        self._g_plus = out[0]  # g⁺ fragments as the hook computed them (fp32grad: no engine probe)
        return out

    def _record_fp32_grads(self, row: dict, batches, rng_states) -> None:
        """measure.fp32_grads: the hook's fp32 g_t and g⁺_t fragments gathered whole ("g32",
        "gp32"; the row's sums read them), and an independent float64 gradient at the same
        gathered fp32 points x_t and p on the same micro-batches with step t's dropout masks
        ("g64", "gp64")."""
        x, s = self.rec["x"], row["probe_s"]
        # p as the hook forms it: the masters x_{t+1} for s = 1, else fp32 x_t + s·Δ_t
        p = self.rec["x_next"] if s == 1.0 else torch.add(x.float(), (self.rec["x_next"] - x).float(), alpha=s)
        self.rec["g32"] = gather_fragments(self.view, self.g_t, self.sizes)
        self.rec["gp32"] = gather_fragments(self.view, self._g_plus, self.sizes)
        self.rec["g64"], self.rec["gp64"] = self.reference_grads([x, p.double()], batches, rng_states)

    def _kept_numel(self) -> int:
        """Elements of the distinct flat buffers the measurer holds (a buffer kept under two
        names, e.g. x_t as x_{t−1} for the next step, counts once)."""
        held = [self.x_t, self.g_t, self.g_train, self.x0, self.prev_delta, self.prev_g, self.prev_x]
        held.append(self.history.sum if self.history is not None else None)  # S (grad_history)
        return sum({ts.flat.data_ptr(): ts.flat.numel() for ts in held if ts is not None}.values())


# ------------------------------------------------------------------------------------- checks
# Workloads without dropout: checked against an independent float64 loss and gradient too.
DROPOUT_FREE = ("mlp_classify", "plugin", "dataset")


def spec_for(case: dict, storage: str):
    wl = {
        "tiny_lm": {"type": "tiny_lm", "layers": 1, "heads": 2, "width": 32, "context": 16, "dropout": 0.1},
        "mlp_classify": {"type": "mlp_classify", "dataset": "digits", "hidden": [32], "dropout": 0.0},
        # a plugin given only by import path (examples/custom_workload, on PYTHONPATH)
        "plugin": {"type": "byo_example.models:TeacherStudent", "dim": 8, "hidden": 16},
        # the adapters: a Dataset + model by import path (tests/user_code.py), a transformers model
        "dataset": {"type": "dataset", "dataset": "user_code:make_digits", "model": "user_code:make_mlp"},
        "hf_causal_lm": {
            "type": "hf_causal_lm",
            "config": {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 16, "vocab_size": 256},
            "context": 16,
        },
    }[case["workload"]]
    return parse_study(
        {
            "study": {"name": f"h{case['id']}", "storage": storage},
            "workload": wl,
            "scale": {
                "workers": distributed.world_size(),
                "zero_stage": case["stage"],
                "micro_batch_size": 4,
                "precision": case.get("precision", "fp32"),
                "grad_accum": case["gas"],
                "launcher": "worker_group" if distributed.world_size() > 1 else "auto",
            },
            "training": {
                "steps": case.get("steps", 5),
                "eval_every": case.get("steps", 5),
                "grad_clip": case.get("clip"),
            },
            "optimizers": [{"name": case.get("opt", "adamw"), "params": {"lr": 0.01}}],
            "measure": {
                "every": case.get("every", 1),
                "norms": True,
                "noise_scale": True,
                "probe_s": case.get("probe_s", "1"),
                "curvature_every": case.get("curvature_every", 0),
                "lanczos_steps": case.get("lanczos_steps", 20),
                "preconditioned_sharpness": bool(case.get("curvature_every")),
                # "step", or a fixed batch (the same global rows at every world size)
                **({"curvature_batch": case["curvature_batch"]} if "curvature_batch" in case else {}),
                # on unless a case turns it off: every measured number below is then checked
                "next_batch": case.get("next_batch", True),
                # trainit's gradient-history cosine, on in every case (checked below)
                "grad_history": case.get("grad_history", True),
                # g, g⁺ of measured bf16 steps in fp32 (auto: on at ZeRO 0-2, off at ZeRO-3)
                "fp32_grads": case.get("fp32_grads", "auto"),
            },
        }
    )


def reference_loss_grad(spec, x: torch.Tensor, step: int, world: int):
    """Single-process float64 loss and gradient at full x on all N*A micro-batches (no dropout),
    the small-batch noise term and the loss's rounding magnitude M (lossscale, from float64 logits)."""
    from opt_study.measure.lossscale import Capture
    from opt_study.workloads import make_workload

    wl = make_workload(spec.workload.type, spec.workload.params, 0)
    model = wl.build_model().double()
    torch.nn.utils.vector_to_parameters(x.clone(), [p for p in model.parameters() if p.requires_grad])
    n = world * spec.scale.grad_accum
    params = [p for p in model.parameters() if p.requires_grad]
    total, g, small, scale = 0.0, None, 0.0, 0.0
    for idx in range(n):
        batch = tuple(
            t.double() if t.is_floating_point() else t for t in wl.train_batch(step, idx, spec.scale.micro_batch_size)
        )
        with Capture(x.device) as cap:
            loss = wl.loss(model, batch)
        gi = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, params)])
        total, g, small = total + float(loss) / n, gi / n if g is None else g + gi / n, small + float(gi @ gi) / n
        scale += float(cap.value(1)) / n
    return total, g, small, scale


def reference_losses_fn(spec):
    """losses(points, batches, rng_states) -> [global mean fp32 loss at each full point].

    A plain single-process fp32 copy of the model (no DeepSpeed, no hooks) evaluated in train
    mode on this rank's micro-batches with the RNG states their training forwards used (the same
    dropout masks), then averaged over ranks with one all-reduce. The RNG state is put back.
    """
    from opt_study.measure.probe import rng_state, set_rng_state
    from opt_study.workloads import make_workload

    wl = make_workload(spec.workload.type, spec.workload.params, 0)
    model = wl.build_model().float().train()
    params = [p for p in model.parameters() if p.requires_grad]

    def losses(points, batches, rng_states):
        after, out = rng_state(), []
        model.to(batches[0][0].device)  # the trial's device (a GPU run keeps batches there)
        with torch.no_grad():
            for x in points:
                torch.nn.utils.vector_to_parameters(x.to(params[0].device, torch.float32).clone(), params)
                total = 0.0
                for b, st in zip(batches, rng_states):
                    set_rng_state(st)
                    total += float(wl.loss(model, b))
                out.append(total / len(batches) / distributed.world_size())
        set_rng_state(after)
        t = torch.tensor(out, dtype=torch.float64, device=params[0].device)
        distributed.all_reduce_sum(t)
        return t.tolist()

    return losses


def gather_fragments(view, frags, sizes: list[int]) -> torch.Tensor:
    """The whole float64 vector (full_params' order) of which ``frags`` are every rank's
    fragments, laid out as view.bounds(): one SUM all-reduce of a zero vector."""
    full = torch.zeros(sum(sizes), dtype=torch.float64)
    o = 0
    for (lo, hi), f, n in zip(view.bounds(), frags, sizes):
        full[o + lo : o + hi] = f.reshape(-1)[: hi - lo].double().cpu()
        o += n
    return distributed.all_reduce_sum(full)


def reference_grads_fn(spec):
    """grads(points, batches, rng_states) -> [global mean float64 gradient at each full point]:
    a plain single-process float64 copy of the model (no DeepSpeed, no hooks, no functional_call),
    in train mode, autograd of the workload's loss on this rank's micro-batches with the RNG
    states their training forwards used (CPU dropout masks do not depend on the dtype: fp32eval),
    summed over micro-batches and ranks and divided by A·W, as DeepSpeed's reduced g_t."""
    from opt_study.measure.probe import rng_state, set_rng_state
    from opt_study.workloads import make_workload

    wl = make_workload(spec.workload.type, spec.workload.params, 0)
    model = wl.build_model().double().train()
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(points, batches, rng_states):
        after, out = rng_state(), []
        for x in points:
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(x.double().clone(), params)
            g = torch.zeros(x.numel(), dtype=torch.float64)
            for b, st in zip(batches, rng_states):
                set_rng_state(st)
                b = tuple(t.cpu().double() if t.is_floating_point() else t.cpu() for t in b)
                parts = torch.autograd.grad(wl.loss(model, b), params, allow_unused=True)
                g += torch.cat(
                    [(q if q is not None else torch.zeros_like(p)).reshape(-1) for q, p in zip(parts, params)]
                )
            out.append(distributed.all_reduce_sum(g) / (len(batches) * distributed.world_size()))
        set_rng_state(after)
        return out

    return grads


def rel(a: float, b: float, scale: float) -> float:
    if a is None or b is None:
        return math.inf
    if math.isnan(a) and math.isnan(b):
        return 0.0
    return abs(a - b) / max(scale, 1e-300)


def check_case(case: dict, log: list[dict], spec) -> dict:
    errs: dict[str, float] = {"probe_state_diffs": float(sum(len(r.get("probe_state_diff", [])) for r in log))}

    def put(name, e):
        errs[name] = max(errs.get(name, 0.0), e)

    x0 = log[0]["x"]
    for t, r in enumerate(log):
        check_step(case, spec, t, r, log[t - 1] if t > 0 else None, x0, put)
        check_grad_history(spec, r, [p["g"] for p in log[:t]], put)
        if r["row"].get("sharpness") is not None and case["workload"] in DROPOUT_FREE and distributed.rank() == 0:
            check_curvature(spec, t, r, put)
    return errs


def check_curvature(spec, t: int, r: dict, put) -> None:
    """The online curvature of step t against float64 on the full vectors (docs/METRICS.md
    §Online curvature): λ_max of the dense Hessian of f(·; B_t) at x_t (every rank's micro-batches,
    eigvalsh), and λc from the same line search on the float64 loss along x_t + τΔ_t."""
    x, delta, row = r["x"], r["x_next"] - r["x"], r["row"]
    fixed = spec.measure.curvature_batch
    f = reference_objective(spec, t, distributed.world_size(), fixed)
    put("curvature_batch_label", float(row["curvature_batch"] != ("step" if fixed is None else fixed.label)))
    h = torch.autograd.functional.hessian(f, x, vectorize=True)
    lam = float(torch.linalg.eigvalsh(h).max())
    put("sharpness_vs_dense", rel(row["sharpness"], lam, abs(lam)))
    if "precond" in r:  # λ_max(P⁻¹H) = λ_max(P^{-1/2} H P^{-1/2}), P from DeepSpeed's full state
        root = r["precond"].rsqrt()
        lam_p = float(torch.linalg.eigvalsh(root[:, None] * h * root[None, :]).max())
        put("sharpness_precond_vs_dense", rel(row["sharpness_precond"], lam_p, abs(lam_p)))
    with torch.no_grad():
        tau, _ = curvature.critical_step(lambda tau: float(f(x + tau * delta)), spec.measure.critical_forwards)
    ref_c = 2.0 / (tau * r["lr"]) if tau else None
    if ref_c is not None or row["critical_sharpness"] is not None:
        put("critical_sharpness_vs_fp64", rel(row["critical_sharpness"], ref_c, abs(ref_c or 1.0)))


def reference_objective(spec, step: int, world: int, fixed=None):
    """x (full, float64) -> f(x; B_t): a float64 copy of the model, mean over all N*A
    micro-batches of step t (dropout-free workloads only). With a fixed curvature batch
    (measure.curvature_batch) B is instead its whole global batch in one piece, drawn here
    independently of how the trial slices it over ranks and micro-batches."""
    from torch.func import functional_call

    from opt_study.workloads import make_workload

    wl = make_workload(spec.workload.type, spec.workload.params, 0)
    model = wl.build_model().double()
    names_shapes = [(n, p.shape) for n, p in model.named_parameters() if p.requires_grad]
    n = world * spec.scale.grad_accum
    batches = [
        tuple(t.double() if t.is_floating_point() else t for t in wl.train_batch(step, i, spec.scale.micro_batch_size))
        for i in range(n)
    ]
    if fixed is not None:  # the virtual step of curvature_batch.py, written out: 2^32 + S
        whole = wl.train_batch(2**32 + fixed.seed, 0, fixed.size)
        batches, n = [tuple(t.double() if t.is_floating_point() else t for t in whole)], 1

    class Flat(torch.nn.Module):  # the workload's loss calls model(x): a module over the flat vector
        def __init__(self, x):
            super().__init__()
            self.params, o = {}, 0
            for name, shape in names_shapes:
                k = math.prod(shape)
                self.params[name] = x[o : o + k].view(shape)
                o += k

        def forward(self, inp):
            return functional_call(model, self.params, (inp,))

    def f(x: torch.Tensor) -> torch.Tensor:
        m = Flat(x)
        return sum(wl.loss(m, b) for b in batches) / n

    return f


def fp32_grads_on(spec) -> bool:
    """measure.fp32_grads as the hook resolves it (fp32grad.enabled), restated."""
    fg, precision = spec.measure.fp32_grads, spec.scale.precision
    return precision in ("bf16", "fp16") and fg is not False and (fg is True or spec.scale.zero_stage != 3)


def check_step(case: dict, spec, t: int, r: dict, prev: dict | None, x0, put) -> None:
    """Every check of step t's record ``r`` (``prev``: step t−1's, for the `*_prev` sums);
    ``put(name, relative error)`` keeps the maximum per name."""
    world = distributed.world_size()
    row, x = r["row"], r["x"]
    # measure.fp32_grads: a measured row's g and g⁺ are the hook's fp32 ones (checked against the
    # float64 reference below); else DeepSpeed's reduced gradient and the probe's
    g, g_plus = (r["g32"], r["gp32"]) if "g32" in r else (r["g"], r.get("g_plus"))
    g_prev = (prev.get("g32", prev["g"])) if prev else None  # the hook keeps the row's g_t
    delta = r["x_next"] - x
    # every step: the sharded norms against the gathered tensors
    put("grad_norm", rel(row["grad_norm"], float(g.norm()), float(g.norm())))
    put("update_norm", rel(row["update_norm"], float(delta.norm()), float(delta.norm())))
    put("param_norm", rel(row["param_norm"], float(x.norm()), float(x.norm())))
    if r["engine_norm"] is not None and not case.get("clip"):  # DeepSpeed's norm: of its own g
        own = row["grad_norm"] if "g32" not in r else float(r["g"].norm())
        put("engine_grad_norm", rel(own, float(r["engine_norm"]), float(r["g"].norm())))
    expect = "fp32" if row.get("measured") and fp32_grads_on(spec) else spec.scale.precision
    put("grad_precision_mismatch", float(row.get(names.GRAD_PRECISION) != expect))
    if "g32" in r:  # the fp32 gradients against float64 autograd at the same points, same masks
        put("grad_fp32_vs_fp64", float((g - r["g64"]).norm() / r["g64"].norm()))
        put("grad_probe_fp32_vs_fp64", float((g_plus - r["gp64"]).norm() / r["gp64"].norm()))
    if case["workload"] in DROPOUT_FREE:  # dropout-free: an independent float64 loss/grad
        lref, gref, small, mref_t = reference_loss_grad(spec, x, t, world)
        put("loss_vs_fp64", rel(row["loss"], lref, abs(lref)))
        put("grad_vs_fp64", float((g - gref).norm() / gref.norm()))
        if row.get("sq_grad_small") is not None:  # the noise scale's small-batch term
            put("sq_grad_small_vs_fp64", rel(row["sq_grad_small"], small, small))
    if not row.get("measured"):
        return
    s = row["probe_s"]
    if "ref_losses" in r:  # ℓ_t and ℓ⁺_t against fp32 forwards of a plain model, same masks
        put("loss_vs_fp32_ref", rel(row["loss"], r["ref_losses"][0], abs(r["ref_losses"][0])))
        put("loss_probe_vs_fp32_ref", rel(row["loss_probe"], r["ref_losses"][1], abs(r["ref_losses"][1])))
    put("loss_precision_mismatch", float(row.get("loss_precision") != "fp32"))
    if case["workload"] in DROPOUT_FREE:  # the probe point really is x_t + sΔ_t
        lref_p, gref_p, _, mref_p = reference_loss_grad(spec, x + s * delta, t, world)
        put("loss_probe_vs_fp64", rel(row["loss_probe"], lref_p, abs(lref_p)))
        for k, m in (("loss_scale", mref_t), ("loss_probe_scale", mref_p)):  # the floor's M, M⁺
            if math.isfinite(m):
                put(f"{k}_vs_fp64", rel(row[k], m, m))
        put("grad_probe_vs_fp64", float((g_plus - gref_p).norm() / gref_p.norm()))
    d_prev = (prev["x_next"] - prev["x"]) if prev else None
    ref = reference.reference_sums(x=x, g=g, delta=delta, g_plus=g_plus, x0=x0, delta_prev=d_prev, g_prev=g_prev)
    norms = {
        "g": g.norm(),
        "delta": delta.norm(),
        "x": x.norm(),
        "g_plus": g_plus.norm(),
        "x_minus_x0": (x - x0).norm(),
        "gp_minus_g": (g_plus - g).norm(),
        "delta_prev": d_prev.norm() if d_prev is not None else None,
        "g_prev": g_prev.norm() if prev else None,
    }
    norms.update({f"abs_{k}": norms[k] for k in ("x", "g", "g_plus", "delta")})  # ‖|v|‖ = ‖v‖
    for name in names.SUM_NAMES:  # every raw sum (a new one without operands below: KeyError)
        a, b = SUM_OPERANDS[name]
        if name not in ref or (norms[a] is None or norms[b] is None):
            continue
        put(name, rel(row[name], ref[name], float(norms[a] * norms[b])))
    # Σ_i ‖g⁺_i − g_i‖ and Σ_i ‖Δ_i‖ over the full tensors (the authors' smoothness; per-tensor
    # partial sums of every rank's fragments, reduced in the step's one all-reduce)
    check_next_batch(case, spec, t, r, prev, put)
    tref = reference.reference_tensor_norms(g, g_plus, delta, r["sizes"])
    for name in names.TENSOR_NAMES:
        put(name, rel(row[name], tref[name], abs(tref[name])))
    mref = reference.reference_metrics(
        x=x,
        g=g,
        delta=delta,
        g_plus=g_plus,
        delta_prev=d_prev,
        g_prev=g_prev,
        loss=row["loss"],
        loss_probe=row["loss_probe"],
        probe_s=s,
        precision=row[names.GRAD_PRECISION],
        loss_precision=row["loss_precision"],
        loss_scale=row.get("loss_scale"),
        loss_probe_scale=row.get("loss_probe_scale"),
        sizes=r["sizes"],
    )
    for k in ("cls_convexity_fwd", "cls_convexity_bwd", "flag"):
        put(f"{k}_mismatch", float(row.get(k) != mref.get(k)))
    ell = abs(row["loss"])
    gd = float(g.norm() * delta.norm()) + float(g_plus.norm() * delta.norm())
    dd = float(delta.norm()) ** 2
    scales = {
        "loss_change": ell,
        "convexity_gap_fwd": ell + gd,
        "convexity_gap_bwd": ell + gd,
        "trapezoid_residual": ell + gd,
        "smoothness_local": abs(mref["smoothness_local"] or 1),
        "smoothness_authors": abs(mref["smoothness_authors"] or 1),
        "smoothness_descent": 2 * gd / dd if dd else 1,
        "curvature_secant": 2 * gd / dd if dd else 1,
        "step_alpha": 1.0,
        "cos_grad_update": 1.0,
        "cos_update_prev": 1.0,
        "cos_grad_prev": 1.0,
        "noise_floor": abs(mref["noise_floor"] or 1),
    }
    for k in names.DERIVED_NAMES:  # every derived metric; the norms are checked above
        if k in names.NORM_NAMES:
            continue
        a, b = row.get(k), mref.get(k)
        if a is None and b is None:
            continue
        # a metric without a scale above is compared relative to its reference value
        put(k, rel(a, b, scales.get(k, abs(b) if b else 1.0)))


def check_grad_history(spec, r: dict, past: list, put) -> None:
    """The gradient-history columns of a measured step (docs/METRICS.md §Gradient history)
    against reference.reference_grad_history: S_t = Σ_{s<t} g_s in float64 over every earlier
    step's full gradient. Errors relative to ‖g_t‖‖S_t‖ (the dot's scale-aware bound) and ‖S_t‖²."""
    row = r["row"]
    if not row.get("measured"):
        return
    if not spec.measure.grad_history:
        put("gh_present_when_off", float(any(row.get(k) is not None for k in names.GRAD_HISTORY_NAMES)))
        return
    g = r.get("g32", r["g"])  # the row's g_t (fp32 with measure.fp32_grads); S sums training's
    ref = reference.reference_grad_history(g, past)
    if not past:  # step 0: S_0 = 0, no cosine
        put("gh_step0", float(row["grad_history_sq"] != 0.0 or row["cos_grad_history"] is not None))
        return
    gs = float(g.norm()) * math.sqrt(ref["grad_history_sq"])
    put("grad_history_ip", rel(row["grad_history_ip"], ref["grad_history_ip"], gs))
    put("grad_history_sq", rel(row["grad_history_sq"], ref["grad_history_sq"], ref["grad_history_sq"]))
    put("cos_grad_history", rel(row["cos_grad_history"], ref["cos_grad_history"], 1.0))


def check_next_batch(case: dict, spec, t: int, r: dict, prev: dict | None, put) -> None:
    """The next-batch columns of measured step t (docs/METRICS.md §Next-batch gap) against
    reference.reference_next_batch on the full tensors: ⟨g_t, Δ_{t−1}⟩ in float64 with
    Δ_{t−1} = x_t − x_{t−1} from step t−1's record, f(x_{t−1}; B_t) from fp32 forwards of a plain
    model at x_{t−1} with step t's masks (and, dropout-free, the float64 oracle). Null where
    nothing was kept (step 0) or next_batch is off."""
    row = r["row"]
    present = [row.get(k) is not None for k in names.NEXT_BATCH_NAMES]
    if not spec.measure.next_batch or prev is None:
        put("nb_present_when_not_kept", float(any(present)))
        return
    put("nb_missing", float(not all(present)))
    g, d_prev = r.get("g32", r["g"]), prev["x_next"] - prev["x"]
    fp32_prev = r["ref_losses"][2] if len(r.get("ref_losses", ())) > 2 else None  # no plain model: ⟨,⟩ only
    ref = reference.reference_next_batch(
        row["loss"],
        fp32_prev,
        g,
        d_prev,
        x=r["x"],
        loss_scale=row.get("loss_scale"),
        loss_prev_scale=row.get("nb_loss_prev_scale"),
        precision=row[names.GRAD_PRECISION],
        loss_precision=row["loss_precision"],
    )
    ell, gd = abs(row["loss"]), float(g.norm() * d_prev.norm())
    scales = {"nb_loss_prev": ell, "nb_ip_grad_update": gd, "nb_loss_gap": ell, "nb_convexity_gap": ell + gd}
    scales["nb_noise_floor"] = abs(ref["nb_noise_floor"] or 1.0)
    for k in (*scales, names.NEXT_BATCH_CLASS) if fp32_prev is not None else ("nb_ip_grad_update",):
        if k == names.NEXT_BATCH_CLASS:  # the class against the floor, as the oracle's
            put("cls_nb_convexity_mismatch", float(row.get(k) != ref[k]))
        else:
            put(k, rel(row[k], ref[k], scales[k]))
    if case["workload"] in DROPOUT_FREE:  # f(x_{t−1}; B_t) against an independent float64 model
        lref_prev = reference_loss_grad(spec, prev["x"], t, distributed.world_size())[0]
        put("nb_loss_prev_vs_fp64", rel(row["nb_loss_prev"], lref_prev, abs(lref_prev)))


SUM_OPERANDS = {
    "sq_grad": ("g", "g"),
    "sq_grad_probe": ("g_plus", "g_plus"),
    "sq_update": ("delta", "delta"),
    "sq_param": ("x", "x"),
    "sq_dist_init": ("x_minus_x0", "x_minus_x0"),
    "ip_grad_update": ("g", "delta"),
    "ip_probe_update": ("g_plus", "delta"),
    "sq_grad_diff": ("gp_minus_g", "gp_minus_g"),
    "ip_param_update": ("x", "delta"),
    "ip_param_grad": ("x", "g"),
    "ip_update_prev": ("delta", "delta_prev"),
    "ip_grad_prev": ("g", "g_prev"),
    "sq_update_prev": ("delta_prev", "delta_prev"),
    "sq_grad_prev": ("g_prev", "g_prev"),
    "abs_grad_param": ("abs_g", "abs_x"),
    "abs_probe_param": ("abs_g_plus", "abs_x"),
    "abs_probe_update": ("abs_g_plus", "abs_delta"),
}


def run_case(case: dict, storage: str) -> dict:
    spec = spec_for(case, storage)
    plan = TrialPlan(
        trial_id=f"c{case['id']}", label="x", optimizer=case.get("opt", "adamw"), hparams={"lr": 0.01}, seed=0, index=0
    )
    t0 = time.time()
    RecordingMeasurer.reference_fn = reference_losses_fn(spec)
    RecordingMeasurer.grads_fn = reference_grads_fn(spec)
    with zero_config(case.get("zero")):
        run_trial(spec, plan, report=lambda m: None, measurer_cls=RecordingMeasurer)
    m = RecordingMeasurer.last
    out = {
        "case": case,
        "seconds": time.time() - t0,
        "steps": len(m.log),
        "measured": sum(1 for r in m.log if r["row"].get("measured")),
        "errors": check_case(case, m.log, spec),
        "final_x": m.log[-1]["x_next"].tolist() if case.get("keep_final") else None,
        "losses": [r["row"]["loss"] for r in m.log],
        "train_losses": [r["train_loss"] for r in m.log],
        # how far the stored (fp32 re-evaluated) loss is from the training forward's own
        "train_loss_gap": max(
            abs(r["row"]["loss"] - r["train_loss"]) / abs(r["train_loss"]) for r in m.log if r["row"].get("measured")
        )
        if m.log[-1]["row"].get("measured")
        else None,
        "probe_s": [r["row"].get("probe_s") for r in m.log],
        "probe_state_diff": sorted({d for r in m.log for d in r.get("probe_state_diff", [])})[:10],
        "norms_only_steps": sum(1 for r in m.log if r["norms_only"]),
        "kept_ratio": max(r["kept_numel"] / max(r["local_numel"], 1) for r in m.log),
        "local_fraction": m.log[0]["local_numel"] / m.log[0]["x"].numel(),
    }
    return out


@contextlib.contextmanager
def zero_config(extra: dict | None):
    """Merge ``extra`` into the zero_optimization section of the DeepSpeed configs built inside
    (``{"stage3_param_persistence_threshold": 0}``: ZeRO-3 really partitions a tiny model's
    parameters instead of keeping every one gathered)."""
    from opt_study.trial import engine as engine_mod

    orig = engine_mod.ds_config

    def patched(*a, **kw):
        cfg = orig(*a, **kw)
        cfg["zero_optimization"].update(extra or {})
        return cfg

    engine_mod.ds_config = patched
    try:
        yield
    finally:
        engine_mod.ds_config = orig


def run_cases(out_path: str, cases: list[dict], storage: str, run) -> None:
    """Run every case in this process group; a case's exception is recorded, not raised, so the
    others still run; rank 0 writes {"world", "results"} as JSON for pytest to assert on."""
    results = []
    for i, case in enumerate(cases):
        case = {"id": i, **case}
        try:
            results.append(run(case, storage))
        except Exception as e:  # noqa: BLE001 - recorded and asserted on by pytest
            import traceback

            results.append({"case": case, "error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()})
    if distributed.rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"world": distributed.world_size(), "results": results}, f)


def main() -> None:
    out_path, cases = sys.argv[1], json.loads(sys.argv[2])
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: user_code for the dataset adapter
    distributed.init_process_group("gloo")
    with tempfile.TemporaryDirectory() as storage:
        run_cases(out_path, cases, distributed.broadcast_object(storage), run_case)


if __name__ == "__main__":
    main()
