"""Views of this rank's fp32 shard of the parameters and gradients under ZeRO 0-3.

No full-size parameter or gradient vector is materialized: each view is a slice of a tensor the
engine already holds. Which tensor depends on the stage (docs/STACK.md §Reading a rank's shard,
measured on DeepSpeed 0.19.8; the private DeepSpeed state is read through
opt_study.measure.deepspeed_state only, pyproject pins DeepSpeed and
tests/multirank/test_multirank.py checks every stage against a gathered reference):

- ZeRO-0, fp32: every rank holds the whole (all-reduced) gradient, so work is split by taking rank
  r's contiguous slice [n*r//W, n*(r+1)//W) of each flattened parameter.
- ZeRO-1/2 (and ZeRO-0 with bf16, where DeepSpeed's BF16_Optimizer partitions fp32 masters): the
  fp32 master fragment `p._hp_mapping.hp_fragment` and the reduced gradient fragment
  `get_lp_grad_fragment` (available only between the boundary backward and `step()`).
- ZeRO-3: `safe_get_local_fp32_param` / `safe_get_local_grad` (the gradient is a live buffer that
  step() changes, so callers clone what they keep).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch

from opt_study import distributed
from opt_study.measure import deepspeed_state as ds

EMPTY = ds.EMPTY
WRITE_BUCKET = 1 << 22  # elements per all-reduce when writing replicated weights (16 MiB fp32)


class FlatShard:
    """One vector of this rank's shard (x_t, g_t, Δ_t, ...) kept in ONE contiguous fp32 buffer.

    ``flat`` holds the fragments back to back in ShardView order and ``parts[i]`` is the view of
    fragment i, so a FlatShard indexes, iterates and has a length like the list of fragments it
    replaces. The measurement sums read ``flat`` in large chunks (sums.flat_sums, with the
    groups' element ranges from sums.group_runs(sizes, ...)) and never concatenate fragments.
    Memory: exactly the fragments' elements, no padding.
    """

    __slots__ = ("flat", "sizes", "parts")

    def __init__(self, flat: torch.Tensor, sizes: Sequence[int]):
        self.sizes = tuple(int(n) for n in sizes)
        if flat.dim() != 1 or flat.numel() != sum(self.sizes):
            raise ValueError(
                f"flat buffer of shape {tuple(flat.shape)} does not hold fragments of {sum(self.sizes)} elements"
            )
        self.flat = flat
        self.parts = list(flat.split(self.sizes))

    def __len__(self) -> int:
        return len(self.parts)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.parts)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.parts[i]


def flatten(frags: Sequence[torch.Tensor]) -> FlatShard:
    """A copy of ``frags`` (any float dtype, any shape) as one fp32 FlatShard on their device:
    one allocation and one copy per fragment, the copy a kept vector needs anyway."""
    sizes = [t.numel() for t in frags]
    device = next((t.device for t in frags if t.numel()), torch.device("cpu"))
    out = FlatShard(torch.empty(sum(sizes), dtype=torch.float32, device=device), sizes)
    with torch.no_grad():
        for dst, src in zip(out.parts, frags):
            if dst.numel():
                dst.copy_(src.detach().reshape(-1))
    return out


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
            return [self._z3_valid(p, ds.z3_local_param(p)) for _, p in self.named]
        return [ds.hp_param_fragment(p) for _, p in self.named]

    def _z3_valid(self, p, part: torch.Tensor) -> torch.Tensor:
        """The real elements of a ZeRO-3 partition: rank r holds [r*P, (r+1)*P) of the flattened
        parameter, P = ceil(n/W); the tail past n is padding whose memory may be recycled from an
        earlier allocation (garbage), so it must never enter a sum."""
        part = part.view(-1)
        valid = max(0, min(ds.z3_numel(p) - self.rank * part.numel(), part.numel()))
        return part[:valid]

    def grads(self) -> list[torch.Tensor]:
        """This rank's fp32 fragment of every reduced gradient.

        Valid only after the accumulation-boundary backward and before `engine.step()`.
        """
        if self.mode == "slice":
            return [p.grad.view(-1)[slice(*self._bounds(p))] for _, p in self.named]
        if self.mode == "z3":
            return [self._z3_valid(p, ds.z3_local_grad(p)) for _, p in self.named]
        return [ds.hp_grad_fragment(p) for _, p in self.named]

    def optim_state(self, key: str) -> list[torch.Tensor] | None:
        """This rank's fp32 fragment of the optimizer state ``key`` (e.g. Adam's ``exp_avg_sq``)
        of every parameter, laid out as ``params()`` (live views); None when the optimizer keeps
        no such state (deepspeed_state reads it: private optimizer state)."""
        if self.mode == "slice":
            full = [ds.slice_optim_state(self.engine, p, key) for _, p in self.named]
            if any(v is None for v in full):
                return None
            return [v[slice(*self._bounds(p))] for v, (_, p) in zip(full, self.named)]
        if self.mode == "z3":
            parts = [ds.z3_local_optim_state(p, key) for _, p in self.named]
            return (
                None
                if any(v is None for v in parts)
                else [self._z3_valid(p, v) for v, (_, p) in zip(parts, self.named)]
            )
        frags = [ds.hp_optim_state_fragment(p, key) for _, p in self.named]
        return None if any(v is None for v in frags) else frags

    def clone_params(self) -> FlatShard:
        """An fp32 copy of ``params()`` in one flat buffer (what the measurer keeps)."""
        return flatten(self.params())

    def clone_grads(self) -> FlatShard:
        """An fp32 copy of ``grads()`` in one flat buffer (same validity window as grads())."""
        return flatten(self.grads())

    def local_numel(self) -> int:
        return sum(t.numel() for t in self.params())

    # ------------------------------------------------------------------ layout and write-back
    def bounds(self) -> list[tuple[int, int]]:
        """[start, stop) of each fragment of ``params()`` within its flattened parameter.

        A rank that holds none of a ZeRO-1/2 parameter has (0, 0). At ZeRO-3 the lp partition is
        padded to ceil(numel / W) elements (deepspeed_state.z3_partition_numel); the fp32
        fragment is not (DeepSpeed 0.19.8), and only its first ``stop - start`` elements are
        read anyway.
        """
        if self.mode == "slice":
            return [self._bounds(p) for _, p in self.named]
        if self.mode == "z3":
            out = []
            for _, p in self.named:
                size = ds.z3_partition_numel(p)  # the (padded) partition size of every rank
                start = min(size * self.rank, ds.z3_numel(p))
                out.append((start, min(start + size, ds.z3_numel(p))))
            return out
        return [ds.hp_fragment_bounds(p) for _, p in self.named]

    def write_params(self, frags: list[torch.Tensor]) -> None:
        """Set the model to the parameter vector whose fragments on this rank are ``frags``.

        Collective: every rank calls it with its own fragments (laid out as ``bounds()``). The
        fp32 master fragments (hp at ZeRO-1/2, the local fp32 partition at ZeRO-3) and the
        weights the forward reads are both written:

        - ZeRO-3: the lp partition (deepspeed_state.z3_write_partition); the forward
          all-gathers it. A parameter that
          is gathered right now (persistent below stage3_param_persistence_threshold, or still
          cached) also gets its full ``p.data`` written, as DeepSpeed's own step does by
          re-gathering persistent parameters.
        - ZeRO-0/1/2: ``p.data`` is replicated, so every rank needs every rank's fragment: each
          rank scatters its fragments into a zero buffer and one SUM all-reduce per bucket of
          WRITE_BUCKET elements yields the whole parameter everywhere (x + 0 is exact).
        """
        bounds = self.bounds()
        if len(frags) != len(self.named):
            raise ValueError(f"need {len(self.named)} fragments, got {len(frags)}")
        for (name, _), (lo, hi), f in zip(self.named, bounds, frags):
            if f.numel() < hi - lo:
                raise ValueError(f"fragment of {name} has {f.numel()} elements, needs {hi - lo}")
        frags = [f.reshape(-1)[: hi - lo] for f, (lo, hi) in zip(frags, bounds)]
        with torch.no_grad():
            if self.mode == "z3":
                for (_, p), f, master in zip(self.named, frags, self.params()):
                    ds.z3_write_partition(p, f)
                    master[: f.numel()].copy_(f)
                held = torch.tensor(
                    [float(ds.z3_is_gathered(p)) for _, p in self.named], dtype=torch.float64, device=self.engine.device
                )
                distributed.all_reduce_max(held)  # every rank must join the same all-reduces
                # host sync: which parameters to write is a Python decision (probe with s != 1 only)
                full = [i for i, h in enumerate(held.tolist()) if h > 0]
            else:
                if self.mode == "hp":
                    for (_, p), f in zip(self.named, frags):
                        ds.write_hp_param_fragment(p, f)
                full = list(range(len(self.named)))
            self._write_replicated(full, frags, bounds)

    def _full_numel(self, p) -> int:
        return ds.z3_numel(p) if self.mode == "z3" else p.numel()

    def _write_replicated(self, idx: list[int], frags, bounds) -> None:
        """Fill the whole ``p.data`` of parameters ``idx`` on every rank (see write_params)."""
        buckets: list[list[int]] = []
        size = 0
        for i in idx:
            n = self._full_numel(self.named[i][1])
            if not buckets or (size + n > WRITE_BUCKET and buckets[-1]):
                buckets.append([])
                size = 0
            buckets[-1].append(i)
            size += n
        for bucket in buckets:
            sizes = [self._full_numel(self.named[j][1]) for j in bucket]
            offsets = [0, *itertools.accumulate(sizes)][:-1]
            buf = torch.zeros(sum(sizes), dtype=torch.float32, device=self.engine.device)
            for j, o in zip(bucket, offsets):
                lo, hi = bounds[j]
                buf[o + lo : o + hi].copy_(frags[j])
            distributed.all_reduce_sum(buf)
            for j, o, n in zip(bucket, offsets, sizes):
                p = self.named[j][1]
                if p.data.numel() == n:  # ZeRO-3: only where this rank holds the whole
                    p.data.view(-1).copy_(buf[o : o + n])


def group_names(param_names: list[str]) -> tuple[list[str], list[int]]:
    """Parameter groups for per-group sums: the module path truncated to two components.

    e.g. 'blocks.0.attn.qkv.weight' -> 'blocks.0', 'embed.weight' -> 'embed'. Stable across ranks
    because every rank sees the same module names.
    """
    keys = []
    for n in param_names:
        parts = n.split(".")[:-1] or [n]
        keys.append(".".join(parts[:2]) if parts[0] and len(parts) > 1 and parts[1].isdigit() else parts[0])
    names = sorted(set(keys))
    return names, [names.index(k) for k in keys]
