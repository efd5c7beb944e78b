"""Optimizer registry, the generic optimizer interface the loop calls, and LR schedules.

Every optimizer is an `OptimizerEntry` (entry.py) in the table `OPTIMIZERS` (zoo.py): a factory
taking the parameters and FLAT scalar hyperparameters, the full defaults, a default search
space, the paper, the implementation and its version, and the (ZeRO stage, precision)
combinations under which the update rule is correct. The training loop builds optimizers through
`build_optimizer` and talks to them only through interface.py, never branching on a name.
`lr_factor` / `schedule_factor` (schedules.py) are the schedules. whole_tensor.py runs a matrix or
layer-wise rule under ZeRO 1-3 on whole tensors, each owned by one rank.
"""

from opt_study.optim.entry import (
    CPU_PRECISIONS,
    ELEMENTWISE,
    MODEL_TENSORS,
    PRECISIONS,
    STAGES,
    WHOLE_TENSOR,
    OptimizerEntry,
)
from opt_study.optim.interface import (
    apply_lr_factor,
    attach_fragments,
    check_model_shapes,
    estimate_hessian,
    eval_mode,
    is_sync_step,
    needs_hessian,
    train_mode,
)
from opt_study.optim.registry import build_optimizer, combination_error, optimizer_entry, resolve_hparams
from opt_study.optim.schedules import SCHEDULES, lr_factor, schedule_factor
from opt_study.optim.zoo import OPTIMIZERS

__all__ = [
    "OptimizerEntry",
    "OPTIMIZERS",
    "STAGES",
    "PRECISIONS",
    "CPU_PRECISIONS",
    "ELEMENTWISE",
    "MODEL_TENSORS",
    "WHOLE_TENSOR",
    "optimizer_entry",
    "resolve_hparams",
    "build_optimizer",
    "combination_error",
    "lr_factor",
    "schedule_factor",
    "SCHEDULES",
    "apply_lr_factor",
    "attach_fragments",
    "train_mode",
    "eval_mode",
    "is_sync_step",
    "needs_hessian",
    "estimate_hessian",
    "check_model_shapes",
]
