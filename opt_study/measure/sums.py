"""Local partial sums over this rank's shard, packed for ONE all-reduce (docs/METRICS.md §Raw sums).

Every raw sum of docs/METRICS.md is a sum over parameter elements, so the global value is the SUM over
ranks of the sums over each rank's shard; per parameter group it is the sum over the group's
fragments. A rank computes its partial sums (``flat_sums`` over the flat buffers StepMeasurer
keeps, or ``local_sums`` over one tensor per fragment), ``pack`` appends the loss terms, one
``all_reduce(SUM)`` of the packed float64 vector yields the global values on every rank and
``unpack`` splits them again. A sum whose inputs are missing on a fragment (None) is NaN; NaN
survives the SUM all-reduce, so it is NaN (null downstream) on every rank.

Precision and cost. Every dot product is an fp32 BLAS dot over chunks of CHUNK elements whose
results are accumulated in float64 (``_accumulate``). Error bound: a chunk's dot ŝ of C terms
satisfies |ŝ − s| ≤ γ_C·Σ|a_i b_i| ≤ γ_C·‖a‖‖b‖ (γ_C = C·u/(1 − C·u), u = 2^-24; Higham,
"Accuracy and Stability of Numerical Algorithms", 2nd ed., §3.1), and the float64 sum over chunks
adds nothing of that order, so the total's error has exactly the scale-aware form of docs/METRICS.md's
tolerances (§Correctness contract: 1e-6·‖a‖‖b‖) and does not grow with the shard size, only with C. γ_C is a worst
case (≈ 4e-3 at C = 2^16); the BLAS kernel's many SIMD accumulators and the random signs of
rounding errors make the real error ~√(C/k)·u for k accumulators (Higham & Mary 2019,
https://doi.org/10.1137/18M1226312). Measured here (MKL, AVX-512): ≤ 3u = 1.8e-7 relative per
chunk for 4k-100k elements, ≤ 1.1e-7·‖a‖‖b‖ over 10M elements against full float64.
Differences (x − x_0, g⁺ − g) are formed per chunk in fp32 before the dot, never as
‖a‖² − 2⟨a,b⟩ + ‖b‖², which cancels catastrophically when g⁺ ≈ g.

Cost. StepMeasurer keeps every vector in ONE flat fp32 buffer per rank (shards.FlatShard, filled
by the copy that keeping it needs anyway). On CPU ``flat_sums`` hands the buffers to the fused
kernel (fused_sums.py): one pass over each group's element range, every sum updated from
registers, within ~1.2x of one pass over the bytes (benchmarks/bench_sums.py, RESULTS.md §3); its
fp32 lanes over blocks of 256 elements satisfy the bound above with C = 32. Elsewhere (GPU,
float64, strided views, no compiler) ``flat_sums_torch`` runs one batched dot per sum and
group run over the run's chunks (a few dozen launches per step, whatever the shard's size).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from opt_study.measure import fused_sums as _fused

# The names live in names.py (the schema and the fused kernel's layout check read them there);
# the checks and the row plan shared with fused_sums.py in sum_layout.py. Re-exported here.
from opt_study.measure.names import LOSS_NAMES as LOSS_NAMES
from opt_study.measure.names import SUM_ABS as _ABS
from opt_study.measure.names import SUM_DIFFS as _DIFFS
from opt_study.measure.names import SUM_NAMES as SUM_NAMES
from opt_study.measure.names import TENSOR_SUMS as TENSOR_SUMS
from opt_study.measure.names import VECTOR_NAMES as VECTOR_NAMES
from opt_study.measure.sum_layout import CHUNK as CHUNK
from opt_study.measure.sum_layout import check_flat as check_flat
from opt_study.measure.sum_layout import empty_out as _empty_out
from opt_study.measure.sum_layout import plan as _plan
from opt_study.measure.sum_layout import wanted_sums as _wanted


@dataclass(frozen=True)
class Fragment:
    """This rank's slice of ONE parameter (or one piece of a flat partition), all 1-D, same length.

    ``x`` is required; any other field may be None (its sums are then NaN). Values are fp32
    master values; float64 inputs are summed in float64, lower precisions are upcast to fp32.
    """

    group: int  # parameter-group index in [0, n_groups)
    x: Tensor  # x_t
    g: Tensor | None = None  # g_t
    delta: Tensor | None = None  # Δ_t = x_{t+1} − x_t
    g_plus: Tensor | None = None  # g⁺_t, the probe gradient
    x0: Tensor | None = None  # x_0
    delta_prev: Tensor | None = None  # Δ_{t−1}
    g_prev: Tensor | None = None  # g_{t−1}

    def __post_init__(self) -> None:
        if self.group < 0:
            raise ValueError(f"Fragment.group must be >= 0, got {self.group}")
        n = self.x.numel()
        for name, t in self.tensors().items():
            if t.dim() != 1 or t.numel() != n:
                raise ValueError(f"Fragment.{name} must be 1-D with {n} elements (like x), got shape {tuple(t.shape)}")
            if not t.is_floating_point():
                raise ValueError(f"Fragment.{name} must be a floating-point tensor, got {t.dtype}")

    def tensors(self) -> dict[str, Tensor]:
        """The fields that are present, by name."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "group" and getattr(self, f.name) is not None
        }


# The vectors a sum can read (names.VECTOR_NAMES) are Fragment's fields, in its order.
assert VECTOR_NAMES == tuple(f.name for f in fields(Fragment) if f.name != "group")


def local_sums(
    frags: Sequence[Fragment], n_groups: int, chunk: int = CHUNK, only: Collection[str] | None = None
) -> Tensor:
    """This rank's partial sums: float64 [len(SUM_NAMES), n_groups], on the fragments' device.

    Entry [i, j] is SUM_NAMES[i] summed over the fragments of group j (0 if this rank holds none
    of group j; NaN if a fragment of group j lacks an input of that sum). ``only`` restricts the
    work to the named sums (e.g. the every-step norms); the others are NaN.

    For fragments held one tensor each (replay, tests). The step hook keeps every vector in ONE
    flat buffer and calls ``flat_sums``, which needs no concatenation.
    """
    wanted = _wanted(only, chunk)
    device = frags[0].x.device if frags else torch.device("cpu")
    out = _empty_out(wanted, n_groups, device)
    # Fragments that share a group and a presence pattern are summed together, so that small
    # ones (biases, norms) can be concatenated into full chunks instead of costing ~15 calls each.
    buckets: dict[tuple[int, tuple[str, ...]], list[Fragment]] = {}
    for f in frags:
        if f.group >= n_groups:
            raise ValueError(f"Fragment.group {f.group} out of range for n_groups={n_groups}")
        buckets.setdefault((f.group, tuple(f.tensors())), []).append(f)
    for (group, present), members in buckets.items():
        computable, missing, terms = _plan(wanted, present)
        out[missing, group] = float("nan")
        if computable:
            blocks = _blocks(members, present, chunk)
            out[computable, group] += _accumulate(blocks, terms, device).sum(0)
    return out


def flat_sums(
    vectors: Mapping[str, Tensor | None],
    runs: Sequence[tuple[int, int, int]],
    n_groups: int,
    chunk: int = CHUNK,
    only: Collection[str] | None = None,
) -> Tensor:
    """``local_sums`` over flat buffers: the same float64 [len(SUM_NAMES), n_groups] result.

    ``vectors`` maps Fragment field names (x, g, delta, g_plus, x0, delta_prev, g_prev) to 1-D
    tensors of one length, each holding this rank's whole shard of that vector in one layout
    (shards.FlatShard); a missing or None vector makes its sums NaN, as in ``local_sums``.
    ``runs`` lists (group, start, stop): elements [start, stop) of every vector belong to that
    group (``group_runs``); elements in no run are not summed.

    CPU fp32 contiguous vectors go to the fused one-pass kernel (fused_sums.py) when it is built
    and OPT_STUDY_FUSED_SUMS is not "0"; everything else (GPU, float64, strided views) takes
    ``flat_sums_torch``, which cuts each run into near-equal chunks of at most ``chunk`` elements
    (plain slices, no copy). Both agree within the error bounds of the module docstring.
    """
    present, _, _ = check_flat(vectors, runs, n_groups, chunk, only)
    if _use_fused(present):
        return _fused.fused_sums(present, runs, n_groups, chunk, only)
    return flat_sums_torch(present, runs, n_groups, chunk, only)


def flat_sums_torch(
    vectors: Mapping[str, Tensor | None],
    runs: Sequence[tuple[int, int, int]],
    n_groups: int,
    chunk: int = CHUNK,
    only: Collection[str] | None = None,
) -> Tensor:
    """``flat_sums`` on its torch path (any device and float dtype): per run and sum, ONE batched
    dot over the run's chunks of ``chunk`` elements (``torch.bmm`` of [k, 1, C] by [k, C, 1]) plus
    one dot for the remainder, in the working precision; the chunks' results summed in float64.
    A step's launches grow with runs × sums, not with the shard's size (issue 16: one torch.dot
    per 64k-element chunk made ~5.7k launches per GPT-2 step); tests/unit/test_sum_launches.py
    counts them through the torch profiler. Differences are formed once over the whole vector
    (one shard-sized buffer each, where the CPU kernel needs none)."""
    present, _, wanted = check_flat(vectors, runs, n_groups, chunk, only)
    device = present["x"].device
    out = _empty_out(wanted, n_groups, device)
    f64 = any(t.dtype == torch.float64 for t in present.values())
    work = torch.float64 if f64 else torch.float32
    names = tuple(k for k in VECTOR_NAMES if k in present)
    computable, missing, terms = _plan(wanted, names)  # one presence pattern for every group
    held = sorted({g for g, _, _ in runs})
    if missing and held:
        out[torch.tensor(missing)[:, None], torch.tensor(held)[None, :]] = float("nan")
    if not computable or not any(stop > start for _, start, stop in runs):
        return out
    chunk = min(chunk, BMM_ROW)
    ops = {k: present[k] if present[k].dtype == work else present[k].to(work) for k in names}
    for d, (a, b) in _DIFFS.items():
        if any(d in t for t in terms):
            ops[d] = ops[a] - ops[b]  # fp32 differences before the dot, never via ‖a‖² − 2⟨a,b⟩ + ‖b‖²
    for m, v in _ABS.items():
        if any(m in t for t in terms):
            ops[m] = ops[v].abs()  # exact: |v_i| (the floor's weight-rounding sums)
    per_group = torch.zeros(n_groups, len(terms), dtype=torch.float64, device=device)
    for g, start, stop in runs:
        if stop > start:
            per_group[g] += _run_dots(ops, terms, start, stop, chunk)
    out[computable] += per_group.T
    return out


# A batched dot's row: a row's fp32 dot is accumulated in one sequence by the CPU's bmm (its
# error grows like the row's length: 8e-6 relative at 64k rows against 1e-7 for BLAS sdot), so
# rows stay short; their count costs no launches, only a float64 sum of k values.
BMM_ROW = 1024


def _run_dots(ops: Mapping[str, Tensor], terms: list[tuple[str, str]], start: int, stop: int, chunk: int) -> Tensor:
    """float64 [terms]: each term's dot over elements [start, stop), as k full chunks of ``chunk``
    (one bmm per term; each chunk's dot in the working precision, the error bound of the module
    docstring with C = chunk) and a remainder (one dot per term), summed in float64."""
    k = (stop - start) // chunk
    bulk = start + k * chunk
    parts = []
    if k:
        rows = [
            torch.bmm(ops[a][start:bulk].view(k, 1, chunk), ops[b][start:bulk].view(k, chunk, 1)).view(k)
            for a, b in terms
        ]
        parts.append(torch.stack(rows).to(torch.float64).sum(dim=1))
    if bulk < stop:
        parts.append(torch.stack([torch.dot(ops[a][bulk:stop], ops[b][bulk:stop]) for a, b in terms]).to(torch.float64))
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def _use_fused(present: Mapping[str, Tensor]) -> bool:
    """Whether flat_sums hands these vectors to the fused one-pass kernel (fused_sums.py): CPU
    fp32 contiguous vectors, the kernel built, and OPT_STUDY_FUSED_SUMS not "0"."""
    return _fused.enabled() and _fused.supports(present) and _fused.available()


def group_runs(sizes: Sequence[int], group_of: Sequence[int]) -> list[tuple[int, int, int]]:
    """(group, start, stop) of each maximal run of consecutive fragments of one group, for
    fragments of ``sizes`` elements laid back to back in one flat buffer (``flat_sums``' runs).
    Empty fragments (a ZeRO-1/2 rank holding none of a parameter) join any run."""
    if len(sizes) != len(group_of):
        raise ValueError(f"{len(sizes)} sizes but {len(group_of)} groups")
    runs: list[list[int]] = []
    pos = 0
    for n, grp in zip(sizes, group_of):
        if n:
            if runs and runs[-1][0] == grp and runs[-1][2] == pos:
                runs[-1][2] += n
            else:
                runs.append([grp, pos, pos + n])
        pos += n
    return [tuple(r) for r in runs]


def tensor_sums(vectors: Mapping[str, Tensor | None], sizes: Sequence[int], chunk: int = CHUNK) -> Tensor:
    """Per parameter TENSOR (not group): float64 [len(TENSOR_SUMS), P] of this rank's partial
    TENSOR_SUMS, P = len(sizes) fragments laid back to back in the flat ``vectors`` (a rank
    holding none of tensor i contributes 0). The same ``flat_sums`` (fused kernel or torch) with
    one run per tensor; a second pass over g, g⁺ and Δ on measured steps (docs/METRICS.md
    §Raw sums)."""
    runs = group_runs(sizes, range(len(sizes)))
    out = flat_sums(vectors, runs, len(sizes), chunk, only=TENSOR_SUMS)
    return out[[SUM_NAMES.index(n) for n in TENSOR_SUMS]]


def _blocks(members: Sequence[Fragment], present: tuple[str, ...], chunk: int) -> Iterator[dict[str, Tensor]]:
    """Operand dicts of <= ~chunk elements: big fragments sliced, small ones concatenated."""
    pending: list[Fragment] = []
    size = 0
    for f in members:
        n = f.x.numel()
        if n >= chunk:
            for lo in range(0, n, chunk):
                yield {k: getattr(f, k)[lo : lo + chunk] for k in present}
            continue
        pending.append(f)
        size += n
        if size >= chunk:
            yield {k: torch.cat([getattr(p, k) for p in pending]) for k in present}
            pending, size = [], 0
    if pending:
        yield {k: torch.cat([getattr(p, k) for p in pending]) for k in present}


def _accumulate(
    blocks: Iterator[dict[str, Tensor]],
    terms: list[tuple[str, str]],
    device: torch.device,
    work: torch.dtype | None = None,
) -> Tensor:
    """Each term's dot product on every block: float64 [blocks, terms] (one zero row if there
    are no blocks). The dots run in the working precision (float64 if any operand is float64,
    else fp32; ``work`` fixes it for every block); their sums over blocks, taken by the caller
    in float64, carry the error argument of the module docstring."""
    diffs = {d: ab for d, ab in _DIFFS.items() if any(d in t for t in terms)}
    scratch: dict[str, Tensor] = {}  # one chunk-sized buffer per difference, reused every block
    dots: list[Tensor] = []
    for ops in blocks:
        w = work or (torch.float64 if any(t.dtype == torch.float64 for t in ops.values()) else torch.float32)
        ops = {k: t if t.dtype == w else t.to(w) for k, t in ops.items()}
        for name, (a, b) in diffs.items():
            n = ops[a].numel()
            buf = scratch.get(name)
            if buf is None or buf.numel() < n or buf.dtype != w:
                buf = scratch[name] = torch.empty(n, dtype=w, device=device)
            ops[name] = torch.sub(ops[a], ops[b], out=buf[:n])
        for name, v in _ABS.items():
            if any(name in t for t in terms):
                ops[name] = ops[v].abs()
        dots += [torch.dot(ops[a], ops[b]) for a, b in terms]
    if not dots:  # only empty fragments
        return torch.zeros(1, len(terms), dtype=torch.float64, device=device)
    # one stack for all blocks: per-call overhead, not arithmetic, is what grows with the blocks
    return torch.stack(dots).view(-1, len(terms)).to(torch.float64)


def pack(sums: Tensor, losses: Tensor) -> Tensor:
    """One float64 vector for ``all_reduce(SUM)``: the sums row-major, then LOSS_NAMES' terms.

    ``losses`` holds this rank's share of each loss (ℓ_r/N for N ranks; NaN when absent).
    """
    if sums.dim() != 2 or sums.shape[0] != len(SUM_NAMES):
        raise ValueError(f"sums must be [{len(SUM_NAMES)}, n_groups], got {tuple(sums.shape)}")
    losses = torch.as_tensor(losses, dtype=torch.float64).reshape(-1).to(sums.device)
    if losses.numel() != len(LOSS_NAMES):
        raise ValueError(f"losses must hold {len(LOSS_NAMES)} values {LOSS_NAMES}, got {losses.numel()}")
    return torch.cat([sums.to(torch.float64).reshape(-1), losses])


def unpack(packed: Tensor, n_groups: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Inverse of ``pack`` (after the all-reduce): per-group sums ({name: float64 [n_groups]})
    and the global losses ({name: float})."""
    # host sync: the step's ONE read-back; the row holds Python numbers (hook.StepMeasurer._reduce)
    arr = packed.detach().to("cpu", torch.float64).numpy()
    n_sums = len(SUM_NAMES) * n_groups
    if arr.shape != (n_sums + len(LOSS_NAMES),):
        raise ValueError(
            f"packed vector has {arr.size} values; expected {n_sums + len(LOSS_NAMES)} for n_groups={n_groups}"
        )
    per_group = {name: arr[i * n_groups : (i + 1) * n_groups].copy() for i, name in enumerate(SUM_NAMES)}
    losses = {name: float(v) for name, v in zip(LOSS_NAMES, arr[n_sums:])}
    return per_group, losses


def totals(per_group: dict[str, np.ndarray]) -> dict[str, float]:
    """Sums over groups (NaN if any group is NaN)."""
    return {name: float(np.sum(v)) for name, v in per_group.items()}
