"""Local partial sums over this rank's shard, packed for ONE all-reduce (METRICS.md, "Raw sums").

Every raw sum of METRICS.md is a sum over parameter elements, so the global value is the SUM over
ranks of the sums over each rank's shard; per parameter group it is the sum over the group's
fragments. A rank computes ``local_sums`` over its fragments, ``pack`` appends the loss terms, one
``all_reduce(SUM)`` of the packed float64 vector yields the global values on every rank and
``unpack`` splits them again. A sum whose inputs are missing on a fragment (None) is NaN; NaN
survives the SUM all-reduce, so it is NaN (null downstream) on every rank.

Precision and cost. Every dot product is an fp32 BLAS dot over chunks of CHUNK elements whose
results are accumulated in float64 (``_accumulate``). Error bound: a chunk's dot ŝ of C terms
satisfies |ŝ − s| ≤ γ_C·Σ|a_i b_i| ≤ γ_C·‖a‖‖b‖ (γ_C = C·u/(1 − C·u), u = 2^-24; Higham,
"Accuracy and Stability of Numerical Algorithms", 2nd ed., §3.1), and the float64 sum over chunks
adds nothing of that order, so the total's error has exactly the scale-aware form of METRICS.md's
tolerances (1e-6·‖a‖‖b‖) and does not grow with the shard size, only with C. γ_C is a worst
case (≈ 4e-3 at C = 2^16); the BLAS kernel's many SIMD accumulators and the random signs of
rounding errors make the real error ~√(C/k)·u for k accumulators (Higham & Mary 2019,
https://doi.org/10.1137/18M1226312). Measured here (MKL, AVX-512): ≤ 3u = 1.8e-7 relative per
chunk for 4k-100k elements, ≤ 1.1e-7·‖a‖‖b‖ over 10M elements against full float64.
Cost on a 2-core Xeon, 10M elements in 100 fragments: 31 ms, against 16 ms for one plain pass
(``t.sum()``) over the same 7 vectors and 56-95 ms for float64 arithmetic (chunks upcast, or
whole fragments upcast). Differences (x − x_0, g⁺ − g) are formed per chunk in fp32 before the
dot, never as ‖a‖² − 2⟨a,b⟩ + ‖b‖², which cancels catastrophically when g⁺ ≈ g.
"""
from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

SUM_NAMES: tuple[str, ...] = (
    "sq_grad", "sq_grad_probe", "sq_update", "sq_param", "sq_dist_init",
    "ip_grad_update", "ip_probe_update", "sq_grad_diff", "ip_param_update", "ip_param_grad",
    "ip_update_prev", "ip_grad_prev",
    # ‖Δ_{t−1}‖², ‖g_{t−1}‖²: the denominators of cos_update_prev and cos_grad_prev. The step
    # before a measured step is usually not measured, so they must travel with this step's sums.
    "sq_update_prev", "sq_grad_prev",
)
# Each rank contributes its share of the global mean loss (ℓ_r / N for N equal ranks), so the
# SUM all-reduce yields the global mean directly. `stop_votes` rides the same reduction: rank 0
# puts 1 when the study asked the trial to stop (opt_study.trial), so every rank learns it on the
# same step without a collective of its own.
#
# `sq_grad_small` is the mean over all N·A micro-batches of ‖g_{r,m}‖², each micro-batch's gradient
# read before DeepSpeed reduces it (the small-batch term of the gradient noise scale; NaN when off).
LOSS_NAMES: tuple[str, ...] = ("loss", "loss_probe", "stop_votes", "sq_grad_small")

CHUNK = 1 << 16  # 64k elements: 7 fp32 operands x 256 KiB stay in a 2 MiB L2 while 14 dots run

# Operands of the dot products: Fragment fields, plus two differences formed per chunk.
_DIFFS: dict[str, tuple[str, str]] = {"x_minus_x0": ("x", "x0"), "gp_minus_g": ("g_plus", "g")}
_TERMS: dict[str, tuple[str, str]] = {
    "sq_grad": ("g", "g"),
    "sq_grad_probe": ("g_plus", "g_plus"),
    "sq_update": ("delta", "delta"),
    "sq_param": ("x", "x"),
    "sq_dist_init": ("x_minus_x0", "x_minus_x0"),
    "ip_grad_update": ("g", "delta"),
    "ip_probe_update": ("g_plus", "delta"),
    "sq_grad_diff": ("gp_minus_g", "gp_minus_g"),
    "ip_param_update": ("x", "delta"),
    "ip_param_grad": ("x", "g"),
    "ip_update_prev": ("delta", "delta_prev"),
    "ip_grad_prev": ("g", "g_prev"),
    "sq_update_prev": ("delta_prev", "delta_prev"),
    "sq_grad_prev": ("g_prev", "g_prev"),
}
assert tuple(_TERMS) == SUM_NAMES


@dataclass(frozen=True)
class Fragment:
    """This rank's slice of ONE parameter (or one piece of a flat partition), all 1-D, same length.

    ``x`` is required; any other field may be None (its sums are then NaN). Values are fp32
    master values; float64 inputs are summed in float64, lower precisions are upcast to fp32.
    """
    group: int                      # parameter-group index in [0, n_groups)
    x: Tensor                       # x_t
    g: Tensor | None = None         # g_t
    delta: Tensor | None = None     # Δ_t = x_{t+1} − x_t
    g_plus: Tensor | None = None    # g⁺_t, the probe gradient
    x0: Tensor | None = None        # x_0
    delta_prev: Tensor | None = None  # Δ_{t−1}
    g_prev: Tensor | None = None      # g_{t−1}

    def __post_init__(self) -> None:
        if self.group < 0:
            raise ValueError(f"Fragment.group must be >= 0, got {self.group}")
        n = self.x.numel()
        for name, t in self.tensors().items():
            if t.dim() != 1 or t.numel() != n:
                raise ValueError(f"Fragment.{name} must be 1-D with {n} elements (like x), "
                                 f"got shape {tuple(t.shape)}")
            if not t.is_floating_point():
                raise ValueError(f"Fragment.{name} must be a floating-point tensor, got {t.dtype}")

    def tensors(self) -> dict[str, Tensor]:
        """The fields that are present, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "group" and getattr(self, f.name) is not None}


def local_sums(frags: Sequence[Fragment], n_groups: int, chunk: int = CHUNK,
               only: Collection[str] | None = None) -> Tensor:
    """This rank's partial sums: float64 [len(SUM_NAMES), n_groups], on the fragments' device.

    Entry [i, j] is SUM_NAMES[i] summed over the fragments of group j (0 if this rank holds none
    of group j; NaN if a fragment of group j lacks an input of that sum). ``only`` restricts the
    work to the named sums (e.g. the every-step norms); the others are NaN.
    """
    wanted = set(SUM_NAMES if only is None else only)
    if not wanted <= set(SUM_NAMES):
        raise ValueError(f"unknown sum names {sorted(wanted - set(SUM_NAMES))}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    device = frags[0].x.device if frags else torch.device("cpu")
    out = torch.zeros(len(SUM_NAMES), n_groups, dtype=torch.float64, device=device)
    out[[i for i, n in enumerate(SUM_NAMES) if n not in wanted]] = float("nan")
    # Fragments that share a group and a presence pattern are summed together, so that small
    # ones (biases, norms) can be concatenated into full chunks instead of costing ~15 calls each.
    buckets: dict[tuple[int, tuple[str, ...]], list[Fragment]] = {}
    for f in frags:
        if f.group >= n_groups:
            raise ValueError(f"Fragment.group {f.group} out of range for n_groups={n_groups}")
        buckets.setdefault((f.group, tuple(f.tensors())), []).append(f)
    for (group, present), members in buckets.items():
        avail = set(present) | {d for d, (a, b) in _DIFFS.items() if a in present and b in present}
        rows = [i for i, n in enumerate(SUM_NAMES) if n in wanted]
        computable = [i for i in rows if set(_TERMS[SUM_NAMES[i]]) <= avail]
        missing = [i for i in rows if i not in computable]
        out[missing, group] = float("nan")
        if computable:
            terms = [_TERMS[SUM_NAMES[i]] for i in computable]
            out[computable, group] += _accumulate(_blocks(members, present, chunk), terms, device)
    return out


def _blocks(members: Sequence[Fragment], present: tuple[str, ...], chunk: int
            ) -> Iterator[dict[str, Tensor]]:
    """Operand dicts of <= ~chunk elements: big fragments sliced, small ones concatenated."""
    pending: list[Fragment] = []
    size = 0
    for f in members:
        n = f.x.numel()
        if n >= chunk:
            for lo in range(0, n, chunk):
                yield {k: getattr(f, k)[lo:lo + chunk] for k in present}
            continue
        pending.append(f)
        size += n
        if size >= chunk:
            yield {k: torch.cat([getattr(p, k) for p in pending]) for k in present}
            pending, size = [], 0
    if pending:
        yield {k: torch.cat([getattr(p, k) for p in pending]) for k in present}


def _accumulate(blocks: Iterator[dict[str, Tensor]], terms: list[tuple[str, str]],
                device: torch.device) -> Tensor:
    """Σ over blocks of each term's dot product: per-block dots in the working precision,
    accumulated in float64 (the error argument is in the module docstring)."""
    per_block = []
    for ops in blocks:
        work = torch.float64 if any(t.dtype == torch.float64 for t in ops.values()) else torch.float32
        ops = {k: t.to(work) for k, t in ops.items()}  # a no-op for fp32 master values
        for name, (a, b) in _DIFFS.items():
            if a in ops and b in ops:
                ops[name] = ops[a] - ops[b]  # a chunk-sized temporary, never a full-size one
        per_block.append(torch.stack([torch.dot(ops[a], ops[b]) for a, b in terms]).double())
    if not per_block:  # only empty fragments
        return torch.zeros(len(terms), dtype=torch.float64, device=device)
    return torch.stack(per_block).sum(0)


def pack(sums: Tensor, losses: Tensor) -> Tensor:
    """One float64 vector for ``all_reduce(SUM)``: the sums row-major, then LOSS_NAMES' terms.

    ``losses`` holds this rank's share of each loss (ℓ_r/N for N ranks; NaN when absent).
    """
    if sums.dim() != 2 or sums.shape[0] != len(SUM_NAMES):
        raise ValueError(f"sums must be [{len(SUM_NAMES)}, n_groups], got {tuple(sums.shape)}")
    losses = torch.as_tensor(losses, dtype=torch.float64).reshape(-1).to(sums.device)
    if losses.numel() != len(LOSS_NAMES):
        raise ValueError(f"losses must hold {len(LOSS_NAMES)} values {LOSS_NAMES}, "
                         f"got {losses.numel()}")
    return torch.cat([sums.to(torch.float64).reshape(-1), losses])


def unpack(packed: Tensor, n_groups: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Inverse of ``pack`` (after the all-reduce): per-group sums ({name: float64 [n_groups]})
    and the global losses ({name: float})."""
    arr = packed.detach().to("cpu", torch.float64).numpy()
    n_sums = len(SUM_NAMES) * n_groups
    if arr.shape != (n_sums + len(LOSS_NAMES),):
        raise ValueError(f"packed vector has {arr.size} values; expected "
                         f"{n_sums + len(LOSS_NAMES)} for n_groups={n_groups}")
    per_group = {name: arr[i * n_groups:(i + 1) * n_groups].copy()
                 for i, name in enumerate(SUM_NAMES)}
    losses = {name: float(v) for name, v in zip(LOSS_NAMES, arr[n_sums:])}
    return per_group, losses


def totals(per_group: dict[str, np.ndarray]) -> dict[str, float]:
    """Sums over groups (NaN if any group is NaN)."""
    return {name: float(np.sum(v)) for name, v in per_group.items()}
