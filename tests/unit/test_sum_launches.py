"""The torch path of the raw sums (the GPU's) launches a number of kernels that grows with the
group runs and the sums, never with the shard's size (issue 16 item 6: one torch.dot per 64k
chunk made ~5.7k launches per GPT-2 step). Counted through the torch profiler on CPU, so the GPU
path cannot regress unseen."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from opt_study.measure.names import SUM_NAMES
from opt_study.measure.sums import flat_sums_torch, group_runs

DOTS = ("aten::dot", "aten::bmm")


def _launches(n: int, only=None) -> tuple[int, int]:
    """(dot/bmm calls, all aten calls) of one flat_sums_torch over a shard of ~n elements in 3
    fragments of 2 groups (3 runs), every vector present."""
    gen = torch.Generator().manual_seed(n)
    sizes = [n // 4 + 1, n // 4 + 3, n - n // 2 - 4]
    runs = group_runs(sizes, [0, 1, 0])
    vectors = {k: torch.randn(sum(sizes), generator=gen) for k in ("x", "g", "delta", "g_plus", "x0")}
    vectors.update(delta_prev=vectors["delta"].flip(0), g_prev=vectors["g"].flip(0))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        flat_sums_torch(vectors, runs, 2, only=only)
    events = prof.key_averages()
    return sum(e.count for e in events if e.key in DOTS), sum(e.count for e in events if e.key.startswith("aten::"))


def test_launches_do_not_grow_with_the_shard():
    small, big = _launches(70_000), _launches(3_000_000)
    assert small == big  # 43x the elements, the same calls (measured 84 dots, 903 aten calls; the
    # chunk loop before: 42 and 658 dots, 367 and 4,021 aten calls)
    dots, _ = big
    runs = 3
    assert dots <= 2 * runs * len(SUM_NAMES), dots  # per run and sum: one bmm + one remainder dot


def test_an_unmeasured_steps_norms_take_a_few_calls():
    dots, total = _launches(3_000_000, only=("sq_grad", "sq_update", "sq_param"))
    assert dots <= 2 * 3 * 3, dots
    assert total < 400, total  # measured 274 (views and slices included); the chunk loop: 141 dots, 1,146 calls
