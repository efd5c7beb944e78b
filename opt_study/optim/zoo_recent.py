"""The newest optimizers in the table (`opt_study.optim.zoo`): the 2024-26 contenders, each from
a pinned library (pytorch-optimizer, schedulefree, heavyball) with its paper link above it.
"""

from __future__ import annotations

import pytorch_optimizer as po

from opt_study.optim import factories as F
from opt_study.optim.zoo_parts import (
    ADAM,
    BETA1,
    HB,
    LR_ADAM,
    PO,
    ew,
    lu,
    shaped,
    u,
)

# The 2024-26 contenders. Left out: Adam-mini (Zhang et al. 2024, https://arxiv.org/abs/2406.16793):
# pytorch-optimizer's AdamMini partitions the parameters by their NAMES (embeddings, attention
# heads) and so takes the nn.Module, while a factory here receives tensors only.
RECENT = (
    # Pagliardini, Ablin & Grangier 2024 (AdEMAMix): Adam plus a slow EMA of the gradient (beta3)
    # weighted by alpha. The paper warms alpha and beta3 up over the run (t_alpha_beta3 = the
    # run's length); 0 here means no warm-up (the library's default), as the run length is the
    # study's.
    ew(
        "ademamix",
        F.ademamix,
        {
            "lr": 1e-3,
            **ADAM,
            "beta3": 0.9999,
            "alpha": 5.0,
            "t_alpha_beta3": 0,
            "weight_decay": 0.0,
            "weight_decouple": True,
        },
        "https://arxiv.org/abs/2409.03137",
        {"lr": LR_ADAM, "alpha": u(1.0, 10.0)},
        f"{PO} AdEMAMix",
    ),
    # Taniguchi et al. 2024 (ADOPT): the gradient normalised by the PREVIOUS second moment, clipped
    # element-wise at step**0.25, then momentum; the first step only initialises the second moment.
    ew(
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
    shaped(
        "cautious_adamw",
        F.cautious_adamw,
        {"lr": 1e-3, **ADAM, "weight_decay": 0.01},
        "https://arxiv.org/abs/2411.16085",
        {"lr": LR_ADAM, "weight_decay": lu(1e-4, 1.0)},
        f"{HB} AdamW(caution=True)",
        notes="pytorch-optimizer 4.1.0 has no cautious AdamW (only cautious ADOPT, AdEMAMix, LaProp, "
        "Lion, MARS); heavyball's runs eagerly here (factories.cautious_adamw says why).",
        why="its mask is rescaled by the fraction of coordinates kept in each whole tensor, and ZeRO 1-3 "
        "and DeepSpeed's bf16/fp16 optimizer wrappers hand the optimizer flat partitions",
    ),
    # Yuan et al. 2024 (MARS, the AdamW instance): Adam on a variance-reduced gradient
    # c = g + gamma * beta1 / (1 - beta1) * (g - g_prev), clipped to norm 1 per tensor.
    shaped(
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
        {"lr": lu(1e-4, 1e-1), "gamma": lu(1e-3, 1e-1)},
        f"{PO} MARS(mars_type='adamw')",
        notes="Matrices get MARS; 1-D tensors AdamW at lr_1d (optimize_1d=False, the paper's setup).",
        why="it clips each tensor's variance-reduced gradient by that tensor's norm and gives 1-D tensors "
        "AdamW, and ZeRO 1-3 and DeepSpeed's bf16/fp16 optimizer wrappers hand the optimizer flat partitions",
    ),
    # Li 2015/2018 (PSGD) with Kronecker-factored preconditioners fitted on a Lie group; the
    # preconditioner-update probability follows the library's schedule (1 annealed to 0.03).
    shaped(
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
        {"lr": LR_ADAM, "momentum": u(0.5, 0.99)},
        f"{PO} Kron (random draws seeded by step: factories.SameDrawsKron)",
    ),
    # Li et al. 2025 (NorMuon): Muon's orthogonalised momentum, normalised per neuron by a
    # second moment (muon_beta2); non-matrix tensors go to the library's AdamW as in Muon.
    shaped(
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
        {"lr": lu(1e-4, 1e-1), "momentum": u(0.8, 0.99)},
        f"{PO} NorMuon",
        notes="Matrices by shape, as muon: embeddings and output heads are NorMuon'd too. At ZeRO "
        "1-3 each tensor runs whole on its owner rank (optim.whole_tensor).",
        whole=True,
    ),
    # Pethick et al. 2025 (Scion): steps along a linear minimisation oracle of a norm chosen per
    # tensor (norm_type AUTO: spectral for matrices, sign/bias-style for the rest), scaled by `scale`.
    shaped(
        "scion",
        F.plain(po.SCION),
        {"lr": 1e-3, "momentum": 0.1, "scale": 1.0, "constraint": False, "weight_decay": 0.0},
        "https://arxiv.org/abs/2502.07529",
        {"lr": LR_ADAM, "scale": lu(0.1, 100.0)},
        f"{PO} SCION",
        notes="momentum is the weight of the NEW gradient (1 - the usual momentum). At ZeRO 1-3 "
        "each tensor runs whole on its owner rank (optim.whole_tensor).",
        whole=True,
    ),
    # Frans, Levine & Abbeel 2025 (SPlus): Shampoo-style whitening with sign-normalised
    # eigenbasis updates, shape-scaled lr, and evaluation at an EMA of the weights.
    shaped(
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
        {"lr": lu(1e-3, 10.0), "beta1": BETA1},
        f"{PO} SPlus",
        notes="Evaluated at its EMA of the weights: optim.eval_mode before evaluating or saving, "
        "optim.train_mode before the next step (the loop does both).",
    ),
)
