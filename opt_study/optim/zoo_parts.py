"""The pieces the optimizer table (`opt_study.optim.zoo`) is built from: where each rule's code
comes from (library and pinned version), the paper links shared by several entries, the default
search-space domains, and the two entry constructors: `ew` for an element-wise rule (correct at
every ZeRO stage and precision) and `shaped` for a rule that needs the model's own tensors.
"""

from __future__ import annotations

from importlib.metadata import version

import torch

from opt_study.optim.entry import ELEMENTWISE, MODEL_TENSORS, WHOLE_TENSOR, OptimizerEntry

TORCH = f"torch {torch.__version__.split('+')[0]}"
PO = f"pytorch-optimizer {version('pytorch-optimizer')}"
SF = f"schedulefree {version('schedulefree')}"
HB = f"heavyball {version('heavyball')}"

SUTSKEVER_2013 = "https://proceedings.mlr.press/v28/sutskever13.html"
ADABOUND = "https://arxiv.org/abs/1902.09843"  # Luo et al. 2019: AdaBound and AMSBound
LOOKAHEAD = "https://arxiv.org/abs/1907.08610"  # Zhang, Lucas, Hinton & Ba 2019
SCHEDULE_FREE = "https://arxiv.org/abs/2405.15682"  # Defazio et al. 2024

ADAM = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}


def lu(lo: float, hi: float) -> dict:
    return {"loguniform": [lo, hi]}


def u(lo: float, hi: float) -> dict:
    return {"uniform": [lo, hi]}


LR_SGD = lu(1e-4, 1.0)
LR_ADAM = lu(1e-5, 1e-1)
BETA1 = u(0.8, 0.99)

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


def ew(name, factory, defaults, paper, space, source, notes="") -> OptimizerEntry:
    """An element-wise rule: correct at every ZeRO stage and precision."""
    return OptimizerEntry(name, factory, dict(defaults), paper, dict(space), ELEMENTWISE, source, notes=notes)


def shaped(name, factory, defaults, paper, space, source, notes="", why="", whole=False) -> OptimizerEntry:
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
