"""The step hook: keeps the shard state a step's measurement needs, runs the probe, and turns this
rank's shard into global numbers with ONE all-reduce per step.

Which steps are measured is ``cadence.Cadence.measured`` (measure.every, and every evaluation
step; the trial loop asks the same object which rows to log). The decision depends only on the
step number, so every rank joins every collective. The shards of Δ and g are kept from the step
before every measured step (docs/METRICS.md §Cadence: the `*_prev` sums are then null only on
an attempt's first step).

Every step (unless measure.norms is off) records loss, ‖g‖, ‖Δ‖, ‖x‖ from the local shards; a
measured step adds the same-batch probe (opt_study.measure.probe) and every raw sum of
docs/METRICS.md §Raw sums.

Host syncs (``# host sync:`` comments): one per step, reading the reduced vector back for the
row (sums.unpack, or ``tolist`` when only the loss is reduced). The losses, the stop vote and the
noise scale's micro-batch norms stay on the device until then.
"""

from __future__ import annotations

import math

import torch

from opt_study import distributed
from opt_study.measure import curvature_batch as fixed_batch
from opt_study.measure import fp32eval, fp32grad, fused_sums, grad_history, lossscale, next_batch, sharpness
from opt_study.measure import probe as probe_mod
from opt_study.measure.cadence import Cadence
from opt_study.measure.carry import Carry
from opt_study.measure.names import (
    CURVATURE_BATCH,
    GRAD_HISTORY_RAW,
    GRAD_PRECISION,
    LOSS_NAMES,
    LOSS_PRECISION,
    LOSS_SCALE_NAMES,
    MEASURED,
    NOISE_RAW,
    NORM_SUMS,
    PREV_OF,
    SUM_NAMES,
)
from opt_study.measure.shards import FlatShard, ShardView, flatten
from opt_study.measure.shards import group_names as group_names  # re-exported (benchmarks)
from opt_study.measure.step_row import measured_fields, norm_row, reduce_step
from opt_study.measure.sums import flat_sums, group_runs, tensor_sums

_LOSS = {name: i for i, name in enumerate(LOSS_NAMES)}  # slot of each scalar in the packed losses

# The hook protocol of one optimizer step: each call, the calls it may follow. The first begin()
# follows construction (None).
_PROTOCOL: dict[str, tuple[str | None, ...]] = {
    "begin": (None, "end"),
    "before_micro": ("begin", "before_micro"),
    "at_boundary": ("before_micro",),
    "end": ("at_boundary",),
}


class StepMeasurer:
    """Measures one trial's steps on one rank (every rank constructs one; its calls are collective).

    Protocol of one optimizer step, enforced in ``_enter`` (a call out of this order raises
    RuntimeError naming the call that came before)::

        begin(step)                once, before the first micro-batch's forward
        before_micro(batch)        once per micro-batch, before its forward
        at_boundary()              once, after the last micro-batch's backward, before step()
        end(step, loss_local, ...) once, after engine.step(): returns the row (same on every rank)

    then ``begin`` of the next step. Subclasses (the test seams in tests/dist and benchmarks)
    override these four and call ``super()``, so each check runs once per call.

    ``cadence`` decides which steps are measured (cadence.Cadence, shared with the trial loop);
    ``cfg`` is the study's MeasureConfig (probe_s, noise_scale).
    """

    # Norms-only steps read the engine's fragments in place (_norms_only); False makes every
    # step copy x_t, g_t and x_{t+1} (the reference path, bit-for-bit the same rows: tested)
    fragment_norms = True

    def __init__(
        self,
        engine,
        info,
        cfg,
        precision: str,
        cadence: Cadence,
        seed: int = 0,
        norms: bool = True,
        small_batch: int = 1,
        curvature_batch: tuple[list, list] | None = None,
    ):
        self.engine, self.info, self.cfg, self.precision = engine, info, cfg, precision
        self.cadence, self.norms = cadence, norms
        self.total = cadence.steps
        self.small_batch = small_batch  # samples in one rank's micro-batch (the noise scale's b)
        self.noise_scale = bool(getattr(cfg, "noise_scale", False))
        self.view = ShardView(engine, info.zero_stage, precision, info.rank, info.world_size)
        self.groups, self.group_of = group_names(self.view.names)
        # measure.curvature_batch: (this rank's micro-batches, their RNG states) of the fixed
        # batch (curvature_batch.draw), or None: the curvature is measured on the step's batch
        self.curvature_batch = curvature_batch
        self.seed = seed  # probe_s draws: a private stream per (seed, step), never the global RNG
        # bf16/fp16: measured steps' losses are fp32 forwards (fp32eval; `loss_precision` "fp32")
        # and, with measure.fp32_grads, g_t and g⁺_t fp32 backwards too (fp32grad)
        self.refit_fp32 = precision in ("bf16", "fp16")
        self.fp32_grads = fp32grad.enabled(getattr(cfg, "fp32_grads", "auto"), precision, info.zero_stage)
        self.x0 = self.view.clone_params() if cadence.measures else None
        # A norms-only step (``_norms_only``) leaves x_{t+1} in x_t's buffer: the next step's x_t
        self.x_next: tuple[int, FlatShard] | None = None
        self._runs_cache: list[tuple[int, int, int]] | None = None
        self.prev_delta = self.prev_g = self.prev_sq = None
        # measure.next_batch: x_{t−1} is kept too (the buffer x_t already was: no copy), for
        # the forward at x_{t−1} on B_t (opt_study.measure.next_batch)
        self.next_batch = bool(getattr(cfg, "next_batch", False))
        self.prev_x = None
        # measure.grad_history: the running sum of every step's gradient (grad_history.py)
        self.history = grad_history.GradHistory() if getattr(cfg, "grad_history", False) else None
        self.collecting = False
        self.small_sq = self._zero()
        self.accum = engine.gradient_accumulation_steps()
        if self.noise_scale:
            for _, p in self.view.named:
                p.register_hook(self._micro_grad_hook)
        self._last_call: str | None = None
        self._capture: lossscale.Capture | None = None  # active over a measured step's forwards
        self.train_scale = None  # M of ℓ_t from the training forwards (lossscale)
        self._reset(-1)

    def _zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float64, device=self.engine.device)

    def _enter(self, call: str, step: int | None = None) -> None:
        """The protocol check of every hook call (see the class docstring)."""
        if self._last_call not in _PROTOCOL[call]:
            after = "construction" if self._last_call is None else f"{self._last_call}()"
            raise RuntimeError(
                f"StepMeasurer.{call}() called after {after}; each step calls "
                "begin, before_micro (per micro-batch), at_boundary, end"
            )
        if call == "end" and step != self.step:
            raise RuntimeError(f"StepMeasurer.end({step}) but begin({self.step})")
        self._last_call = call

    def _micro_grad_hook(self, grad: torch.Tensor) -> None:
        """Tensor hooks run in autograd before DeepSpeed's reduction hooks: this is one rank's
        micro-batch gradient of loss/A (DeepSpeed scales by the accumulation steps), so
        ‖g_{r,m}‖² = A²·‖grad‖² (McCandlish et al. 2018, https://arxiv.org/abs/1812.06162,
        App. A: the small-batch norm ‖G_b‖²). Summed in float64 on the device, no host sync."""
        if self.collecting:
            g = grad.detach().reshape(-1).float()
            self.small_sq += torch.dot(g, g).double() * self.accum**2

    # ---------------------------------------------------------------------------- the protocol
    def _reset(self, step: int) -> None:
        self.step, self.x_t, self.g_t, self.batches, self.rng_states = step, None, None, [], []
        self.g_sq: torch.Tensor | None = None  # a norms-only step's partial ‖g‖², read without a copy
        self.g_train, self.grad_precision = None, self.precision  # fp32grad.probe may replace g_t
        self.measured = self.cadence.measured(step) if step >= 0 else False
        self.keep_prev = self.cadence.measured(step + 1) if step >= 0 else False

    def begin(self, step: int) -> None:
        """Before the step's first forward: x_t is kept when anything of this step needs it."""
        self._enter("begin")
        self._stop_capture()  # a step that raised between before_micro and at_boundary
        self._reset(step)
        self.small_sq = self._zero()
        self.collecting = self.measured and self.noise_scale
        if self.norms or self.measured or self.keep_prev or self.history is not None:
            kept, self.x_next = self.x_next, None
            self.x_t = kept[1] if kept is not None and kept[0] == step else self.view.clone_params()

    def weights_moved(self) -> None:
        """The loop moved the weights between steps (an evaluation at Schedule-Free's x, and back
        to y, need not restore y bit for bit): the x_{t+1} a norms-only step kept is then not
        the next step's x_t, which ``begin`` copies afresh instead."""
        self.x_next = None

    def before_micro(self, batch) -> None:
        """Keep the micro-batch and the RNG state its forward uses (the probe replays both)."""
        self._enter("before_micro")
        if self.measured:
            self.batches.append(batch)
            self.rng_states.append(probe_mod.rng_state())
            if self._capture is None:  # the loss's rounding magnitude, read in the same forwards
                self._capture = lossscale.Capture(self.engine.device)
                self._capture.__enter__()

    def at_boundary(self) -> None:
        """After the accumulation-boundary backward, before step(): the reduced gradient exists."""
        self._enter("at_boundary")
        self.collecting = False  # the probe's backward must not count as a micro-batch
        self.train_scale = self._stop_capture()
        if self.x_t is not None and self._norms_only():
            self.g_sq = fused_sums.fragment_sums(self.view.grads(), self._runs(), len(self.groups))
        if self.x_t is not None and self.g_sq is None:
            self.g_t = self.g_train = self.view.clone_grads()

    def end(
        self, step: int, loss_local, loss_fn, stop_vote: bool = False, model_loss_fn=None, lr=None, carry=None
    ) -> dict:
        """Called after engine.step(); returns this step's row fields (same on every rank).

        ``loss_local`` is this rank's mean training loss over its micro-batches (a tensor, best
        on the engine's device: it is not read on the host before the all-reduce).
        `loss_fn(batch)` is the loss through the engine (the probe's forward + backward);
        `model_loss_fn(model, batch)` the workload's loss of any module (the fp32 re-evaluation
        under bf16/fp16 needs it; without it the losses stay in the training precision).
        `lr` is the step's learning rate η_t (base lr × schedule factor): the critical sharpness
        of a curvature step normalises the update direction by it (d_t = −Δ_t/η_t).
        `stop_vote` (rank 0's view of the study's stop request) is summed in the same all-reduce;
        afterwards `self.stop_requested` is the same on every rank. `loss_precision` in the row
        says in which precision `loss` (and `loss_probe`) were evaluated.
        `carry` ({column: value}) holds values that are global already (DeepSpeed's gradient
        norm): they come back in the row as Python floats (None stays None), a device tensor
        with the step's one read-back instead of a host sync of its own (``Carry``).
        """
        self._enter("end", step)
        carried = Carry(carry)
        losses = self._loss_terms(loss_local, stop_vote)
        if self.x_t is None:  # norms off and not measured: the loss alone, still one all-reduce
            return {**self._loss_only_row(losses, carried), **carried.row}
        if self.g_sq is not None:  # a norms-only step: the fragments read in place, no copies
            return self._norms_only_row(losses, carried)
        delta = self._update()
        s, g_plus, loss_precision, curv = math.nan, None, self.precision, {}
        if self.cadence.curvature(step):  # before the probe: its g⁺ is the last gradient read
            curv = self._curvature(step, delta, lr, loss_fn)
        if self.measured:
            s = probe_mod.draw_s(self.cfg.probe_s, self.seed, step)
            g_plus, loss_precision = self._probe(s, delta, losses, loss_fn, model_loss_fn)
            self._next_batch(losses, loss_fn, model_loss_fn)
        self._grad_history(step, losses)
        kept = self._kept(delta, g_plus)
        local = self._local_sums(kept, None if self.measured else NORM_SUMS)
        per_tensor = self._tensor_sums(kept) if self.measured else None
        per_group, scalars, tensor_norms = self._reduce(local, losses, per_tensor, carried)
        self._keep_prev(delta, local)
        totals = {k: float(v.sum()) for k, v in per_group.items()}
        row = {**norm_row(totals, scalars, self.measured, loss_precision, self.grad_precision), **carried.row}
        if self.measured:
            noise_batch = (self.small_batch, self.small_batch * self.info.world_size * self.accum)
            precisions = (self.grad_precision, loss_precision)
            totals.update(tensor_norms)
            row.update(measured_fields(per_group, totals, scalars, s, self.groups, precisions, noise_batch))
            row.update(curv)
        return row

    # ------------------------------------------------------------------- the pieces of end()
    def _loss_terms(self, loss_local, stop_vote: bool) -> torch.Tensor:
        """This rank's share of the LOSS_NAMES scalars, float64 on the engine's device (NaN where
        absent; ``_probe`` fills the probe's): no host sync before the all-reduce."""
        world, device = self.info.world_size, self.engine.device
        losses = torch.full((len(LOSS_NAMES),), math.nan, dtype=torch.float64, device=device)
        losses[_LOSS["loss"]] = torch.as_tensor(loss_local, dtype=torch.float64, device=device) / world
        losses[_LOSS["stop_votes"]] = float(stop_vote)
        if self.measured and self.noise_scale:
            # the mean over all N·A micro-batches of ‖g_{r,m}‖² (McCandlish et al. 2018, App. A)
            losses[_LOSS[NOISE_RAW]] = self.small_sq / (world * self.accum)
        return losses

    def _loss_only_row(self, losses: torch.Tensor, carried: Carry) -> dict:
        """An unmeasured step with norms off: the losses' all-reduce alone."""
        distributed.all_reduce_sum(losses)
        vals = carried.append(losses).tolist()  # host sync: the row and the stop decision are Python values
        carried.read(vals[len(LOSS_NAMES) :])
        self.stop_requested = vals[_LOSS["stop_votes"]] > 0
        row = {"loss": vals[_LOSS["loss"]], MEASURED: False}
        return {**row, LOSS_PRECISION: self.precision, GRAD_PRECISION: self.precision}

    def _norms_only(self) -> bool:
        """Whether this step needs only ‖g‖, ‖Δ‖ and ‖x‖: nothing is measured, kept for step t + 1,
        or fed to the curvature or the gradient history. Such a step reads g_t and x_{t+1} where
        the engine holds them (fused_sums.fragment_sums, CPU fp32: the common case of most steps)
        and rolls x_t's buffer forward to x_{t+1}, instead of three copies and a subtraction."""
        quiet = not (self.measured or self.keep_prev or self.cadence.curvature(self.step))
        return quiet and self.norms and self.history is None and self.fragment_norms

    def _runs(self) -> list[tuple[int, int, int]]:
        """sums.group_runs of this rank's layout (the same every step)."""
        if self._runs_cache is None:
            self._runs_cache = group_runs(self.x_t.sizes, self.group_of)
        return self._runs_cache

    def _norms_only_row(self, losses: torch.Tensor, carried: Carry) -> dict:
        """end() of a norms-only step: ‖x_{t+1} − x_t‖² and ‖x_t‖² in the pass that writes x_{t+1}
        over x_t's buffer (kept for step t + 1's begin), then the step's one all-reduce. The
        sums are bit-for-bit those of the copying path (tests/unit/test_fragment_norms.py)."""
        local = fused_sums.fragment_sums(self.view.params(), self._runs(), len(self.groups), kept=self.x_t.flat)
        if local is None:  # cannot happen after g's pass took the kernel; never a wrong row
            raise RuntimeError("fragment sums: the kernel took g_t but not x_{t+1}")
        i = SUM_NAMES.index("sq_grad")
        local[i] = self.g_sq[i]
        per_group, scalars, _ = self._reduce(local, losses, None, carried)
        self._keep_prev(None, None)
        self.x_next = (self.step + 1, self.x_t)
        totals = {k: float(v.sum()) for k, v in per_group.items()}
        return {**norm_row(totals, scalars, False, self.precision, self.grad_precision), **carried.row}

    def _update(self) -> FlatShard:
        """Δ_t = x_{t+1} − x_t on this rank's shard (fp32, in one new flat buffer)."""
        delta = flatten(self.view.params())  # x_{t+1}, then Δ_t in place
        delta.flat.sub_(self.x_t.flat)
        return delta

    def _kept(self, delta: FlatShard, g_plus: FlatShard | None) -> dict:
        """The vectors this step's sums read (sums.VECTOR_NAMES); unmeasured steps: x, g, Δ."""
        m = self.measured
        return {
            "x": self.x_t,
            "g": self.g_t,
            "delta": delta,
            "g_plus": g_plus,
            "x0": self.x0 if m else None,
            "delta_prev": self.prev_delta if m else None,
            "g_prev": self.prev_g if m else None,
        }

    def _reduce(self, local: torch.Tensor, losses: torch.Tensor, per_tensor=None, carried=None):
        """The step's one all-reduce (step_row.reduce_step); sets ``stop_requested`` from the
        summed votes, the same on every rank."""
        out = reduce_step(local, losses, len(self.groups), per_tensor, carried)
        self.stop_requested = out[1]["stop_votes"] > 0
        return out

    def _tensor_sums(self, kept: dict) -> torch.Tensor:
        """This rank's partial TENSOR_SUMS per parameter tensor (sums.tensor_sums)."""
        vectors = {k: kept[k].flat for k in ("x", "g", "delta", "g_plus") if kept[k] is not None}
        return tensor_sums(vectors, self.x_t.sizes)

    def _keep_prev(self, delta: FlatShard, local: torch.Tensor) -> None:
        """Keep Δ_t, g_t and this rank's partial ‖Δ_t‖², ‖g_t‖² when step t + 1 is measured (and
        x_t, with measure.next_batch)."""
        self.prev_delta, self.prev_g = (delta, self.g_t) if self.keep_prev else (None, None)
        self.prev_x = self.x_t if self.keep_prev and self.next_batch else None
        self.prev_sq = local[[SUM_NAMES.index(v) for v in PREV_OF.values()]] if self.keep_prev else None

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
        out = flat_sums(
            {k: v.flat for k, v in kept.items() if v is not None},
            group_runs(sizes, self.group_of),
            len(self.groups),
            only=only,
        )
        if reuse:
            out[[SUM_NAMES.index(n) for n in PREV_OF]] = self.prev_sq
        return out

    def _probe(self, s: float, delta: FlatShard, losses: torch.Tensor, loss_fn, model_loss_fn):
        """The probe at p = x_t + sΔ_t on step t's batch; fills losses[1] (and, re-evaluated in
        fp32, losses[0]) with this rank's share. Returns (g⁺ fragments, the losses' precision).
        measure.fp32_grads on: all from fp32grad.probe (fp32 ℓ, g, ℓ⁺, g⁺; no engine probe).
        Else, with s ≠ 1, ShardView.write_params sets p in the weights and the fp32 masters and
        writes x_{t+1} back after, bit-for-bit (the low-precision weights are the same
        round-to-nearest copy of the same masters step() made)."""
        if self.fp32_grads and model_loss_fn is not None:  # ℓ, g, ℓ⁺, g⁺ all fp32, no engine probe
            return fp32grad.probe(self, s, delta, losses, _LOSS, model_loss_fn, loss_fn), "fp32"
        world = self.info.world_size
        x_next = point = None
        if s != 1.0:
            x_next = flatten(self.view.params())  # x_{t+1} exactly, to restore
            point = FlatShard(torch.add(self.x_t.flat, delta.flat, alpha=s), self.x_t.sizes)
            self.view.write_params(point)
        try:
            (loss_probe, g_plus), scale_p = self._captured(
                probe_mod.run_probe,
                self.engine,
                self.view,
                self.batches,
                self.rng_states,
                loss_fn,
                self.info.zero_stage,
            )
            scale = self.train_scale
            precision = self.precision
            if self.refit_fp32 and model_loss_fn is not None:
                at = point if point is not None else self.view.params()  # p = x_{t+1}: the masters
                ev = (self.engine, self.view)
                loss_probe, scale_p = self._captured(
                    fp32eval.evaluate_losses, *ev, at, self.batches, self.rng_states, model_loss_fn
                )
                loss_t, scale = self._captured(
                    fp32eval.evaluate_losses, *ev, self.x_t, self.batches, self.rng_states, model_loss_fn
                )
                losses[_LOSS["loss"]] = loss_t / world
                precision = "fp32"
            for name, m in zip(LOSS_SCALE_NAMES, (scale, scale_p)):
                if m is not None:
                    losses[_LOSS[name]] = m / world
        finally:
            if x_next is not None:
                self.view.write_params(x_next)
        losses[_LOSS["loss_probe"]] = loss_probe / world
        return g_plus, precision

    def _next_batch(self, losses: torch.Tensor, loss_fn, model_loss_fn) -> None:
        """measure.next_batch: f(x_{t−1}; B_t), its M and ⟨g_t, Δ_{t−1}⟩ (next_batch.measure)."""
        next_batch.measure(self, losses, _LOSS, loss_fn, model_loss_fn)

    def _grad_history(self, step: int, losses: torch.Tensor) -> None:
        """measure.grad_history: on a measured step this rank's partial ⟨g_t, S_t⟩ and ‖S_t‖²
        into the packed losses; then S ← S + g_t on every step (grad_history.py)."""
        if self.history is None:
            return
        if self.measured:
            losses[[_LOSS[k] for k in GRAD_HISTORY_RAW]] = self.history.partials(self.g_t, step)
        self.history.add(self.g_train, step)  # S sums the gradients training used

    def _curvature(self, step: int, delta: FlatShard, lr, loss_fn) -> dict:
        """The online curvature columns (opt_study.measure.sharpness) at x_t, on step t's batch
        or on the fixed curvature batch (measure.curvature_batch), and which batch it was."""
        batches, states = self.curvature_batch or (self.batches, self.rng_states)
        out = sharpness.measure(
            self.engine,
            self.view,
            self.info.zero_stage,
            (batches, states, loss_fn),
            self.x_t,
            delta,
            lr,
            self.cfg,
            (self.seed, step, self.info.rank),
        )
        out[CURVATURE_BATCH] = fixed_batch.label(getattr(self.cfg, "curvature_batch", None))
        return out

    def _stop_capture(self) -> torch.Tensor | None:
        """Ends the training forwards' capture; M of ℓ_t (this rank's mean over micro-batches)."""
        cap, self._capture = self._capture, None
        if cap is None:
            return None
        cap.__exit__(None, None, None)
        return cap.value(len(self.batches))

    def _captured(self, fn, *args):
        """fn(*args) with the loss's rounding magnitude captured: (its result, M)."""
        with lossscale.Capture(self.engine.device) as cap:
            out = fn(*args)
        return out, cap.value(len(self.batches))
