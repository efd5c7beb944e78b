"""Views of this rank's fp32 shard of the parameters and gradients under ZeRO 0-3.

No full-size parameter or gradient vector is materialized: each view is a slice of a tensor the
engine already holds. Which tensor depends on the stage (STACK.md, measured on DeepSpeed 0.19.8;
`_hp_mapping` is semi-private, so pyproject pins DeepSpeed and tests/test_shards_multirank.py
checks every stage against a gathered reference):

- ZeRO-0, fp32: every rank holds the whole (all-reduced) gradient, so work is split by taking rank
  r's contiguous slice [n*r//W, n*(r+1)//W) of each flattened parameter.
- ZeRO-1/2 (and ZeRO-0 with bf16, where DeepSpeed's BF16_Optimizer partitions fp32 masters): the
  fp32 master fragment `p._hp_mapping.hp_fragment` and the reduced gradient fragment
  `get_lp_grad_fragment` (available only between the boundary backward and `step()`).
- ZeRO-3: `safe_get_local_fp32_param` / `safe_get_local_grad` (the gradient is a live buffer that
  step() changes, so callers clone what they keep).
"""
from __future__ import annotations

import torch

EMPTY = torch.empty(0)


class ShardView:
    def __init__(self, engine, zero_stage: int, precision: str, rank: int, world: int):
        self.engine, self.rank, self.world = engine, rank, world
        self.named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        if zero_stage == 3:
            self.mode = "z3"
        elif zero_stage in (1, 2) or precision != "fp32":
            self.mode = "hp"
        else:
            self.mode = "slice"

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.named]

    def _bounds(self, p) -> tuple[int, int]:
        n = p.numel()
        return n * self.rank // self.world, n * (self.rank + 1) // self.world

    def params(self) -> list[torch.Tensor]:
        """This rank's fp32 fragment of every parameter (live views; clone to keep)."""
        if self.mode == "slice":
            return [p.detach().view(-1)[slice(*self._bounds(p))] for _, p in self.named]
        if self.mode == "z3":
            from deepspeed.utils import safe_get_local_fp32_param
            return [safe_get_local_fp32_param(p).view(-1) for _, p in self.named]
        return [p._hp_mapping.get_hp_fragment().view(-1) if p._hp_mapping is not None else EMPTY
                for _, p in self.named]

    def grads(self) -> list[torch.Tensor]:
        """This rank's fp32 fragment of every reduced gradient.

        Valid only after the accumulation-boundary backward and before `engine.step()`.
        """
        if self.mode == "slice":
            return [p.grad.view(-1)[slice(*self._bounds(p))] for _, p in self.named]
        if self.mode == "z3":
            from deepspeed.utils import safe_get_local_grad
            return [safe_get_local_grad(p).view(-1) for _, p in self.named]
        return [self._hp_grad(p) for _, p in self.named]

    @staticmethod
    def _hp_grad(p) -> torch.Tensor:
        m = p._hp_mapping
        if m is None:
            return EMPTY
        g = m.get_lp_grad_fragment(p._index_in_param_group).view(-1)
        if g.numel() == p.numel() and g.numel() != m.lp_fragment_address.numel:
            # BF16_Optimizer keeps a full accumulation buffer on each rank; take our fragment.
            g = g.narrow(0, m.lp_fragment_address.start, m.lp_fragment_address.numel)
        return g.float()

    def clone_params(self) -> list[torch.Tensor]:
        return [t.detach().clone().float() for t in self.params()]

    def clone_grads(self) -> list[torch.Tensor]:
        return [t.detach().clone().float() for t in self.grads()]

    def local_numel(self) -> int:
        return sum(t.numel() for t in self.params())
