"""The optimizer table: the Crowded Valley set and today's contenders, plus the 2024-26 ones
(`zoo_recent.RECENT`); the provenance strings, shared paper links, search-space domains and entry
constructors they are built from are in `zoo_parts`.

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

import pytorch_optimizer as po
import torch

from opt_study.optim import factories as F
from opt_study.optim.entry import MODEL_TENSORS, OptimizerEntry
from opt_study.optim.zoo_parts import (
    ADABOUND,
    ADAM,
    BETA1,
    LOOKAHEAD,
    LR_ADAM,
    LR_SGD,
    PO,
    SCHEDULE_FREE,
    SCHEDULE_FREE_NOTES,
    SCHEDULE_FREE_WHY,
    SF,
    SUTSKEVER_2013,
    TORCH,
    ew,
    lu,
    shaped,
    u,
)
from opt_study.optim.zoo_recent import RECENT

_SGD_MOM = {"lr": 0.01, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0}
_RADAM = {"lr": 1e-3, **ADAM, "weight_decay": 0.0, "decoupled_weight_decay": False}
_LA = {"k": 5, "alpha": 0.5}

CROWDED_VALLEY = (
    # Robbins & Monro 1951, "A Stochastic Approximation Method".
    ew(
        "sgd",
        F.sgd(nesterov=False, with_momentum=False),
        {"lr": 0.01, "weight_decay": 0.0},
        "https://doi.org/10.1214/aoms/1177729586",
        {"lr": LR_SGD},
        TORCH,
    ),
    # Heavy-ball momentum as used for deep nets: Sutskever, Martens, Dahl & Hinton 2013.
    ew(
        "momentum",
        F.sgd(nesterov=False, with_momentum=True),
        _SGD_MOM,
        SUTSKEVER_2013,
        {"lr": LR_SGD, "momentum": u(0.5, 0.99)},
        TORCH,
    ),
    # Nesterov's accelerated gradient in the momentum form of Sutskever et al. 2013 (torch's
    # nesterov=True needs dampening = 0, so dampening is not a knob here).
    ew(
        "nesterov",
        F.sgd(nesterov=True, with_momentum=True),
        {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0},
        SUTSKEVER_2013,
        {"lr": LR_SGD, "momentum": u(0.5, 0.99)},
        TORCH,
    ),
    ew(
        "adam",
        F.with_betas(torch.optim.Adam),
        {"lr": 1e-3, **ADAM, "weight_decay": 0.0, "amsgrad": False},
        "https://arxiv.org/abs/1412.6980",
        {"lr": LR_ADAM, "beta1": BETA1},
        TORCH,
    ),
    ew(
        "adamw",
        F.with_betas(torch.optim.AdamW),
        {"lr": 1e-3, **ADAM, "weight_decay": 0.01, "amsgrad": False},
        "https://arxiv.org/abs/1711.05101",
        {"lr": LR_ADAM, "weight_decay": lu(1e-4, 1.0)},
        TORCH,
    ),
    # Reddi, Kale & Kumar 2018, "On the Convergence of Adam and Beyond" (ICLR).
    ew(
        "amsgrad",
        F.with_betas(torch.optim.Adam, amsgrad=True),
        {"lr": 1e-3, **ADAM, "weight_decay": 0.0},
        "https://openreview.net/forum?id=ryQu7f-RZ",
        {"lr": LR_ADAM, "beta1": BETA1},
        TORCH,
    ),
    ew(
        "radam",
        F.with_betas(torch.optim.RAdam),
        _RADAM,
        "https://arxiv.org/abs/1908.03265",
        {"lr": LR_ADAM, "beta1": BETA1},
        TORCH,
    ),
    # Dozat 2016, "Incorporating Nesterov Momentum into Adam" (ICLR workshop).
    ew(
        "nadam",
        F.with_betas(torch.optim.NAdam),
        {"lr": 2e-3, **ADAM, "weight_decay": 0.0, "momentum_decay": 4e-3, "decoupled_weight_decay": False},
        "https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ",
        {"lr": LR_ADAM, "beta1": BETA1},
        TORCH,
    ),
    # Zhuang et al. 2020. Decoupled weight decay and no rectification: the paper's main variant.
    ew(
        "adabelief",
        F.with_betas(po.AdaBelief, weight_decouple=True, rectify=False),
        {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-16, "weight_decay": 0.0},
        "https://arxiv.org/abs/2010.07468",
        {"lr": LR_ADAM, "beta1": BETA1},
        f"{PO} AdaBelief",
    ),
    # AdaBound/AMSBound clip Adam's per-coordinate step into bounds converging to final_lr (scaled
    # with the scheduled lr); the paper's weight decay is L2 (coupled), fixed here.
    ew(
        "adabound",
        F.with_betas(po.AdaBound, ams_bound=False, weight_decouple=False),
        {"lr": 1e-3, **ADAM, "final_lr": 0.1, "gamma": 1e-3, "weight_decay": 0.0},
        ADABOUND,
        {"lr": LR_ADAM, "final_lr": lu(1e-3, 1.0)},
        f"{PO} AdaBound",
    ),
    ew(
        "amsbound",
        F.with_betas(po.AdaBound, ams_bound=True, weight_decouple=False),
        {"lr": 1e-3, **ADAM, "final_lr": 0.1, "gamma": 1e-3, "weight_decay": 0.0},
        ADABOUND,
        {"lr": LR_ADAM, "final_lr": lu(1e-3, 1.0)},
        f"{PO} AdaBound(ams_bound=True)",
    ),
    ew(
        "adadelta",
        F.plain(torch.optim.Adadelta),
        {"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0},
        "https://arxiv.org/abs/1212.5701",
        {"lr": lu(1e-2, 10.0), "rho": u(0.8, 0.99)},
        TORCH,
    ),
    # Duchi, Hazan & Singer 2011, JMLR 12.
    ew(
        "adagrad",
        F.plain(torch.optim.Adagrad),
        {"lr": 1e-2, "lr_decay": 0.0, "weight_decay": 0.0, "initial_accumulator_value": 0.0, "eps": 1e-10},
        "https://jmlr.org/papers/v12/duchi11a.html",
        {"lr": lu(1e-4, 1.0)},
        TORCH,
    ),
    # Tieleman & Hinton 2012, Coursera "Neural Networks for Machine Learning", lecture 6e.
    ew(
        "rmsprop",
        F.plain(torch.optim.RMSprop),
        {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0, "centered": False},
        "https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf",
        {"lr": lu(1e-5, 1e-1), "alpha": u(0.9, 0.999)},
        TORCH,
    ),
    # Lookahead: every k steps the slow weights move alpha of the way to the fast ones and the
    # fast weights restart there (optim.is_sync_step flags those steps).
    ew(
        "lookahead_momentum",
        F.lookahead(F.sgd(nesterov=False, with_momentum=True)),
        {**_SGD_MOM, **_LA},
        LOOKAHEAD,
        {"lr": LR_SGD, "alpha": u(0.3, 0.9)},
        f"{PO} Lookahead over {TORCH} SGD",
        notes="Slow-weight sync after steps k-1, 2k-1, ...: flag them with optim.is_sync_step.",
    ),
    ew(
        "lookahead_radam",
        F.lookahead(F.with_betas(torch.optim.RAdam)),
        {**_RADAM, **_LA},
        LOOKAHEAD,
        {"lr": LR_ADAM, "alpha": u(0.3, 0.9)},
        f"{PO} Lookahead over {TORCH} RAdam",
        notes="Slow-weight sync after steps k-1, 2k-1, ...: flag them with optim.is_sync_step.",
    ),
)

CONTENDERS = (
    # You et al. 2019 (LAMB): Adam direction rescaled per tensor by the trust ratio ‖x‖/‖update‖.
    shaped(
        "lamb",
        F.with_betas(po.Lamb, weight_decouple=True),
        {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "weight_decay": 0.01},
        "https://arxiv.org/abs/1904.00962",
        {"lr": lu(1e-4, 1e-1), "weight_decay": lu(1e-4, 1.0)},
        f"{PO} Lamb",
        whole=True,
    ),
    # Ginsburg et al. 2019 (NovoGrad): second moment of each layer's gradient NORM.
    shaped(
        "novograd",
        F.with_betas(po.NovoGrad),
        {"lr": 1e-2, "beta1": 0.95, "beta2": 0.98, "eps": 1e-8, "weight_decay": 0.0},
        "https://arxiv.org/abs/1905.11286",
        {"lr": lu(1e-4, 1.0), "beta1": BETA1},
        f"{PO} NovoGrad",
    ),
    # Chen et al. 2023 (Lion): sign of an interpolated momentum; lr 3-10x below AdamW's.
    ew(
        "lion",
        F.with_betas(po.Lion, weight_decouple=True),
        {"lr": 1e-4, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.0},
        "https://arxiv.org/abs/2302.06675",
        {"lr": lu(1e-6, 1e-2), "beta1": BETA1},
        f"{PO} Lion",
    ),
    OptimizerEntry(
        "schedulefree_adamw",
        F.schedulefree_adamw,
        {"lr": 2.5e-3, **ADAM, "weight_decay": 0.0, "warmup_steps": 0, "r": 0.0, "weight_lr_power": 2.0},
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
        {"lr": lu(1e-3, 10.0), "momentum": u(0.5, 0.99)},
        MODEL_TENSORS,
        f"{SF} SGDScheduleFree",
        notes=SCHEDULE_FREE_NOTES,
        why_restricted=SCHEDULE_FREE_WHY,
    ),
    # Jordan et al. 2024 (Muon): momentum orthogonalised by Newton-Schulz, matrices only.
    shaped(
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
        {"lr": lu(1e-4, 1e-1), "momentum": u(0.8, 0.99)},
        f"{PO} Muon",
        notes="Client Muon. At ZeRO 1-3 each tensor runs whole on its owner rank "
        "(optim.whole_tensor). DeepSpeed's native Muon is not used: it writes the update into "
        "the partitioned gradient buffer, which the measurement reads as the gradient, and runs "
        "its own Newton-Schulz rather than this library's.",
        whole=True,
    ),
    # Vyas et al. 2024 (SOAP): Adam in the eigenbasis of Shampoo's Kronecker factors.
    shaped(
        "soap",
        F.with_betas(po.SOAP),
        {"lr": 3e-3, "beta1": 0.95, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.01, "precondition_frequency": 10},
        "https://arxiv.org/abs/2409.11321",
        {"lr": lu(1e-4, 1e-1), "beta2": u(0.9, 0.999)},
        f"{PO} SOAP",
    ),
    # Gupta, Koren & Singer 2018 (Shampoo): per-dimension Kronecker-factored preconditioners. The
    # update is scale-free like Adagrad's, whose default lr (1e-2) we take (the library's is 1e-3).
    shaped(
        "shampoo",
        F.plain(po.Shampoo),
        {"lr": 1e-2, "momentum": 0.0, "weight_decay": 0.0, "preconditioning_compute_steps": 1, "matrix_eps": 1e-6},
        "https://arxiv.org/abs/1802.09568",
        {"lr": lu(1e-5, 1e-1), "momentum": u(0.0, 0.95)},
        f"{PO} Shampoo",
    ),
    # Liu et al. 2023 (Sophia; the Hutchinson estimator variant): clipped m / max(h, eps).
    shaped(
        "sophia",
        F.sophia,
        {"lr": 0.06, "beta1": 0.96, "beta2": 0.99, "weight_decay": 0.0, "p": 0.01, "update_period": 10, "eps": 1e-12},
        "https://arxiv.org/abs/2305.14342",
        {"lr": lu(1e-3, 1.0), "p": lu(1e-3, 1e-1)},
        f"{PO} SophiaH (Hessian via optim.estimate_hessian)",
        notes="Every update_period steps (the first included) the step needs a Hutchinson "
        "estimate of diag(H) from a SIDE backward: when optim.needs_hessian(opt), call "
        "optim.estimate_hessian(opt, loss_fn, seed) after the boundary backward and "
        "before engine.step(); the step raises otherwise.",
        why="its Hessian estimate differentiates the loss with respect to the tensors the "
        "optimizer holds, which are the model's own only at ZeRO-0 fp32",
    ),
)

OPTIMIZERS: dict[str, OptimizerEntry] = {e.name: e for e in CROWDED_VALLEY + CONTENDERS + RECENT}
