"""What the training loop calls on ANY optimizer, never branching on its name.

- `apply_lr_factor(opt, factor)`: every param group's lr = its initial lr x the schedule factor
  (Muon's AdamW group keeps its own base lr; the schedule scales both).
- `train_mode(opt)` / `eval_mode(opt)`: Schedule-Free's iterate switch (Defazio et al. 2024,
  https://arxiv.org/abs/2405.15682): in train mode the weights hold y (where gradients are
  taken), in eval mode x (the averaged iterate to evaluate). A no-op for every other optimizer.
- `is_sync_step(opt, step)`: Lookahead's slow-weight sync steps, so measurement can flag them.
- `needs_hessian(opt)` / `estimate_hessian(opt, loss_fn, seed)`: Sophia's side backward.
- `check_model_shapes(opt, model)`: the run-time guard for rules that need the model's shapes.
- `attach_fragments(opt, fragments)`: hands a whole-tensor optimizer (optim.whole_tensor) where
  this rank's fp32 fragments live, once the engine exists; a no-op for every other optimizer.

`opt` may be the client optimizer or a wrapper exposing it as `.optimizer` (DeepSpeed's ZeRO
optimizers, Lookahead): the functions look through that chain.
"""

from __future__ import annotations

from typing import Callable, Iterator

import pytorch_optimizer as po
import torch

from opt_study import distributed
from opt_study.optim.entry import MODEL_TENSORS

ENTRY_ATTR = "opt_study_entry"  # set by build_optimizer: the OptimizerEntry the object came from


def _chain(opt) -> Iterator:
    seen = set()
    while opt is not None and id(opt) not in seen:
        seen.add(id(opt))
        yield opt
        opt = getattr(opt, "optimizer", None)


def _find(opt, attr: str):
    return next((o for o in _chain(opt) if callable(getattr(o, attr, None))), None)


def held_params(opt) -> list[torch.Tensor]:
    """The tensors the optimizer steps, in param_groups order."""
    return [p for g in opt.param_groups for p in g["params"]]


def apply_lr_factor(opt, factor: float) -> None:
    """Set every group's lr to its initial lr times `factor` (the pure schedule of schedules.py).

    The initial lr is recorded by build_optimizer; a group created later (DeepSpeed rebuilds
    Adagrad over its flat partitions at ZeRO 1-2) records its lr at the first call.
    """
    for g in opt.param_groups:
        g.setdefault("initial_lr", g["lr"])
        g["lr"] = g["initial_lr"] * factor


# ------------------------------------------------------------------------------- Schedule-Free
def train_mode(opt) -> None:
    """Put the weights at the gradient iterate (Schedule-Free's y); call before each train step.

    Idempotent. Under ZeRO 1-3 the switch happens on the fp32 partitions only, which is why the
    Schedule-Free entries declare ZeRO-0 fp32 (see their notes).
    """
    o = _find(opt, "train")
    if o is not None and callable(getattr(o, "eval", None)):
        o.train()


def eval_mode(opt) -> None:
    """Put the weights at the evaluation iterate (Schedule-Free's x); call before evaluating or
    checkpointing, and `train_mode` again before the next step. Idempotent; no-op elsewhere."""
    o = _find(opt, "eval")
    if o is not None and callable(getattr(o, "train", None)):
        o.eval()


# ------------------------------------------------------------------------------------ Lookahead
def is_sync_step(opt, step: int) -> bool:
    """True if 0-based optimizer step `step` ends with Lookahead's sync (fast weights pulled to
    the interpolated slow weights): steps k-1, 2k-1, ... A pure function of `step`, so it can be
    asked before or after the step. Assumes no skipped steps (fp16 overflow skips would shift
    it; fp16 is GPU-only and Lookahead counts only the steps it really took)."""
    la = next((o for o in _chain(opt) if isinstance(o, po.Lookahead)), None)
    return la is not None and (step + 1) % la.k == 0


# --------------------------------------------------------------------------------------- Sophia
def needs_hessian(opt) -> bool:
    """True when the optimizer's next step consumes a fresh Hessian estimate not yet given."""
    o = _find(opt, "hessian_due")
    return o is not None and o.hessian_due() and not o.has_side_hessian()


def estimate_hessian(opt, loss_fn: Callable[[], torch.Tensor], seed: int) -> None:
    """Give the optimizer a Hutchinson estimate of diag(H) at the current weights.

    Hutchinson (1989), as used by Sophia (Liu et al. 2023, https://arxiv.org/abs/2305.14342,
    Sec. 2.3): diag(H) ≈ z ⊙ (H z), z ~ N(0, I). `loss_fn()` must return this rank's mean loss
    over its share of the step's global batch, computed on the module whose parameters the
    optimizer holds (ZeRO-0 fp32: the model's own tensors). It is a SIDE computation: two
    autograd.grad calls, p.grad untouched. `seed` must be equal on every rank for the step (z is
    shared), so the all-reduced mean of the ranks' H z is H z of the global-batch loss, just as
    the averaged gradient is its gradient.
    """
    o = _find(opt, "set_side_hessian")
    if o is None:
        raise TypeError("estimate_hessian: this optimizer takes no Hessian estimate")
    params = held_params(o)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    zs = [torch.randn(p.shape, generator=gen, dtype=torch.float32).to(device=p.device, dtype=p.dtype) for p in params]
    with torch.enable_grad():
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(grads) if g is not None]
        hz_used = torch.autograd.grad(
            [grads[i] for i in used], [params[i] for i in used], grad_outputs=[zs[i] for i in used], allow_unused=True
        )
    hz = [torch.zeros_like(p) for p in params]
    for i, h in zip(used, hz_used):
        if h is not None:
            hz[i] = h.detach()
    flat = torch.cat([h.reshape(-1).float() for h in hz])
    distributed.all_reduce_sum(flat)
    flat /= distributed.world_size()
    out, at = [], 0
    for p, z in zip(params, zs):
        n = p.numel()
        out.append((z * flat[at : at + n].view_as(p).to(p.dtype)).detach())
        at += n
    o.set_side_hessian(out)


# ------------------------------------------------------------------------ whole-tensor rules
def attach_fragments(opt, fragments: Callable[[], list]) -> bool:
    """Give a whole-tensor optimizer (opt_study.optim.whole_tensor.WholeTensorOptimizer) the
    function returning, per parameter, this rank's live fp32 master fragment and its [start,
    stop) in the flattened tensor. Returns whether `opt` needed it."""
    o = _find(opt, "attach")
    if o is None or not getattr(o, "sees_whole_tensors", False):
        return False
    o.attach(fragments)
    return True


# ----------------------------------------------------------------------------- run-time guard
def check_model_shapes(opt, model: torch.nn.Module) -> None:
    """Raise RuntimeError unless every tensor the optimizer holds is one of `model`'s parameters
    with its real shape, for every optimizer declared correct only on the model's own tensors
    (layer-wise and matrix rules, Sophia, Schedule-Free). Call after the engine is built: ZeRO
    1-3 and DeepSpeed's bf16/fp16 wrappers swap the held tensors for flat partitions then, and
    ZeRO-3 also empties the model's own tensors (their real shape is `ds_shape`). No-op for
    element-wise rules, which are correct on any partition.
    """
    tagged = next((o for o in _chain(opt) if hasattr(o, ENTRY_ATTR)), None)
    if tagged is None:
        raise TypeError("check_model_shapes: the optimizer was not built by opt_study.optim.build_optimizer")
    entry = getattr(tagged, ENTRY_ATTR)
    if not (entry.needs_model_shapes or entry.combos <= MODEL_TENSORS):
        return
    if getattr(tagged, "sees_whole_tensors", False):  # optim.whole_tensor: the rule runs on whole tensors
        return
    model_params = {id(p): p for p in model.parameters()}
    fix = (
        f"{entry.name} is correct only at zero_stage 0 with precision fp32"
        if not entry.whole_tensor
        else f"build {entry.name} with optim.build_optimizer(..., zero_stage, precision) for a sharded engine"
    )
    for p in held_params(tagged):
        if id(p) not in model_params:
            raise RuntimeError(
                f"{entry.name}: the optimizer holds a tensor of shape {tuple(p.shape)} that is "
                f"not a model parameter (a flat ZeRO/mixed-precision partition?); {fix}"
            )
        real = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(p.shape) != real or p.numel() == 0:
            raise RuntimeError(
                f"{entry.name}: a parameter of real shape {real} is held as "
                f"{tuple(p.shape)} (ZeRO-3 partitioning?); {fix}"
            )
