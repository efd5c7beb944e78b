"""The step hook: decides when to measure, keeps the shard state it needs, runs the probe, and
turns this rank's shard into global numbers with ONE all-reduce per step.

Cadence (levanter-style declared hook): a step is *measured* when measure.every = k > 0 and
(t+1) % k == 0, and also at every evaluation/report boundary, since a scheduler may stop the trial
there. The decision depends only on the step number, so every rank joins every collective. The
shards of Δ and g are kept from the step before every measured step (METRICS.md: the `*_prev`
sums are then never null).

Every step (unless measure.norms is off) records loss, ‖g‖, ‖Δ‖, ‖x‖ from the local shards; a
measured step adds the same-batch probe (opt_study.measure.probe) and every raw sum of METRICS.md.
"""
from __future__ import annotations

import math
import random

import torch

from opt_study import distributed
from opt_study.measure import fp32eval, metrics, probe as probe_mod
from opt_study.measure.shards import FlatShard, ShardView, flatten
from opt_study.measure.sums import SUM_NAMES, flat_sums, group_runs, pack, unpack


NORM_SUMS = ("sq_grad", "sq_update", "sq_param")
# ‖Δ_{t−1}‖² and ‖g_{t−1}‖² are step t−1's own sq_update and sq_grad, over the very buffers kept
# as Δ_{t−1} and g_{t−1}: this rank's partial values are kept from its sums, not recomputed.
PREV_OF = {"sq_update_prev": "sq_update", "sq_grad_prev": "sq_grad"}


def group_names(param_names: list[str]) -> tuple[list[str], list[int]]:
    """Parameter groups for per-group sums: the module path truncated to two components.

    e.g. 'blocks.0.attn.qkv.weight' -> 'blocks.0', 'embed.weight' -> 'embed'. Stable across ranks
    because every rank sees the same module names.
    """
    keys = []
    for n in param_names:
        parts = n.split(".")[:-1] or [n]
        keys.append(".".join(parts[:2]) if parts[0] and len(parts) > 1 and parts[1].isdigit() else parts[0])
    names = sorted(set(keys))
    return names, [names.index(k) for k in keys]


class StepMeasurer:
    def __init__(self, engine, info, cfg, precision: str, eval_every: int, total_steps: int,
                 seed: int = 0, norms: bool = True, small_batch: int = 1):
        self.engine, self.info, self.cfg, self.precision = engine, info, cfg, precision
        self.eval_every, self.total, self.norms = eval_every, total_steps, norms
        self.small_batch = small_batch  # samples in one rank's micro-batch (the noise scale's b)
        self.view = ShardView(engine, info.zero_stage, precision, info.rank, info.world_size)
        self.groups, self.group_of = group_names(self.view.names)
        self.seed = seed  # probe_s draws: a private stream per (seed, step), never the global RNG
        # Under bf16/fp16 the losses entering differences are re-evaluated in fp32 on measured
        # steps (opt_study.measure.fp32eval); `loss` and `loss_probe` then say "fp32".
        self.refit_fp32 = precision in ("bf16", "fp16")
        self.x0 = self.view.clone_params() if cfg.every > 0 else None
        self.prev_delta = self.prev_g = self.prev_sq = None
        self.collecting, self.small_sq = False, 0.0
        self.accum = engine.gradient_accumulation_steps()
        if getattr(cfg, "noise_scale", False):
            for _, p in self.view.named:
                p.register_hook(self._micro_grad_hook)
        self._reset(-1)

    def _micro_grad_hook(self, grad: torch.Tensor) -> None:
        """Tensor hooks run in autograd before DeepSpeed's reduction hooks: this is one rank's
        micro-batch gradient of loss/A (DeepSpeed scales by the accumulation steps)."""
        if self.collecting:
            g = grad.detach().reshape(-1).float()
            self.small_sq += float(torch.dot(g, g)) * self.accum**2

    # ------------------------------------------------------------------------------- cadence
    def is_measured(self, step: int) -> bool:
        k = self.cfg.every
        if k <= 0:
            return False
        return (step + 1) % k == 0 or (step + 1) % self.eval_every == 0 or step + 1 == self.total

    def _reset(self, step: int) -> None:
        self.step, self.x_t, self.g_t, self.batches, self.rng_states = step, None, None, [], []
        self.measured = self.is_measured(step) if step >= 0 else False
        self.keep_prev = self.is_measured(step + 1) if step >= 0 else False

    def begin(self, step: int) -> None:
        self._reset(step)
        self.small_sq = 0.0
        self.collecting = self.measured and getattr(self.cfg, "noise_scale", False)
        if self.norms or self.measured or self.keep_prev:
            self.x_t = self.view.clone_params()

    def before_micro(self, batch) -> None:
        """Keep the micro-batch and the RNG state its forward uses (the probe replays both)."""
        if self.measured:
            self.batches.append(batch)
            self.rng_states.append(probe_mod.rng_state())

    def at_boundary(self) -> None:
        """After the accumulation-boundary backward, before step(): the reduced gradient exists."""
        self.collecting = False  # the probe's backward must not count as a micro-batch
        if self.x_t is not None:
            self.g_t = self.view.clone_grads()

    # ----------------------------------------------------------------------------- the numbers
    def end(self, step: int, loss_local: torch.Tensor, loss_fn, stop_vote: bool = False,
            model_loss_fn=None) -> dict:
        """Called after engine.step(); returns this step's row fields (same on every rank).

        `loss_fn(batch)` is the loss through the engine (the probe's forward + backward);
        `model_loss_fn(model, batch)` the workload's loss of any module (the fp32 re-evaluation
        under bf16/fp16 needs it; without it the losses stay in the training precision).
        `stop_vote` (rank 0's view of the study's stop request) is summed in the same all-reduce;
        afterwards `self.stop_requested` is the same on every rank. `loss_precision` in the row
        says in which precision `loss` (and `loss_probe`) were evaluated.
        """
        world = self.info.world_size
        small = self.small_sq / (world * self.accum) if self.measured and getattr(self.cfg, "noise_scale", False) else math.nan
        losses = torch.tensor([float(loss_local) / world, math.nan, float(stop_vote), small], dtype=torch.float64)
        if self.x_t is None:  # norms off and not measured: the loss alone, still one all-reduce
            losses = losses.to(self.engine.device)  # NCCL reduces device tensors only
            distributed.all_reduce_sum(losses)
            self.stop_requested = bool(losses[2] > 0)
            return {"loss": float(losses[0]), "measured": False, "loss_precision": self.precision}
        delta = flatten(self.view.params())  # x_{t+1}, then Δ_t = x_{t+1} − x_t in place (fp32)
        delta.flat.sub_(self.x_t.flat)
        g_plus, s, loss_precision = None, math.nan, self.precision
        if self.measured:
            s = self._draw_s(step)
            g_plus, loss_precision = self._probe(s, delta, losses, loss_fn, model_loss_fn)
        m = self.measured
        kept = {"x": self.x_t, "g": self.g_t, "delta": delta, "g_plus": g_plus,
                "x0": self.x0 if m else None, "delta_prev": self.prev_delta if m else None,
                "g_prev": self.prev_g if m else None}
        only = None if m else NORM_SUMS  # unmeasured steps: the three norms only
        local = self._local_sums(kept, only)
        packed = pack(local, losses)
        # the ONE collective of the sums (setting p for s ≠ 1 and the fp32 re-evaluation under
        # bf16 communicate too, in _probe: they move weights, not measurements)
        distributed.all_reduce_sum(packed)
        per_group, scalars = unpack(packed, len(self.groups))
        self.stop_requested = scalars["stop_votes"] > 0
        self.prev_delta, self.prev_g = (delta, self.g_t) if self.keep_prev else (None, None)
        self.prev_sq = local[[SUM_NAMES.index(v) for v in PREV_OF.values()]] if self.keep_prev else None
        totals = {k: float(v.sum()) for k, v in per_group.items()}
        row = {"loss": scalars["loss"], "grad_norm": _root(totals["sq_grad"]),
               "update_norm": _root(totals["sq_update"]), "param_norm": _root(totals["sq_param"]),
               "measured": self.measured, "loss_precision": loss_precision}
        if self.measured:
            row.update({k: totals[k] for k in totals})
            row.update({"loss_probe": scalars["loss_probe"], "probe_s": s,
                        "sq_grad_small": _finite(scalars["sq_grad_small"])})
            row["noise_scale_simple"] = noise_scale_simple(row["sq_grad_small"], totals["sq_grad"],
                                                           self.small_batch, self.small_batch * world * self.accum)
            derived = metrics.derive(totals, scalars["loss"], scalars["loss_probe"], s, self.precision,
                                     loss_precision=loss_precision)
            row.update({k: v for k, v in derived.items() if k not in ("grad_norm", "update_norm", "param_norm")})
            row["groups"] = {name: {k: float(v[j]) for k, v in per_group.items()}
                              for j, name in enumerate(self.groups)}
        return row

    def _local_sums(self, kept: dict, only) -> torch.Tensor:
        """This rank's partial sums over the kept vectors (shards.FlatShard, or None), which must
        all share x_t's layout: one flat buffer each, summed per group in large chunks."""
        sizes = self.x_t.sizes
        bad = [k for k, v in kept.items() if v is not None and v.sizes != sizes]
        if bad:
            raise RuntimeError(f"kept vectors {bad} are laid out unlike x_t (fragment sizes differ)")
        reuse = kept["delta_prev"] is not None and self.prev_sq is not None
        if reuse:
            only = [n for n in (only or SUM_NAMES) if n not in PREV_OF]
        out = flat_sums({k: v.flat for k, v in kept.items() if v is not None},
                        group_runs(sizes, self.group_of), len(self.groups), only=only)
        if reuse:
            out[[SUM_NAMES.index(n) for n in PREV_OF]] = self.prev_sq
        return out

    def _probe(self, s: float, delta: FlatShard, losses: torch.Tensor, loss_fn, model_loss_fn):
        """The probe at p = x_t + sΔ_t on step t's batch; fills losses[1] (and, re-evaluated in
        fp32, losses[0]) with this rank's share. Returns (g⁺ fragments, the losses' precision).

        With s ≠ 1 the point is set in the weights the forward reads and in the fp32 masters
        (ShardView.write_params: ZeRO-3 edits the partitions, ZeRO 0-2 write this rank's fragment
        and all-reduce the replicated weights, as DeepSpeed's own step all-gathers them), and
        x_{t+1} is written back the same way afterwards: bit-for-bit, since the low-precision
        weights are the same round-to-nearest copy of the same fp32 masters step() made.
        """
        world = self.info.world_size
        x_next = point = None
        if s != 1.0:
            x_next = flatten(self.view.params())  # x_{t+1} exactly, to restore
            point = FlatShard(torch.add(self.x_t.flat, delta.flat, alpha=s), self.x_t.sizes)
            self.view.write_params(point)
        try:
            loss_probe, g_plus = probe_mod.run_probe(self.engine, self.view, self.batches,
                                                     self.rng_states, loss_fn, self.info.zero_stage)
            precision = self.precision
            if self.refit_fp32 and model_loss_fn is not None:
                at = point if point is not None else self.view.params()  # p = x_{t+1}: the masters
                loss_probe = fp32eval.evaluate_losses(self.engine, self.view, at, self.batches,
                                                      self.rng_states, model_loss_fn)
                losses[0] = fp32eval.evaluate_losses(self.engine, self.view, self.x_t, self.batches,
                                                     self.rng_states, model_loss_fn) / world
                precision = "fp32"
        finally:
            if x_next is not None:
                self.view.write_params(x_next)
        losses[1] = loss_probe / world
        return g_plus, precision

    def _draw_s(self, step: int) -> float:
        """s of this step's probe: from a stream seeded by (trial seed, step) alone, so a resumed
        trial draws the same s and the training RNG is never touched."""
        if self.cfg.probe_s == "1":
            return 1.0
        rng = random.Random(f"opt_study.probe_s:{self.seed}:{step}")  # str seeds hash with SHA-512
        if self.cfg.probe_s == "uniform":
            return rng.random()
        return rng.expovariate(1.0)


def noise_scale_simple(sq_small: float | None, sq_big: float, b: int, B: int) -> float | None:
    """B_simple = tr(Σ)/‖G‖² from squared gradient norms at batch sizes b < B, in samples.

    McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", App. A
    (https://arxiv.org/abs/1812.06162): ‖G‖² ≈ (B‖G_B‖² − b‖G_b‖²)/(B − b),
    tr(Σ) ≈ (‖G_b‖² − ‖G_B‖²)/(1/b − 1/B). Per-step values are noisy; analysis keeps EMAs of the
    numerator and denominator separately and divides last.
    """
    if sq_small is None or B <= b or not math.isfinite(sq_small):
        return None
    g2 = (B * sq_big - b * sq_small) / (B - b)
    tr = (sq_small - sq_big) / (1 / b - 1 / B)
    return tr / g2 if g2 != 0 else None


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _root(v: float) -> float:
    return math.sqrt(v) if v >= 0 else math.nan
