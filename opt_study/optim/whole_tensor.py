"""Whole-tensor rules under ZeRO 1-3: each parameter tensor is owned by one rank, which gathers
that tensor's gradient and weights, runs the library's rule on the whole tensor, and sends the
new weights back into every rank's partition.

The route of Moonlight's distributed Muon (Liu et al. 2025, "Muon is Scalable for LLM Training",
https://arxiv.org/abs/2502.16982, Sec. 2.3 and Algorithm 1) and of Dion (Ahn et al. 2025,
https://arxiv.org/abs/2504.05295, Sec. 4): ZeRO's flat fp32 partitions cut tensors at arbitrary
offsets, so a matrix or layer-wise rule (Muon's orthogonalisation, LAMB's trust ratio) cannot
run on them, but the rule's STATE can still be sharded if it is sharded by tensor instead of by
offset. Moonlight gathers every matrix on every rank and keeps the partitioned momentum; here,
as in Dion, each tensor has one owner (tensors assigned largest first to the rank with the
fewest bytes so far), so each tensor's rule and state live on one rank, and the rule's code is
the library's own, run unchanged on the owner's whole tensors.

Why not DeepSpeed's native Muon (0.19.8 `MuonWithAuxAdam`, ZeRO 1-3): it computes the update
inside ZeRO's gradient path and writes it into the partitioned gradient buffer, which the step
measurement reads as the gradient; it uses its own Newton-Schulz ("gram" method), not the rule
the ZeRO-0 runs use; and its 2026 defects (deepspeedai/DeepSpeed#8438, #8441, #8443/#8600) show
the path moving under it. This route works for any per-tensor rule in the registry.

One step (inside DeepSpeed's `step()`, after its reduction, unscaling and clipping; collectives
in opt_study.distributed):

1. every rank sends, to each tensor's owner, its fragment of that tensor's reduced gradient and
   of its fp32 master weights (one all-to-all; only fragments travel, no zero padding);
2. the owner places the fragments at their offsets: the whole gradient and weights, bit for bit
   the values ZeRO holds (no arithmetic on them);
3. the owner runs the rule (`entry.factory` over the tensors it owns, their real shapes);
4. the owner sends every rank its fragment of the new weights (one all-to-all), which land in
   that rank's fp32 master partition; DeepSpeed then copies masters to the model weights as for
   any client optimizer.

Where a fragment lives is private DeepSpeed state: the engine set-up (opt_study.trial) attaches
a function returning, per parameter, this rank's live fp32 master fragment and its [start, stop)
within the flattened tensor (opt_study.measure.shards.ShardView, over
opt_study.measure.deepspeed_state); this module only finds those views in the flat tensors
DeepSpeed hands `step()`.

Memory per rank: the rule's state for the tensors it owns (about 1/W of the model's when the
tensors balance); during `step()` only, its owned tensors' weights and gradients and its
fragments' send buffers.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from opt_study import distributed

# (live fp32 master fragment, start, stop) per parameter, in the order the wrapper was built with
Fragments = Callable[[], Sequence[tuple[torch.Tensor, int, int]]]


def assign_owners(sizes: Sequence[int], world: int) -> list[int]:
    """The owner rank of each tensor: largest first, each to the rank with the fewest bytes so far
    (ties: the lower rank, then the earlier tensor), so every rank computes the same assignment."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


class WholeTensorOptimizer(torch.optim.Optimizer):
    """The client optimizer DeepSpeed steps at ZeRO 1-3 for a rule that needs whole tensors.

    DeepSpeed sees one param group (the model's trainable tensors, later its flat fp32
    partitions) whose `lr` the loop's schedule sets; the schedule's factor, lr / initial_lr, is
    applied to every group of the owner's rule (Muon's AdamW group keeps its own base lr, as at
    ZeRO-0). `attach(fragments)` must be called once the engine exists, before the first step.
    """

    sees_whole_tensors = True  # optim.check_model_shapes: the rule never sees a partition

    def __init__(self, entry, params, hparams: Mapping[str, Any]):
        params = [p for p in params if p.requires_grad]
        super().__init__(params, {"lr": float(hparams["lr"])})
        self.param_groups[0]["initial_lr"] = self.param_groups[0]["lr"]
        self.entry = entry
        self.shapes = [tuple(p.shape) for p in params]
        self.numels = [p.numel() for p in params]
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.owner = assign_owners([n * 4 for n in self.numels], self.world)  # fp32 bytes
        self.mine = [i for i, r in enumerate(self.owner) if r == self.rank]
        self.owned_by = [[i for i, r in enumerate(self.owner) if r == q] for q in range(self.world)]
        # the owner's whole tensors, fp32: the rule's state is keyed by them, and the factory sees
        # their real shapes (Muon's groups go by ndim); between steps they hold no memory
        self.full = {i: params[i].detach().float().clone() for i in self.mine}
        self.rule = entry.factory([self.full[i] for i in self.mine], **hparams) if self.mine else None
        self._release()
        for g in self.rule.param_groups if self.rule is not None else ():
            g["initial_lr"] = g["lr"]
        self._fragments: Fragments | None = None
        self._layout: list[list[tuple[int, int]]] | None = None  # [rank][tensor] -> (start, stop)

    def attach(self, fragments: Fragments) -> None:
        self._fragments = fragments

    # ------------------------------------------------------------------------------- layout
    def _local(self) -> list[tuple[torch.Tensor, torch.Tensor, int, int]]:
        """Per tensor: this rank's master fragment, its gradient fragment, start, stop."""
        if self._fragments is None:
            raise RuntimeError("WholeTensorOptimizer.attach(fragments) was not called after the engine was built")
        held = [p for g in self.param_groups for p in g["params"]]
        frags = list(self._fragments())
        if len(frags) != len(self.numels):
            raise RuntimeError(f"{len(frags)} fragments for {len(self.numels)} tensors")
        out = []
        for view, lo, hi in frags:
            n = hi - lo
            view = view.view(-1)[:n]
            grad = view
            if n:
                flat = next((f for f in held if _same_storage(f, view)), None)
                if flat is None or flat.grad is None:
                    raise RuntimeError(
                        f"{self.entry.name}: a tensor's fp32 fragment is not among the flat tensors this "
                        "step() holds (a ZeRO-3 sub_group_size that splits the model?)"
                    )
                at = view.storage_offset() - flat.storage_offset()
                grad = flat.grad.view(-1).narrow(0, at, n)
            out.append((view, grad, lo, hi))
        bounds = [(lo, hi) for _, _, lo, hi in out]
        if self._layout is None:
            self._layout = distributed.all_gather_object(bounds)  # once: ints only
        elif self._layout[self.rank] != bounds:
            raise RuntimeError(f"{self.entry.name}: the partition layout changed between steps")
        return out

    # --------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("WholeTensorOptimizer.step takes no closure")
        local = self._local()
        layout, W = self._layout, self.world
        dev = self.param_groups[0]["params"][0].device  # NCCL moves device tensors only

        # 1. to each owner: my gradient fragments of its tensors, then my weight fragments
        send_parts, send_splits = [], []
        for q in range(W):
            idx = self.owned_by[q]
            send_parts += [local[i][1].float() for i in idx] + [local[i][0].float() for i in idx]
            send_splits.append(2 * sum(local[i][3] - local[i][2] for i in idx))
        recv_splits = [2 * sum(hi - lo for lo, hi in (layout[q][i] for i in self.mine)) for q in range(W)]
        send = torch.cat(send_parts) if send_parts else torch.empty(0, device=dev)
        recv = torch.empty(sum(recv_splits), dtype=torch.float32, device=dev)
        distributed.all_to_all(recv, send, recv_splits, send_splits)

        # 2. the owner's whole tensors (memory only until this step returns)
        grads = {i: torch.empty(self.numels[i], dtype=torch.float32, device=dev) for i in self.mine}
        for i in self.mine:
            self.full[i].data = torch.empty(self.shapes[i], dtype=torch.float32, device=dev)
        at = 0
        for q in range(W):
            for whole in (grads, {i: self.full[i].view(-1) for i in self.mine}):
                for i in self.mine:
                    lo, hi = layout[q][i]
                    whole[i][lo:hi].copy_(recv[at : at + hi - lo])
                    at += hi - lo

        # 3. the rule, at the schedule's factor
        if self.rule is not None:
            g0 = self.param_groups[0]
            factor = g0["lr"] / g0["initial_lr"] if g0["initial_lr"] else 1.0
            for g in self.rule.param_groups:
                g["lr"] = g["initial_lr"] * factor
            for i in self.mine:
                self.full[i].grad = grads[i].view(self.shapes[i])
            self.rule.step()
            for i in self.mine:
                self.full[i].grad = None

        # 4. back to every rank: its fragments of the new weights
        back_parts = [self.full[i].view(-1)[layout[q][i][0] : layout[q][i][1]] for q in range(W) for i in self.mine]
        back = torch.cat(back_parts) if back_parts else torch.empty(0, device=dev)
        self._release()
        mine_back = torch.empty(sum(s // 2 for s in send_splits), dtype=torch.float32, device=dev)
        distributed.all_to_all(mine_back, back, [s // 2 for s in send_splits], [s // 2 for s in recv_splits])
        at = 0
        for q in range(W):
            for i in self.owned_by[q]:
                view, _, lo, hi = local[i]
                view.copy_(mine_back[at : at + hi - lo])
                at += hi - lo
        return None

    def _release(self) -> None:
        """Drop the owner's whole tensors' memory between steps (the objects, and so the rule's
        state keyed by them, stay): a rank keeps its rule state, not a second copy of the weights."""
        for t in self.full.values():
            t.data = t.new_empty(0)

    # --------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """torch's state dict plus the owner's rule state (restored on the same world size)."""
        sd = super().state_dict()
        sd["whole_tensor"] = {
            "world": self.world,
            "owner": list(self.owner),
            "rule": self.rule.state_dict() if self.rule is not None else None,
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        wt = state_dict.pop("whole_tensor", None)
        if wt is None:
            raise RuntimeError(f"{self.entry.name}: the checkpoint holds no whole-tensor rule state")
        if wt["world"] != self.world or list(wt["owner"]) != self.owner:
            raise RuntimeError(
                f"{self.entry.name}: the checkpoint was written by {wt['world']} ranks with another tensor "
                f"assignment; resume on the same world size"
            )
        super().load_state_dict(state_dict)
        if self.rule is not None:
            self.rule.load_state_dict(wt["rule"])


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
