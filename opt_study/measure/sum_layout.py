"""The layout both paths of the raw sums share (sums.py's torch path, fused_sums.py's kernel).

A result is float64 [len(SUM_NAMES), n_groups] (names.SUM_NAMES order): zeros where a group holds
no element, NaN for a sum that was not wanted or whose operands are missing. Here: the argument
checks of ``flat_sums``, the rows a set of present vectors can compute, and the initial output.
It sits below both sums.py and fused_sums.py so that the import graph is one way:
names <- sum_layout <- fused_sums <- sums.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch
from torch import Tensor

from opt_study.measure.names import SUM_ABS, SUM_DIFFS, SUM_NAMES, SUM_TERMS, VECTOR_NAMES

# 64k elements: 6-7 fp32 operands of 256 KiB mostly stay in a 2 MiB L2 while the dots re-read
# them; 32k pays more per-call overhead, 128k spills (bench_sums on a 2-core Xeon).
CHUNK = 1 << 16


def check_flat(
    vectors: Mapping[str, Tensor | None],
    runs: Sequence[tuple[int, int, int]],
    n_groups: int,
    chunk: int,
    only: Collection[str] | None,
) -> tuple[dict[str, Tensor], int, set[str]]:
    """``flat_sums``' argument checks (ValueError on a violation): the vectors that are present,
    their common length and the set of wanted sums."""
    wanted = wanted_sums(only, chunk)
    present = {k: v for k, v in vectors.items() if v is not None}
    if set(present) - set(VECTOR_NAMES):
        raise ValueError(f"unknown vectors {sorted(set(present) - set(VECTOR_NAMES))}; known: {VECTOR_NAMES}")
    if "x" not in present:
        raise ValueError("flat_sums needs the vector 'x'")
    n = present["x"].numel()
    for name, t in present.items():
        if t.dim() != 1 or t.numel() != n or not t.is_floating_point():
            raise ValueError(
                f"vector {name!r} must be a 1-D floating-point tensor of {n} elements "
                f"(like x), got {t.dtype} {tuple(t.shape)}"
            )
    for group, start, stop in runs:
        if not (0 <= group < n_groups and 0 <= start <= stop <= n):
            raise ValueError(f"run {(group, start, stop)} out of range (n_groups={n_groups}, {n} elements)")
    return present, n, wanted


def wanted_sums(only: Collection[str] | None, chunk: int) -> set[str]:
    """The sums to compute (all of SUM_NAMES when ``only`` is None); checks ``chunk``."""
    wanted = set(SUM_NAMES if only is None else only)
    if not wanted <= set(SUM_NAMES):
        raise ValueError(f"unknown sum names {sorted(wanted - set(SUM_NAMES))}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return wanted


def empty_out(wanted: set[str], n_groups: int, device) -> Tensor:
    """Zeros for the wanted sums (a group this rank holds nothing of sums to 0), NaN elsewhere."""
    out = torch.zeros(len(SUM_NAMES), n_groups, dtype=torch.float64, device=device)
    out[[i for i, n in enumerate(SUM_NAMES) if n not in wanted]] = float("nan")
    return out


def plan(wanted: set[str], present) -> tuple[list[int], list[int], list[tuple[str, str]]]:
    """Rows of the wanted sums that the ``present`` operands can / cannot compute (the latter
    are NaN), and the operand names of each computable one."""
    avail = set(present) | {d for d, (a, b) in SUM_DIFFS.items() if a in present and b in present}
    avail |= {m for m, v in SUM_ABS.items() if v in present}
    rows = [i for i, n in enumerate(SUM_NAMES) if n in wanted]
    computable = [i for i in rows if set(SUM_TERMS[SUM_NAMES[i]]) <= avail]
    missing = [i for i in rows if i not in computable]
    return computable, missing, [SUM_TERMS[SUM_NAMES[i]] for i in computable]
