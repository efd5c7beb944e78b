"""What the registry knows about one optimizer: `OptimizerEntry`, and the (ZeRO stage, precision)
combinations under which an update rule stays the rule its paper defines.

Why combinations and not stages: ZeRO 1-3, and DeepSpeed's bf16/fp16 optimizer wrappers even at
stage 0, hand the client optimizer flat fp32 partitions cut at arbitrary offsets, not the model's
tensors. An element-wise rule (SGD, the Adam family, Lion) computes the same numbers on any cut;
a layer-wise or matrix rule (LAMB's trust ratio, NovoGrad's per-layer norm, Muon's
orthogonalisation, Shampoo's and SOAP's Kronecker factors) would silently compute something else.
Only ZeRO-0 with fp32 hands the optimizer the model's own parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp32", "bf16", "fp16")
# Every combination: for rules that act element by element (or on scalars such as the step count).
ELEMENTWISE = frozenset((s, p) for s in STAGES for p in PRECISIONS)
# The one combination in which the client optimizer holds the model's real tensors.
MODEL_TENSORS = frozenset({(0, "fp32")})
SHAPES_WHY = ("its update needs each parameter's real shape, and ZeRO 1-3 and DeepSpeed's "
              "bf16/fp16 optimizer wrappers hand the optimizer flat partitions")


@dataclass(frozen=True)
class OptimizerEntry:
    """One registered optimizer.

    `factory(params, **resolved hparams)` builds it; `defaults` are the full default
    hyperparameters as flat scalars (lr included, Adam's betas as beta1/beta2); `space` is the
    documented default search space in the YAML domain form of `opt_study.space.parse_domain`
    (a subset of the defaults' names); `combos` the (zero_stage, precision) pairs under which
    the update rule is correct; `needs_model_shapes` says the rule needs each parameter's real
    shape (the run-time guard `check_model_shapes` enforces it); `source` names the
    implementation ("torch 2.13.0", "pytorch-optimizer 4.1.0 Lamb", ...); `notes` documents what
    the loop must know (which iterate gradients are taken at, extra backward passes, ...).
    """

    name: str
    factory: Callable[..., torch.optim.Optimizer]
    defaults: Mapping[str, Any]
    paper: str
    space: Mapping[str, Any]
    combos: frozenset[tuple[int, str]]
    source: str
    needs_model_shapes: bool = False
    notes: str = ""
    why_restricted: str = ""  # why `combos` is not every combination (for validate's message)

    @property
    def zero_stages(self) -> frozenset[int]:
        """Stages with at least one correct precision (kept for callers that check stages only)."""
        return frozenset(s for s, _ in self.combos)

    @property
    def elementwise(self) -> bool:
        return self.combos == ELEMENTWISE

    def precisions_at(self, stage: int) -> tuple[str, ...]:
        return tuple(p for p in PRECISIONS if (stage, p) in self.combos)

    def combination_error(self, zero_stage: int, precision: str) -> str | None:
        """None if (zero_stage, precision) is correct for this rule, else a message that says what
        to change in the study file (for `opt-study validate`)."""
        if (zero_stage, precision) in self.combos:
            return None
        why = self.why_restricted or (SHAPES_WHY if self.needs_model_shapes else "not declared correct")
        ok = self.precisions_at(zero_stage)
        if ok:
            fix = f"set scale.precision to {' or '.join(ok)} (or change scale.zero_stage)"
        else:
            stages = sorted(self.zero_stages)
            precs = sorted({p for _, p in self.combos}, key=PRECISIONS.index)
            fix = (f"set scale.zero_stage to {' or '.join(map(str, stages))}"
                   f"{'' if precs == list(PRECISIONS) else ' with scale.precision ' + ' or '.join(precs)}")
        allowed = ", ".join(f"zero_stage {s}/{p}" for s, p in sorted(self.combos, key=_combo_key))
        return (f"{self.name} is not correct under zero_stage {zero_stage} with precision {precision} "
                f"({why}); {fix}. Correct combinations: {allowed}")


def _combo_key(c: tuple[int, str]) -> tuple[int, int]:
    return c[0], PRECISIONS.index(c[1])
