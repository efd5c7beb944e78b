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
from opt_study.measure import metrics, probe as probe_mod
from opt_study.measure.shards import ShardView
from opt_study.measure.sums import Fragment, local_sums, pack, unpack


NORM_SUMS = ("sq_grad", "sq_update", "sq_param")


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
        self.rng = random.Random(seed)  # probe_s draws; a private stream, never the global RNG
        self.x0 = self.view.clone_params() if cfg.every > 0 else None
        self.prev_delta = self.prev_g = None
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
    def end(self, step: int, loss_local: torch.Tensor, loss_fn, stop_vote: bool = False) -> dict:
        """Called after engine.step(); returns this step's row fields (same on every rank).

        `stop_vote` (rank 0's view of the study's stop request) is summed in the same all-reduce;
        afterwards `self.stop_requested` is the same on every rank.
        """
        world = self.info.world_size
        small = self.small_sq / (world * self.accum) if self.measured and getattr(self.cfg, "noise_scale", False) else math.nan
        losses = torch.tensor([float(loss_local) / world, math.nan, float(stop_vote), small], dtype=torch.float64)
        if self.x_t is None:  # norms off and not measured: the loss alone, still one all-reduce
            distributed.all_reduce_sum(losses)
            self.stop_requested = bool(losses[2] > 0)
            return {"loss": float(losses[0]), "measured": False}
        x_next = self.view.params()
        delta = [b.float() - a for a, b in zip(self.x_t, x_next)]
        g_plus, s = None, math.nan
        if self.measured:
            s = self._draw_s()
            loss_probe, g_plus = probe_mod.run_probe(self.engine, self.view, self.batches,
                                                     self.rng_states, loss_fn, self.info.zero_stage)
            losses[1] = loss_probe / world
        frags = [Fragment(group=self.group_of[i], x=self.x_t[i], g=self.g_t[i], delta=delta[i],
                          g_plus=None if g_plus is None else g_plus[i],
                          x0=None if (self.x0 is None or not self.measured) else self.x0[i],
                          delta_prev=self.prev_delta[i] if (self.measured and self.prev_delta) else None,
                          g_prev=self.prev_g[i] if (self.measured and self.prev_g) else None)
                 for i in range(len(delta))]
        only = None if self.measured else NORM_SUMS  # unmeasured steps: the three norms only
        packed = pack(local_sums(frags, len(self.groups), only=only), losses)
        distributed.all_reduce_sum(packed)  # the ONE collective of this step
        per_group, scalars = unpack(packed, len(self.groups))
        self.stop_requested = scalars["stop_votes"] > 0
        self.prev_delta, self.prev_g = (delta, self.g_t) if self.keep_prev else (None, None)
        totals = {k: float(v.sum()) for k, v in per_group.items()}
        row = {"loss": scalars["loss"], "grad_norm": _root(totals["sq_grad"]),
               "update_norm": _root(totals["sq_update"]), "param_norm": _root(totals["sq_param"]),
               "measured": self.measured}
        if self.measured:
            row.update({k: totals[k] for k in totals})
            row.update({"loss_probe": scalars["loss_probe"], "probe_s": s,
                        "sq_grad_small": _finite(scalars["sq_grad_small"])})
            row["noise_scale_simple"] = noise_scale_simple(row["sq_grad_small"], totals["sq_grad"],
                                                           self.small_batch, self.small_batch * world * self.accum)
            derived = metrics.derive(totals, scalars["loss"], scalars["loss_probe"], s, self.precision)
            row.update({k: v for k, v in derived.items() if k not in ("grad_norm", "update_norm", "param_norm")})
            row["groups"] = {name: {k: float(v[j]) for k, v in per_group.items()}
                              for j, name in enumerate(self.groups)}
        return row

    def _draw_s(self) -> float:
        if self.cfg.probe_s == "uniform":
            return self.rng.random()
        if self.cfg.probe_s == "exponential":
            return self.rng.expovariate(1.0)
        return 1.0


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
