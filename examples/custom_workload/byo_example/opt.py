"""Signum: sign of the momentum (Bernstein et al. 2018, https://arxiv.org/abs/1802.04434).

m ← β·m + (1 − β)·g;  x ← x − lr·(sign(m) + wd·x). Element-wise, so it is correct on ZeRO's flat
partitions: the entry declares every (stage, precision) pair the engine runs.
"""

import torch

from opt_study import ELEMENTWISE, OptimizerEntry


class Signum(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, momentum=0.9, weight_decay=0.0):
        if lr < 0 or not 0.0 <= momentum < 1.0 or weight_decay < 0:
            raise ValueError(f"need lr >= 0, 0 <= momentum < 1, weight_decay >= 0: {lr}, {momentum}, {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("m", torch.zeros_like(p))
                m.mul_(group["momentum"]).add_(p.grad, alpha=1 - group["momentum"])
                p.add_(torch.sign(m) + group["weight_decay"] * p, alpha=-group["lr"])


signum = OptimizerEntry(
    name="signum",
    factory=Signum,
    defaults={"lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0},
    paper="https://arxiv.org/abs/1802.04434",
    space={"lr": {"loguniform": [1e-4, 1e-1]}},
    combos=ELEMENTWISE,
    source="byo_example",
)
