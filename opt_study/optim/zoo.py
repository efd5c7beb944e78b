"""The optimizer table: the Crowded Valley set and today's contenders.

Crowded Valley: Schmidt, Schneider & Hennig 2021, "Descending through a Crowded Valley",
https://arxiv.org/abs/2007.01547 (15 optimizers; AdamW added here). Implementations are torch's
where torch has the rule, pytorch-optimizer's (pinned 4.1.0), schedulefree's (pinned 1.4.1) or
heavyball's (pinned 3.2.1) otherwise; none is written here.

Default search spaces (`space`) are ours, in the YAML domain form: the learning rate
log-uniform over four decades around the default (the lr is the one knob every protocol tunes),
plus the one or two constants each rule is most sensitive to. A study that writes its own
`params` replaces them.
"""

from __future__ import annotations

from importlib.metadata import version

import pytorch_optimizer as po
import torch

from opt_study.optim import factories as F
from opt_study.optim.entry import ELEMENTWISE, MODEL_TENSORS, WHOLE_TENSOR, OptimizerEntry

TORCH = f"torch {torch.__version__.split('+')[0]}"
PO = f"pytorch-optimizer {version('pytorch-optimizer')}"
SF = f"schedulefree {version('schedulefree')}"
HB = f"heavyball {version('heavyball')}"

SUTSKEVER_2013 = "https://proceedings.mlr.press/v28/sutskever13.html"
ADABOUND = "https://arxiv.org/abs/1902.09843"  # Luo et al. 2019: AdaBound and AMSBound
LOOKAHEAD = "https://arxiv.org/abs/1907.08610"  # Zhang, Lucas, Hinton & Ba 2019
SCHEDULE_FREE = "https://arxiv.org/abs/2405.15682"  # Defazio et al. 2024

_ADAM = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}


def _lu(lo: float, hi: float) -> dict:
    return {"loguniform": [lo, hi]}


def _u(lo: float, hi: float) -> dict:
    return {"uniform": [lo, hi]}


LR_SGD = _lu(1e-4, 1.0)
LR_ADAM = _lu(1e-5, 1e-1)
BETA1 = _u(0.8, 0.99)

SCHEDULE_FREE_NOTES = (
    "Gradients are taken at y (the interpolation of the SGD/Adam iterate z and the average x); "
    "the model must hold y while training (optim.train_mode before each step) and x when "
    "evaluated or saved (optim.eval_mode). Declared ZeRO-0 fp32 only: at ZeRO 1-3 and under the "
    "bf16/fp16 wrappers the switch moves the optimizer's fp32 partitions, and the engine does "
    "not yet copy them into the model's weights before evaluation."
)
SCHEDULE_FREE_WHY = (
    "its train/eval switch would move only the optimizer's fp32 partitions, so evaluation would see y instead of x"
)


def _ew(name, factory, defaults, paper, space, source, notes="") -> OptimizerEntry:
    """An element-wise rule: correct at every ZeRO stage and precision."""
    return OptimizerEntry(name, factory, dict(defaults), paper, dict(space), ELEMENTWISE, source, notes=notes)


def _shaped(name, factory, defaults, paper, space, source, notes="", why="", whole=False) -> OptimizerEntry:
    """A rule that needs the model's own tensors: ZeRO-0 fp32 only, guarded at run time; with
    `whole`, also ZeRO 1-3 through optim.whole_tensor (each tensor whole on its owner rank)."""
    return OptimizerEntry(
        name,
        factory,
        dict(defaults),
        paper,
        dict(space),
        WHOLE_TENSOR if whole else MODEL_TENSORS,
        source,
        needs_model_shapes=True,
        notes=notes,
        whole_tensor=whole,
        why_restricted=why,
    )


_SGD_MOM = {"lr": 0.01, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0}
_RADAM = {"lr": 1e-3, **_ADAM, "weight_decay": 0.0, "decoupled_weight_decay": False}
_LA = {"k": 5, "alpha": 0.5}

CROWDED_VALLEY = (
    # Robbins & Monro 1951, "A Stochastic Approximation Method".
    _ew(
        "sgd",
        F.sgd(nesterov=False, with_momentum=False),
        {"lr": 0.01, "weight_decay": 0.0},
        "https://doi.org/10.1214/aoms/1177729586",
        {"lr": LR_SGD},
        TORCH,
    ),
    # Heavy-ball momentum as used for deep nets: Sutskever, Martens, Dahl & Hinton 2013.
    _ew(
        "momentum",
        F.sgd(nesterov=False, with_momentum=True),
        _SGD_MOM,
        SUTSKEVER_2013,
        {"lr": LR_SGD, "momentum": _u(0.5, 0.99)},
        TORCH,
    ),
    # Nesterov's accelerated gradient in the momentum form of Sutskever et al. 2013 (torch's
    # nesterov=True needs dampening = 0, so dampening is not a knob here).
    _ew(
        "nesterov",
        F.sgd(nesterov=True, with_momentum=True),
        {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0},
        SUTSKEVER_2013,
        {"lr": LR_SGD, "momentum": _u(0.5, 0.99)},
        TORCH,
    ),
    _ew(
        "adam",
        F.with_betas(torch.optim.Adam),
        {"lr": 1e-3, **_ADAM, "weight_decay": 0.0, "amsgrad": False},
        "https://arxiv.org/abs/1412.6980",
        {"lr": LR_ADAM, "beta1": BETA1},
        TORCH,
    ),
    _ew(
        "adamw",
        F.with_betas(torch.optim.AdamW),
        {"lr": 1e-3, **_ADAM, "weight_decay": 0.01, "amsgrad": False},
        "https://arxiv.org/abs/1711.05101",
        {"lr": LR_ADAM, "weight_decay": _lu(1e-4, 1.0)},
        TORCH,
    ),
    # Reddi, Kale & Kumar 2018, "On the Convergence of Adam and Beyond" (ICLR).
    _ew(
        "amsgrad",
        F.with_betas(torch.optim.Adam, amsgrad=True),
        {"lr": 1e-3, **_ADAM, "weight_decay": 0.0},
        "https://openreview.net/forum?id=ryQu7f-RZ",
        {"lr": LR_ADAM, "beta1": BETA1},
        TORCH,
    ),
    _ew(
        "radam",
        F.with_betas(torch.optim.RAdam),
        _RADAM,
        "https://arxiv.org/abs/1908.03265",
        {"lr": LR_ADAM, "beta1": BETA1},
        TORCH,
    ),
    # Dozat 2016, "Incorporating Nesterov Momentum into Adam" (ICLR workshop).
    _ew(
        "nadam",
        F.with_betas(torch.optim.NAdam),
        {"lr": 2e-3, **_ADAM, "weight_decay": 0.0, "momentum_decay": 4e-3, "decoupled_weight_decay": False},
        "https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ",
        {"lr": LR_ADAM, "beta1": BETA1},
        TORCH,
    ),
    # Zhuang et al. 2020. Decoupled weight decay and no rectification: the paper's main variant.
    _ew(
        "adabelief",
        F.with_betas(po.AdaBelief, weight_decouple=True, rectify=False),
        {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-16, "weight_decay": 0.0},
        "https://arxiv.org/abs/2010.07468",
        {"lr": LR_ADAM, "beta1": BETA1},
        f"{PO} AdaBelief",
    ),
    # AdaBound/AMSBound clip Adam's per-coordinate step into bounds converging to final_lr (scaled
    # with the scheduled lr); the paper's weight decay is L2 (coupled), fixed here.
    _ew(
        "adabound",
        F.with_betas(po.AdaBound, ams_bound=False, weight_decouple=False),
        {"lr": 1e-3, **_ADAM, "final_lr": 0.1, "gamma": 1e-3, "weight_decay": 0.0},
        ADABOUND,
        {"lr": LR_ADAM, "final_lr": _lu(1e-3, 1.0)},
        f"{PO} AdaBound",
    ),
    _ew(
        "amsbound",
        F.with_betas(po.AdaBound, ams_bound=True, weight_decouple=False),
        {"lr": 1e-3, **_ADAM, "final_lr": 0.1, "gamma": 1e-3, "weight_decay": 0.0},
        ADABOUND,
        {"lr": LR_ADAM, "final_lr": _lu(1e-3, 1.0)},
        f"{PO} AdaBound(ams_bound=True)",
    ),
    _ew(
        "adadelta",
        F.plain(torch.optim.Adadelta),
        {"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0},
        "https://arxiv.org/abs/1212.5701",
        {"lr": _lu(1e-2, 10.0), "rho": _u(0.8, 0.99)},
        TORCH,
    ),
    # Duchi, Hazan & Singer 2011, JMLR 12.
    _ew(
        "adagrad",
        F.plain(torch.optim.Adagrad),
        {"lr": 1e-2, "lr_decay": 0.0, "weight_decay": 0.0, "initial_accumulator_value": 0.0, "eps": 1e-10},
        "https://jmlr.org/papers/v12/duchi11a.html",
        {"lr": _lu(1e-4, 1.0)},
        TORCH,
    ),
    # Tieleman & Hinton 2012, Coursera "Neural Networks for Machine Learning", lecture 6e.
    _ew(
        "rmsprop",
        F.plain(torch.optim.RMSprop),
        {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0, "centered": False},
        "https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf",
        {"lr": _lu(1e-5, 1e-1), "alpha": _u(0.9, 0.999)},
        TORCH,
    ),
    # Lookahead: every k steps the slow weights move alpha of the way to the fast ones and the
    # fast weights restart there (optim.is_sync_step flags those steps).
    _ew(
        "lookahead_momentum",
        F.lookahead(F.sgd(nesterov=False, with_momentum=True)),
        {**_SGD_MOM, **_LA},
        LOOKAHEAD,
        {"lr": LR_SGD, "alpha": _u(0.3, 0.9)},
        f"{PO} Lookahead over {TORCH} SGD",
        notes="Slow-weight sync after steps k-1, 2k-1, ...: flag them with optim.is_sync_step.",
    ),
    _ew(
        "lookahead_radam",
        F.lookahead(F.with_betas(torch.optim.RAdam)),
        {**_RADAM, **_LA},
        LOOKAHEAD,
        {"lr": LR_ADAM, "alpha": _u(0.3, 0.9)},
        f"{PO} Lookahead over {TORCH} RAdam",
        notes="Slow-weight sync after steps k-1, 2k-1, ...: flag them with optim.is_sync_step.",
    ),
)

CONTENDERS = (
    # You et al. 2019 (LAMB): Adam direction rescaled per tensor by the trust ratio ‖x‖/‖update‖.
    _shaped(
        "lamb",
        F.with_betas(po.Lamb, weight_decouple=True),
        {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "weight_decay": 0.01},
        "https://arxiv.org/abs/1904.00962",
        {"lr": _lu(1e-4, 1e-1), "weight_decay": _lu(1e-4, 1.0)},
        f"{PO} Lamb",
        whole=True,
    ),
    # Ginsburg et al. 2019 (NovoGrad): second moment of each layer's gradient NORM.
    _shaped(
        "novograd",
        F.with_betas(po.NovoGrad),
        {"lr": 1e-2, "beta1": 0.95, "beta2": 0.98, "eps": 1e-8, "weight_decay": 0.0},
        "https://arxiv.org/abs/1905.11286",
        {"lr": _lu(1e-4, 1.0), "beta1": BETA1},
        f"{PO} NovoGrad",
    ),
    # Chen et al. 2023 (Lion): sign of an interpolated momentum; lr 3-10x below AdamW's.
    _ew(
        "lion",
        F.with_betas(po.Lion, weight_decouple=True),
        {"lr": 1e-4, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.0},
        "https://arxiv.org/abs/2302.06675",
        {"lr": _lu(1e-6, 1e-2), "beta1": BETA1},
        f"{PO} Lion",
    ),
    OptimizerEntry(
        "schedulefree_adamw",
        F.schedulefree_adamw,
        {"lr": 2.5e-3, **_ADAM, "weight_decay": 0.0, "warmup_steps": 0, "r": 0.0, "weight_lr_power": 2.0},
        SCHEDULE_FREE,
        {"lr": LR_ADAM, "beta1": BETA1},
        MODEL_TENSORS,
        f"{SF} AdamWScheduleFree",
        notes=SCHEDULE_FREE_NOTES,
        why_restricted=SCHEDULE_FREE_WHY,
    ),
    OptimizerEntry(
        "schedulefree_sgd",
        F.schedulefree_sgd,
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "warmup_steps": 0, "r": 0.0, "weight_lr_power": 2.0},
        SCHEDULE_FREE,
        {"lr": _lu(1e-3, 10.0), "momentum": _u(0.5, 0.99)},
        MODEL_TENSORS,
        f"{SF} SGDScheduleFree",
        notes=SCHEDULE_FREE_NOTES,
        why_restricted=SCHEDULE_FREE_WHY,
    ),
    # Jordan et al. 2024 (Muon): momentum orthogonalised by Newton-Schulz, matrices only.
    _shaped(
        "muon",
        F.muon,
        {
            "lr": 0.02,
            "momentum": 0.95,
            "weight_decay": 0.0,
            "nesterov": True,
            "ns_steps": 5,
            "adamw_lr": 3e-4,
            "adamw_wd": 0.0,
            "beta1": 0.9,
            "beta2": 0.95,
        },
        "https://kellerjordan.github.io/posts/muon/",
        {"lr": _lu(1e-4, 1e-1), "momentum": _u(0.8, 0.99)},
        f"{PO} Muon",
        notes="Client Muon. At ZeRO 1-3 each tensor runs whole on its owner rank "
        "(optim.whole_tensor). DeepSpeed's native Muon is not used: it writes the update into "
        "the partitioned gradient buffer, which the measurement reads as the gradient, and runs "
        "its own Newton-Schulz rather than this library's.",
        whole=True,
    ),
    # Vyas et al. 2024 (SOAP): Adam in the eigenbasis of Shampoo's Kronecker factors.
    _shaped(
        "soap",
        F.with_betas(po.SOAP),
        {"lr": 3e-3, "beta1": 0.95, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.01, "precondition_frequency": 10},
        "https://arxiv.org/abs/2409.11321",
        {"lr": _lu(1e-4, 1e-1), "beta2": _u(0.9, 0.999)},
        f"{PO} SOAP",
    ),
    # Gupta, Koren & Singer 2018 (Shampoo): per-dimension Kronecker-factored preconditioners. The
    # update is scale-free like Adagrad's, whose default lr (1e-2) we take (the library's is 1e-3).
    _shaped(
        "shampoo",
        F.plain(po.Shampoo),
        {"lr": 1e-2, "momentum": 0.0, "weight_decay": 0.0, "preconditioning_compute_steps": 1, "matrix_eps": 1e-6},
        "https://arxiv.org/abs/1802.09568",
        {"lr": _lu(1e-5, 1e-1), "momentum": _u(0.0, 0.95)},
        f"{PO} Shampoo",
    ),
    # Liu et al. 2023 (Sophia; the Hutchinson estimator variant): clipped m / max(h, eps).
    _shaped(
        "sophia",
        F.sophia,
        {"lr": 0.06, "beta1": 0.96, "beta2": 0.99, "weight_decay": 0.0, "p": 0.01, "update_period": 10, "eps": 1e-12},
        "https://arxiv.org/abs/2305.14342",
        {"lr": _lu(1e-3, 1.0), "p": _lu(1e-3, 1e-1)},
        f"{PO} SophiaH (Hessian via optim.estimate_hessian)",
        notes="Every update_period steps (the first included) the step needs a Hutchinson "
        "estimate of diag(H) from a SIDE backward: when optim.needs_hessian(opt), call "
        "optim.estimate_hessian(opt, loss_fn, seed) after the boundary backward and "
        "before engine.step(); the step raises otherwise.",
        why="its Hessian estimate differentiates the loss with respect to the tensors the "
        "optimizer holds, which are the model's own only at ZeRO-0 fp32",
    ),
)

# The 2024-26 contenders. Left out: Adam-mini (Zhang et al. 2024, https://arxiv.org/abs/2406.16793):
# pytorch-optimizer's AdamMini partitions the parameters by their NAMES (embeddings, attention
# heads) and so takes the nn.Module, while a factory here receives tensors only.
RECENT = (
    # Pagliardini, Ablin & Grangier 2024 (AdEMAMix): Adam plus a slow EMA of the gradient (beta3)
    # weighted by alpha. The paper warms alpha and beta3 up over the run (t_alpha_beta3 = the
    # run's length); 0 here means no warm-up (the library's default), as the run length is the
    # study's.
    _ew(
        "ademamix",
        F.ademamix,
        {
            "lr": 1e-3,
            **_ADAM,
            "beta3": 0.9999,
            "alpha": 5.0,
            "t_alpha_beta3": 0,
            "weight_decay": 0.0,
            "weight_decouple": True,
        },
        "https://arxiv.org/abs/2409.03137",
        {"lr": LR_ADAM, "alpha": _u(1.0, 10.0)},
        f"{PO} AdEMAMix",
    ),
    # Taniguchi et al. 2024 (ADOPT): the gradient normalised by the PREVIOUS second moment, clipped
    # element-wise at step**0.25, then momentum; the first step only initialises the second moment.
    _ew(
        "adopt",
        F.with_betas(po.ADOPT),
        {"lr": 1e-3, "beta1": 0.9, "beta2": 0.9999, "eps": 1e-6, "weight_decay": 0.0, "weight_decouple": False},
        "https://arxiv.org/abs/2411.02853",
        {"lr": LR_ADAM, "beta1": BETA1},
        f"{PO} ADOPT",
        notes="The first step only initialises the second moment: the weights move from the second step on.",
    ),
    # Liang et al. 2024 (Cautious optimizers, C-AdamW): AdamW's update zeroed where its sign
    # disagrees with the gradient's, the rest rescaled by numel / kept over the whole tensor.
    _shaped(
        "cautious_adamw",
        F.cautious_adamw,
        {"lr": 1e-3, **_ADAM, "weight_decay": 0.01},
        "https://arxiv.org/abs/2411.16085",
        {"lr": LR_ADAM, "weight_decay": _lu(1e-4, 1.0)},
        f"{HB} AdamW(caution=True)",
        notes="pytorch-optimizer 4.1.0 has no cautious AdamW (only cautious ADOPT, AdEMAMix, LaProp, "
        "Lion, MARS); heavyball's runs eagerly here (factories.cautious_adamw says why).",
        why="its mask is rescaled by the fraction of coordinates kept in each whole tensor, and ZeRO 1-3 "
        "and DeepSpeed's bf16/fp16 optimizer wrappers hand the optimizer flat partitions",
    ),
    # Yuan et al. 2024 (MARS, the AdamW instance): Adam on a variance-reduced gradient
    # c = g + gamma * beta1 / (1 - beta1) * (g - g_prev), clipped to norm 1 per tensor.
    _shaped(
        "mars",
        F.mars,
        {
            "lr": 3e-3,
            "beta1": 0.95,
            "beta2": 0.99,
            "gamma": 0.025,
            "weight_decay": 0.0,
            "lr_1d": 3e-3,
            "beta1_1d": 0.9,
            "beta2_1d": 0.95,
            "weight_decay_1d": 0.1,
            "optimize_1d": False,
            "eps": 1e-8,
        },
        "https://arxiv.org/abs/2411.10438",
        {"lr": _lu(1e-4, 1e-1), "gamma": _lu(1e-3, 1e-1)},
        f"{PO} MARS(mars_type='adamw')",
        notes="Matrices get MARS; 1-D tensors AdamW at lr_1d (optimize_1d=False, the paper's setup).",
        why="it clips each tensor's variance-reduced gradient by that tensor's norm and gives 1-D tensors "
        "AdamW, and ZeRO 1-3 and DeepSpeed's bf16/fp16 optimizer wrappers hand the optimizer flat partitions",
    ),
    # Li 2015/2018 (PSGD) with Kronecker-factored preconditioners fitted on a Lie group; the
    # preconditioner-update probability follows the library's schedule (1 annealed to 0.03).
    _shaped(
        "psgd_kron",
        F.kron,
        {
            "lr": 1e-3,
            "momentum": 0.9,
            "weight_decay": 0.0,
            "max_size_triangular": 8192,
            "min_ndim_triangular": 2,
            "balance_prob": 0.01,
        },
        "https://arxiv.org/abs/1512.04202",
        {"lr": LR_ADAM, "momentum": _u(0.5, 0.99)},
        f"{PO} Kron (random draws seeded by step: factories.SameDrawsKron)",
    ),
    # Li et al. 2025 (NorMuon): Muon's orthogonalised momentum, normalised per neuron by a
    # second moment (muon_beta2); non-matrix tensors go to the library's AdamW as in Muon.
    _shaped(
        "normuon",
        F.normuon,
        {
            "lr": 0.02,
            "momentum": 0.95,
            "muon_beta2": 0.95,
            "weight_decay": 0.0,
            "nesterov": True,
            "ns_steps": 5,
            "adamw_lr": 3e-4,
            "adamw_wd": 0.0,
            "beta1": 0.9,
            "beta2": 0.95,
        },
        "https://arxiv.org/abs/2510.05491",
        {"lr": _lu(1e-4, 1e-1), "momentum": _u(0.8, 0.99)},
        f"{PO} NorMuon",
        notes="Matrices by shape, as muon: embeddings and output heads are NorMuon'd too. At ZeRO "
        "1-3 each tensor runs whole on its owner rank (optim.whole_tensor).",
        whole=True,
    ),
    # Pethick et al. 2025 (Scion): steps along a linear minimisation oracle of a norm chosen per
    # tensor (norm_type AUTO: spectral for matrices, sign/bias-style for the rest), scaled by `scale`.
    _shaped(
        "scion",
        F.plain(po.SCION),
        {"lr": 1e-3, "momentum": 0.1, "scale": 1.0, "constraint": False, "weight_decay": 0.0},
        "https://arxiv.org/abs/2502.07529",
        {"lr": LR_ADAM, "scale": _lu(0.1, 100.0)},
        f"{PO} SCION",
        notes="momentum is the weight of the NEW gradient (1 - the usual momentum). At ZeRO 1-3 "
        "each tensor runs whole on its owner rank (optim.whole_tensor).",
        whole=True,
    ),
    # Frans, Levine & Abbeel 2025 (SPlus): Shampoo-style whitening with sign-normalised
    # eigenbasis updates, shape-scaled lr, and evaluation at an EMA of the weights.
    _shaped(
        "splus",
        F.with_betas(po.SPlus),
        {
            "lr": 0.1,
            "beta1": 0.9,
            "beta2": 0.999,
            "weight_decay": 1e-2,
            "ema_rate": 0.999,
            "inverse_steps": 100,
            "nonstandard_constant": 1e-3,
            "max_dim": 10000,
            "eps": 1e-30,
        },
        "https://arxiv.org/abs/2506.07254",
        {"lr": _lu(1e-3, 10.0), "beta1": BETA1},
        f"{PO} SPlus",
        notes="Evaluated at its EMA of the weights: optim.eval_mode before evaluating or saving, "
        "optim.train_mode before the next step (the loop does both).",
    ),
)

OPTIMIZERS: dict[str, OptimizerEntry] = {e.name: e for e in CROWDED_VALLEY + CONTENDERS + RECENT}
