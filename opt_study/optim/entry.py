"""What the registry knows about one optimizer: `OptimizerEntry`, and the (ZeRO stage, precision)
combinations under which an update rule stays the rule its paper defines.

Why combinations and not stages: ZeRO 1-3, and DeepSpeed's bf16/fp16 optimizer wrappers even at
stage 0, hand the client optimizer flat fp32 partitions cut at arbitrary offsets, not the model's
tensors. An element-wise rule (SGD, the Adam family, Lion) computes the same numbers on any cut;
a layer-wise or matrix rule (LAMB's trust ratio, NovoGrad's per-layer norm, Muon's
orthogonalisation, Shampoo's and SOAP's Kronecker factors) would silently compute something else.
Only ZeRO-0 with fp32 hands the optimizer the model's own parameters.

Besides the rule, the engine: DeepSpeed 0.19.8 has no bf16 mode without ZeRO when gradients
accumulate in fp32 (its optimizer sanity check raises "unsupported mix of model_dtype=bfloat16
and grad_accum_dtype=float32"), and opt_study.trial.engine.ds_config always accumulates and reduces
bf16 runs in fp32 so measured gradients are not bf16-rounded. So (0, "bf16") is declared for no
optimizer: bf16 needs ZeRO 1-3 (UNSUPPORTED says why in validate's message).

Tested: every declared fp32 and bf16 combination runs under DeepSpeed on 2 CPU ranks
(tests/multirank/test_optim_multirank.py). fp16 needs a GPU (ScaleConfig refuses it on CPU); its
combinations are declared by the same element-wise argument and are untested on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp32", "bf16", "fp16")
# What runs on a CPU (ScaleConfig refuses fp16 without a GPU): the multi-rank zoo job
# (tests/dist/zoo_harness.py) runs every declared combination in these; fp16 combinations are
# declared by the same element-wise argument but exercised only on a GPU.
CPU_PRECISIONS = ("fp32", "bf16")
# Combinations the engine cannot run for any optimizer, and why (for validate's message).
UNSUPPORTED = {
    (0, "bf16"): "DeepSpeed 0.19.8 has no bf16 mode without ZeRO when gradients accumulate "
    "in fp32, which opt_study.trial.engine sets so measured gradients are not bf16-rounded"
}
# Every combination the engine runs: for rules that act element by element (or on scalars such
# as the step count).
ELEMENTWISE = frozenset((s, p) for s in STAGES for p in PRECISIONS) - frozenset(UNSUPPORTED)
# The one combination in which the client optimizer holds the model's real tensors.
MODEL_TENSORS = frozenset({(0, "fp32")})
# A rule that runs on whole tensors (optim.whole_tensor: each tensor gathered to one owner rank,
# the rule run there, the new weights sent back into the partitions) is correct at ZeRO-0 fp32
# (the plain rule) and at ZeRO 1-3 in the precisions a CPU tests (fp32; bf16 with fp32 masters and
# gradients): tests/multirank/test_optim_multirank.py compares those trajectories with ZeRO-0's.
# fp16 is not declared: its loss scaling is untested on this route (it needs a GPU).
WHOLE_TENSOR = MODEL_TENSORS | frozenset((s, p) for s in (1, 2, 3) for p in ("fp32", "bf16"))
SHAPES_WHY = (
    "its update needs each parameter's real shape, and ZeRO 1-3 and DeepSpeed's "
    "bf16/fp16 optimizer wrappers hand the optimizer flat partitions"
)

WHOLE_TENSOR_WHY = "its whole-tensor route (optim.whole_tensor) is not tested under fp16's loss scaling"


@dataclass(frozen=True)
class OptimizerEntry:
    """One registered optimizer.

    `factory(params, **resolved hparams)` builds it; `defaults` are the full default
    hyperparameters as flat scalars (lr included, Adam's betas as beta1/beta2); `space` is the
    documented default search space in the YAML domain form of `opt_study.config.space.parse_domain`
    (a subset of the defaults' names); `combos` the (zero_stage, precision) pairs under which
    the update rule is correct; `needs_model_shapes` says the rule needs each parameter's real
    shape (the run-time guard `check_model_shapes` enforces it); `whole_tensor` says that at ZeRO
    1-3 the rule runs through optim.whole_tensor (each tensor whole on one owner rank), so its
    `combos` are WHOLE_TENSOR; `source` names the
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
    whole_tensor: bool = False
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
        if self.whole_tensor and not self.why_restricted:
            why = UNSUPPORTED.get((zero_stage, precision), WHOLE_TENSOR_WHY)
        else:
            why = self.why_restricted or (
                SHAPES_WHY
                if self.needs_model_shapes
                else UNSUPPORTED.get((zero_stage, precision), "not declared correct")
            )
        ok = self.precisions_at(zero_stage)
        keep = [s for s in STAGES if (s, precision) in self.combos]  # stages that run this precision
        if ok and keep:
            fix = (
                f"set scale.zero_stage to {' or '.join(map(str, keep))} to keep {precision}, "
                f"or scale.precision to {' or '.join(ok)}"
            )
        elif ok:
            fix = f"set scale.precision to {' or '.join(ok)} (or change scale.zero_stage)"
        else:
            stages = sorted(self.zero_stages)
            precs = sorted({p for _, p in self.combos}, key=PRECISIONS.index)
            fix = (
                f"set scale.zero_stage to {' or '.join(map(str, stages))}"
                f"{'' if precs == list(PRECISIONS) else ' with scale.precision ' + ' or '.join(precs)}"
            )
        allowed = ", ".join(f"zero_stage {s}/{p}" for s, p in sorted(self.combos, key=_combo_key))
        return (
            f"{self.name} is not correct under zero_stage {zero_stage} with precision {precision} "
            f"({why}); {fix}. Correct combinations: {allowed}"
        )


def _combo_key(c: tuple[int, str]) -> tuple[int, int]:
    return c[0], PRECISIONS.index(c[1])
