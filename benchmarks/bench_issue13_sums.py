"""Issue 13 items 1 and 3: the cost of the noise floor's weight-rounding sums (abs_*) in flat_sums
and of the gradient history (the partials on measured steps, the add on every step), per 1M fp32
elements on one rank, min of 20 calls. Targeted run, not in run_all.py:

    .venv/bin/python benchmarks/bench_issue13_sums.py
"""

from __future__ import annotations

import os
import time

import torch

from opt_study.measure import names
from opt_study.measure.grad_history import GradHistory
from opt_study.measure.shards import FlatShard
from opt_study.measure.sums import flat_sums

N = 1 << 20


def best_ms(f, repeats: int = 20) -> float:
    f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    torch.manual_seed(0)
    print(f"load1 {os.getloadavg()[0]:.1f}")
    v = {k: torch.randn(N) for k in names.VECTOR_NAMES}
    runs = [(0, 0, N // 2), (1, N // 2, N)]
    without = [k for k in names.SUM_NAMES if not k.startswith("abs_")]
    for path, env in (("fused", "1"), ("torch", "0")):
        os.environ["OPT_STUDY_FUSED_SUMS"] = env
        a = best_ms(lambda: flat_sums(v, runs, 2, only=without))
        b = best_ms(lambda: flat_sums(v, runs, 2))
        print(f"{path}: {len(without)} sums {a:.2f} ms, {len(names.SUM_NAMES)} sums {b:.2f} ms ({b - a:+.2f})")
    os.environ["OPT_STUDY_FUSED_SUMS"] = "1"
    g = FlatShard(torch.randn(N), [N // 2, N // 2])
    h = GradHistory()
    h.add(g, 0)
    print(
        f"grad history: partials {best_ms(lambda: h.partials(g, 1)):.2f} ms, add {best_ms(lambda: h.add(g, 1)):.2f} ms"
    )
    print(f"load1 {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
