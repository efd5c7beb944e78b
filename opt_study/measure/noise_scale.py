"""The gradient noise scale B_simple of a measured step (docs/METRICS.md §Gradient noise scale).

The hook sums each micro-batch's ‖g_{r,m}‖² (the small batch) into the step's one all-reduce; this
turns it and ‖g_t‖² (the big batch) into B_simple.
"""

from __future__ import annotations

import math


def noise_scale_simple(sq_small: float | None, sq_big: float, b: int, B: int) -> float | None:
    """B_simple = tr(Σ)/‖G‖² from squared gradient norms at batch sizes b < B, in samples.

    McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", App. A
    (https://arxiv.org/abs/1812.06162): ‖G‖² ≈ (B‖G_B‖² − b‖G_b‖²)/(B − b),
    tr(Σ) ≈ (‖G_b‖² − ‖G_B‖²)/(1/b − 1/B). Per-step values are noisy; analysis keeps EMAs of the
    numerator and denominator separately and divides last.
    """
    if sq_small is None or B <= b or not math.isfinite(sq_small):
        return None
    g2 = (B * sq_big - b * sq_small) / (B - b)
    tr = (sq_small - sq_big) / (1 / b - 1 / B)
    return tr / g2 if g2 != 0 else None
