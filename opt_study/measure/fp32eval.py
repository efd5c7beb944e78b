"""fp32 loss re-evaluation at fp32 master points, for measured steps under bf16/fp16.

docs/METRICS.md §Precision: "On measured steps, losses that enter differences are evaluated in
fp32 (autocast off)": a bf16 loss is rounded to ~3 significant digits, more than the late-training gaps δ_t − ⟨g,
Δ⟩ being measured, and a bf16 forward reads bf16 *weights*, so it does not even see an update
smaller than half a bf16 ulp of the weight. Under DeepSpeed bf16 the module's weights are bf16
and the fp32 masters live, partitioned, in the (ZeRO) optimizer; ℓ_t and ℓ⁺_t must be fp32
forwards at the fp32 points x_t and p = x_t + sΔ_t, on step t's micro-batches with step t's
dropout masks.

How (``evaluate_losses``): a no-grad, train-mode forward of the engine's module in which every
trainable parameter is, while its module runs, an fp32 tensor holding the point:

- The point is given as this rank's fragments of it (laid out as ``ShardView.bounds()``: the
  kept x_t, or the current masters x_{t+1} / p). A module's parameters are assembled just before
  that module's forward (a forward pre-hook) by one SUM all-reduce of a zero buffer into which
  each rank wrote its own fragment (x + 0 is exact; the same trick as ShardView.write_params),
  and dropped after it (a forward hook). So at most one module's parameters exist in fp32 at a
  time, on every ZeRO stage: the stage's own memory plus the largest module's parameters in fp32.
- The parameter keeps its identity: only ``p.data`` is pointed at the fp32 tensor and then back
  at the very tensor it held (bf16 weights at ZeRO 0-2, the empty or persistent tensor at ZeRO-3),
  so nothing of the engine is written.
- DeepSpeed's own module hooks (ZeRO-3's gather/release, which would overwrite ``p.data`` with
  the bf16 gather) are detached for the forward and re-attached after, in their order; hooks of
  other origin stay (deepspeed_state.without_deepspeed_forward_hooks). All ranks run the same
  modules in the same order, so the all-reduces match.
- Dropout masks: each micro-batch's forward replays the RNG state step t's forward used (the
  masks of a bf16 and an fp32 dropout from one state are equal on CPU: tested); afterwards the
  RNG state and the module buffers (BatchNorm statistics) are put back.

A parameter used outside the forward of a module that owns it (e.g. ``x @ emb.weight.T`` in a
parent's forward) would still be bf16 there, and the forward fails on the dtype (or, at ZeRO-3,
on the empty tensor) instead of returning a wrong value. Frozen parameters are not converted.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from opt_study import distributed
from opt_study.measure import deepspeed_state as ds
from opt_study.measure import probe as probe_mod


class _Fp32Point:
    """Per-module forward hooks that give a module's own parameters the fp32 point's values."""

    def __init__(self, view, frags: list[torch.Tensor]):
        if len(frags) != len(view.named):
            raise ValueError(f"need {len(view.named)} fragments, got {len(frags)}")
        self.device = view.engine.device
        z3 = view.mode == "z3"
        self.where = {}  # id(param) -> (fragment, lo, hi, numel, shape)
        for (name, p), (lo, hi), f in zip(view.named, view.bounds(), frags):
            if f.numel() < hi - lo:
                raise ValueError(f"fragment of {name} has {f.numel()} elements, needs {hi - lo}")
            shape = ds.z3_shape(p) if z3 else p.shape
            numel = ds.z3_numel(p) if z3 else p.numel()
            self.where[id(p)] = (f.reshape(-1)[: hi - lo], lo, hi, numel, shape)
        self.saved: dict[int, tuple[torch.nn.Parameter, torch.Tensor, int]] = {}

    def _own(self, module) -> list:
        return [p for p in module.parameters(recurse=False) if id(p) in self.where]

    def pre(self, module, args) -> None:
        for p in self._own(module):
            if id(p) in self.saved:  # a parameter owned by an enclosing module that is running
                q, data, n = self.saved[id(p)]
                self.saved[id(p)] = (q, data, n + 1)
                continue
            self.saved[id(p)] = (p, p.data, 1)
            p.data = self.full(p)

    def full(self, p) -> torch.Tensor:
        """The whole of parameter ``p`` at the point, fp32 in ``p``'s shape, on every rank.
        Collective: one SUM all-reduce of a zero buffer holding this rank's fragment (x + 0 is
        exact). fp32grad.py assembles every parameter with it for its leaf tensors."""
        frag, lo, hi, numel, shape = self.where[id(p)]
        full = torch.zeros(numel, dtype=torch.float32, device=self.device)
        full[lo:hi].copy_(frag)
        distributed.all_reduce_sum(full)  # every rank's fragment: the whole parameter
        return full.view(shape)

    def post(self, module, args, output) -> None:
        for p in self._own(module):
            q, data, n = self.saved[id(p)]
            if n > 1:
                self.saved[id(p)] = (q, data, n - 1)
            else:
                p.data = data  # the engine's own tensor, untouched
                del self.saved[id(p)]

    def restore_all(self) -> None:
        """After an exception inside the forward: every parameter back to its own tensor."""
        for p, data, _ in self.saved.values():
            p.data = data
        self.saved.clear()


def evaluate_losses(
    engine, view, frags: list[torch.Tensor], batches: list, rng_states: list, model_loss_fn
) -> torch.Tensor:
    """This rank's mean fp32 loss over ``batches`` at the point whose fragments are ``frags``, as
    a float64 0-dim tensor on the engine's device (summed there: no host sync per micro-batch).

    Collective (per-module all-reduces): every rank calls it with its own fragments and
    micro-batches. ``model_loss_fn(model, batch)`` is the workload's loss. Leaves the engine,
    the RNG streams and the module buffers exactly as they were.
    """
    module = engine.module
    point = _Fp32Point(view, frags)
    after = probe_mod.rng_state()
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    total = torch.zeros((), dtype=torch.float64, device=engine.device)
    with ds.without_deepspeed_forward_hooks(module):
        handles = []
        for m in module.modules():
            if point._own(m):
                handles.append(m.register_forward_pre_hook(point.pre))
                handles.append(m.register_forward_hook(point.post))
        try:
            with torch.no_grad(), _autocast_off(engine.device):
                for batch, st in zip(batches, rng_states):
                    probe_mod.set_rng_state(st)  # step t's dropout masks
                    # float64 sum of the fp32 losses: the same value a Python float sum gives
                    total += model_loss_fn(module, batch).float().double().reshape(())
        finally:
            point.restore_all()
            for h in handles:
                h.remove()
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            probe_mod.set_rng_state(after)
    return total / max(len(batches), 1)


@contextmanager
def _autocast_off(device: torch.device):
    """No autocast region may turn the fp32 forward back into bf16 (docs/METRICS.md §Precision:
    autocast off), and fp32 matrix products are full fp32, not TF32 (10-bit mantissa inputs) even
    where the process allowed TF32 for speed."""
    precision, conv_tf32 = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False  # cuDNN convolutions default to TF32
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = conv_tf32
