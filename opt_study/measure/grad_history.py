"""trainit's gradient-history cosine cos(g_t, S_t), S_t = Σ_{s<t} g_s (docs/METRICS.md §Gradient
history; measure.grad_history).

ZQZCalin/trainit (https://github.com/ZQZCalin/trainit), loggers/demo.py: `full_log` keeps
`grads_hist` = g(1:n−1), zeros at init (line 166), logs `grads/<gn, g(1:n-1)>` and
`grads/cos(gn, g(1:n-1))` against it (lines 227-228) and only then adds g_n (line 264). Its
update runs on EVERY iteration (_src/train/train_lm.py lines 103-108), skipping only iterations
whose gradient is not finite (demo.py line 269). So S_t sums the gradients of all steps before t,
measured or not, and this module adds g_t on every step (a non-finite g_t is skipped, as theirs).

One more shard-sized fp32 buffer per rank (S on this rank's shard, the layout of x_t). On a
measured step the two partial sums ⟨g_t, S_t⟩ and ‖S_t‖² over the rank's shard are the raw sums'
own ``flat_sums`` (fused kernel or torch path, the error bound of docs/METRICS.md §Raw sums) and
join the step's ONE all-reduce as two scalars of names.LOSS_NAMES. S is accumulated in fp32:
after T additions each element is within γ_T·Σ_s|g_{s,i}| of the exact sum (Higham 2002, §4.2).
S does not survive a restart: an attempt that starts after step 0 has no history (null columns).
"""

from __future__ import annotations

import math

import torch

from opt_study.measure.names import GRAD_HISTORY_NAMES, SUM_NAMES
from opt_study.measure.shards import FlatShard
from opt_study.measure.sums import flat_sums, group_runs


class GradHistory:
    """The running gradient sum S of one rank's shard, from the attempt's first step."""

    def __init__(self):
        self.sum: FlatShard | None = None
        self.valid: bool | None = None  # None until the first step: S is exact only from step 0

    def partials(self, g: FlatShard, step: int) -> torch.Tensor:
        """This rank's partial (⟨g_t, S_t⟩, ‖S_t‖²), float64 [2] on g's device; NaN without a
        history (an attempt that did not start at step 0). Call before ``add`` of step t."""
        if self.valid is None:
            self.valid = step == 0
        if not self.valid:
            return torch.full((2,), math.nan, dtype=torch.float64, device=g.flat.device)
        if self.sum is None:  # step 0: S_0 = 0
            return torch.zeros(2, dtype=torch.float64, device=g.flat.device)
        runs = group_runs(g.sizes, [0] * len(g.sizes))
        # ⟨x, g⟩ and ‖x‖² of flat_sums with S handed in x's place
        out = flat_sums({"x": self.sum.flat, "g": g.flat}, runs, 1, only=("ip_param_grad", "sq_param"))
        return out[[SUM_NAMES.index("ip_param_grad"), SUM_NAMES.index("sq_param")], 0]

    def add(self, g: FlatShard, step: int) -> None:
        """S ← S + g_t after step t's measurement (every step; a non-finite g_t is skipped)."""
        if self.valid is None:
            self.valid = step == 0
        if not self.valid:
            return
        if self.sum is None:
            self.sum = FlatShard(torch.zeros_like(g.flat), g.sizes)
        # trainit's finiteness check without a host sync: g_t is added only if all of it is finite
        # (this rank's shard; a rank-local skip differs from theirs only where a rank overflowed)
        self.sum.flat.add_(torch.where(torch.isfinite(g.flat).all(), g.flat, 0.0))


def columns(ip: float, sq: float, sq_grad: float) -> dict[str, float | None]:
    """names.GRAD_HISTORY_NAMES from the reduced sums: ⟨g_t, S_t⟩, ‖S_t‖² and
    cos(g_t, S_t) = ⟨g_t, S_t⟩ / (‖g_t‖‖S_t‖) clamped to [−1, 1] (null when S_t = 0: step 0)."""
    den = math.sqrt(sq_grad * sq) if sq_grad >= 0 and sq >= 0 else math.nan
    cos = max(-1.0, min(1.0, ip / den)) if den > 0 and math.isfinite(ip) else math.nan
    vals = dict(zip(GRAD_HISTORY_NAMES, (ip, sq, cos)))
    return {k: float(v) if math.isfinite(v) else None for k, v in vals.items()}
