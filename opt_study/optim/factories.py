"""Factories that turn FLAT scalar hyperparameters into library optimizers, and the thin glue
subclasses the distributed loop needs. No update rule is written here: every rule is the
library's (torch.optim, pytorch-optimizer 4.1.0, schedulefree 1.4.1, heavyball 3.2.1); the glue only
changes WHEN state is created, WHERE a Hessian estimate comes from, or WHICH random draws a step uses.

A factory is `factory(params, **hparams)` where `params` is an iterable of tensors (the model's
parameters, or flat partitions at ZeRO 1-3) and `hparams` are exactly the entry's default names.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytorch_optimizer as po
import schedulefree
import torch

Factory = Callable[..., torch.optim.Optimizer]


# ------------------------------------------------------------------------------ generic shapes
def sgd(nesterov: bool, with_momentum: bool) -> Factory:
    def factory(params, lr, weight_decay, momentum=0.0, dampening=0.0):
        if not with_momentum:
            momentum = 0.0
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov
        )

    return factory


def with_betas(cls: type, **fixed) -> Factory:
    """Adam-family factory: flat beta1/beta2 -> the library's `betas` tuple; `fixed` arguments are
    part of the rule's definition (AMSGrad's amsgrad=True), not searchable knobs."""

    def factory(params, beta1, beta2, **rest):
        return cls(params, betas=(beta1, beta2), **fixed, **rest)

    return factory


def plain(cls: type, **fixed) -> Factory:
    def factory(params, **hparams):
        return cls(params, **fixed, **hparams)

    return factory


# ------------------------------------------------------------------------------------ Lookahead
class Lookahead(po.Lookahead):
    """pytorch-optimizer's Lookahead (Zhang et al. 2019, https://arxiv.org/abs/1907.08610), with
    its slow weights taken from the tensors the optimizer holds at their FIRST step.

    Why: upstream copies the slow weights at construction, keyed by the construction-time
    tensors. DeepSpeed ZeRO 1-3 and the bf16 wrapper then swap `param_groups[i]["params"]` for
    flat fp32 partitions, so at the first sync upstream has no slow weights for the tensors it
    steps (measured with DeepSpeed 0.19.8, ZeRO-3: "Tensor lists must have the same number of
    tensors"); ZeRO 1-2 also ASSIGN `param_groups` (one group per step call), which upstream's
    read-only property refuses. Here each step first copies the held tensors that have no slow
    weights yet (at their first step they still equal x0: the rule is unchanged), drops the
    construction-time copies once they are no longer held, and `param_groups` has a setter.
    """

    def __init__(self, optimizer, k: int = 5, alpha: float = 0.5, **kwargs):
        super().__init__(optimizer, k=k, alpha=alpha, **kwargs)
        self._construction = [p for g in self.param_groups for p in g["params"]]

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups):
        self.optimizer.param_groups = groups

    def step(self, closure=None):
        held = [p for g in self.param_groups for p in g["params"]]
        if self._construction and not any(p is q for p in held for q in self._construction):
            for p in self._construction:
                self.state.pop(p, None)  # a full model copy per rank would undo ZeRO's memory saving
            self._construction = []
        for g in self.param_groups:
            self.init_group(g)
        return super().step(closure)


def lookahead(inner: Factory) -> Factory:
    """Lookahead over any registered inner factory: `k`, `alpha` are Lookahead's, the rest the
    inner optimizer's."""

    def factory(params, k, alpha, **inner_hparams):
        return Lookahead(inner(params, **inner_hparams), k=k, alpha=alpha)

    return factory


# ----------------------------------------------------------------------------------- Muon family
def _muon_groups(params, lr, adamw_lr, beta1, beta2, adamw_wd) -> list[dict]:
    """Matrices (ndim >= 2) in a `use_muon` group at `lr`, other tensors (biases, gains) in the
    library's built-in AdamW group at `adamw_lr` with betas (beta1, beta2).

    The factory sees tensors, not names, so embeddings and output heads (2-D) are Muon'd too;
    Jordan et al.'s recipe gives those to AdamW. Say so when comparing against the reference.
    """
    params = list(params)
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "use_muon": True, "lr": lr},
        {
            "params": [p for p in params if p.ndim < 2],
            "use_muon": False,
            "lr": adamw_lr,
            "betas": (beta1, beta2),
            "weight_decay": adamw_wd,
        },
    ]
    return [g for g in groups if g["params"]]


def muon(params, lr, momentum, weight_decay, nesterov, ns_steps, adamw_lr, adamw_wd, beta1, beta2):
    """pytorch-optimizer Muon over `_muon_groups`."""
    return po.Muon(
        _muon_groups(params, lr, adamw_lr, beta1, beta2, adamw_wd),
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov,
        ns_steps=ns_steps,
        adamw_lr=adamw_lr,
    )


def normuon(params, lr, momentum, muon_beta2, weight_decay, nesterov, ns_steps, adamw_lr, adamw_wd, beta1, beta2):
    """pytorch-optimizer NorMuon over `_muon_groups`; `muon_beta2` is NorMuon's own second-moment
    decay (per-neuron, on the orthogonalised update), beta1/beta2 the AdamW group's."""
    return po.NorMuon(
        _muon_groups(params, lr, adamw_lr, beta1, beta2, adamw_wd),
        momentum=momentum,
        beta2=muon_beta2,
        weight_decay=weight_decay,
        nesterov=nesterov,
        ns_steps=ns_steps,
        adamw_lr=adamw_lr,
    )


# ------------------------------------------------------------------------------ AdEMAMix, MARS
def ademamix(params, beta1, beta2, beta3, t_alpha_beta3, **rest):
    """pytorch-optimizer AdEMAMix: three betas, and the alpha/beta3 warm-up length
    (`t_alpha_beta3` = 0 means none: the library's None, a flat scalar here)."""
    return po.AdEMAMix(params, betas=(beta1, beta2, beta3), t_alpha_beta3=t_alpha_beta3 or None, **rest)


def mars(params, beta1, beta2, beta1_1d, beta2_1d, **rest):
    """pytorch-optimizer MARS (the AdamW instance, mars_type="adamw"): matrices get the
    variance-reduced update with betas (beta1, beta2); 1-D tensors AdamW with (beta1_1d, beta2_1d)."""
    return po.MARS(params, betas=(beta1, beta2), betas_1d=(beta1_1d, beta2_1d), mars_type="adamw", **rest)


# -------------------------------------------------------------------------------------- PSGD-Kron
DRAW_SEED = 20151214  # any constant: every rank must use the same one


class SameDrawsKron(po.Kron):
    """pytorch-optimizer Kron (PSGD with Kronecker-factored preconditioners; Li 2015,
    https://arxiv.org/abs/1512.04202) whose random draws are the same on every rank.

    Why: Kron updates its preconditioners from random probe vectors (torch's global generator)
    and decides its balancing with numpy's global generator. The training loop seeds torch's
    generator per RANK (opt_study.trial.loop) and nobody seeds numpy's, so at ZeRO-0, where every
    rank steps its own full copy, the replicas would silently drift apart. Here each step draws
    from generators seeded by the step count alone; both global generators are restored after.
    The update rule is the library's.
    """

    def step(self, closure=None):
        seed = DRAW_SEED + int(self.param_groups[0].get("step", 0))
        devices = sorted({p.device.index for g in self.param_groups for p in g["params"] if p.is_cuda})
        np_state = np.random.get_state()
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            np.random.seed(seed)
            try:
                return super().step(closure)
            finally:
                np.random.set_state(np_state)


def kron(params, **hparams):
    return SameDrawsKron(params, **hparams)


# -------------------------------------------------------------------------------- Cautious AdamW
def cautious_adamw(params, beta1, beta2, **rest):
    """heavyball AdamW with caution=True (Liang et al. 2024, https://arxiv.org/abs/2411.16085),
    run eagerly.

    Why eager: heavyball compiles its update functions with torch.compile by default, which on
    a CPU costs minutes per run (measured: 153 s for 50 steps of an 8x8 problem, 0.7 s eager).
    `heavyball.utils.compile_mode = None` is the library's own switch for that; setting it
    affects every heavyball optimizer in the process, and this is the only one here. Imported
    here, not at the top: importing heavyball costs about 0.7 s (it imports torch._dynamo and
    opt_einsum), which every CLI call and trial would pay otherwise.
    """
    import heavyball

    heavyball.utils.compile_mode = None
    return heavyball.AdamW(params, betas=(beta1, beta2), caution=True, compile_step=False, **rest)


# --------------------------------------------------------------------------------------- Sophia
class SideHessianSophiaH(po.SophiaH):
    """pytorch-optimizer SophiaH whose Hessian-diagonal estimate comes from the loop's SIDE
    backward (`opt_study.optim.estimate_hessian`) instead of a `create_graph=True` main backward.

    Why: DeepSpeed's engine.backward keeps no graph on the gradients, and on several ranks each
    rank's Hutchinson estimate must be averaged like the gradient is. `hessian_due()` is True
    before the steps whose update consumes a fresh estimate (every `update_period` steps,
    starting with the first); stepping then without one raises instead of silently reusing a
    stale estimate.
    """

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self._side_hessian: list[torch.Tensor] | None = None

    def hessian_due(self) -> bool:
        return self.param_groups[0].get("step", 0) % self.update_period == 0

    def set_side_hessian(self, hessian: list[torch.Tensor]) -> None:
        """One tensor per held parameter, in param_groups order, each shaped like it."""
        self._side_hessian = list(hessian)

    def has_side_hessian(self) -> bool:
        return self._side_hessian is not None

    @torch.no_grad()
    def step(self, closure=None, hessian=None):
        if hessian is None and self.hessian_due():
            if self._side_hessian is None:
                raise RuntimeError(
                    "sophia: this step needs a Hessian estimate; call "
                    "opt_study.optim.estimate_hessian(optimizer, loss_fn, seed) after the "
                    "boundary backward and before engine.step() whenever optim.needs_hessian(optimizer)"
                )
            hessian = self._side_hessian
        self._side_hessian = None
        return super().step(closure, hessian=hessian)


def sophia(params, lr, beta1, beta2, weight_decay, p, update_period, eps):
    return SideHessianSophiaH(
        params,
        lr=lr,
        betas=(beta1, beta2),
        weight_decay=weight_decay,
        p=p,
        update_period=update_period,
        eps=eps,
        hessian_distribution="gaussian",
    )


# -------------------------------------------------------------------------------- Schedule-Free
def schedulefree_adamw(params, lr, beta1, beta2, eps, weight_decay, warmup_steps, r, weight_lr_power):
    return schedulefree.AdamWScheduleFree(
        params,
        lr=lr,
        betas=(beta1, beta2),
        eps=eps,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        r=r,
        weight_lr_power=weight_lr_power,
    )


def schedulefree_sgd(params, lr, momentum, weight_decay, warmup_steps, r, weight_lr_power):
    return schedulefree.SGDScheduleFree(
        params,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        r=r,
        weight_lr_power=weight_lr_power,
    )
