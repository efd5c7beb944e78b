"""The statistics of the steps-to-target protocol: pure functions of numbers (no study I/O).

The rules follow modded-nanogpt's record rules (Jordan et al.,
https://github.com/KellerJordan/modded-nanogpt, README "rules": a new record must reach the
target validation loss "with p < 0.01" in a one-sided t-test over runs with different seeds),
stated here as margins scaled by σ/√n so the report can print them:

- ``reaches``: the n final validation losses x_i reach ``target`` iff
  mean(x) + t_{1−α, n−1} · s/√n < target (s the sample standard deviation, ddof = 1),
  which is exactly the one-sided one-sample Student t-test of H0: μ ≥ target at level α
  (Student 1908, https://doi.org/10.1093/biomet/6.1.1). The multiplier t_{1−α, n−1} plays
  the part of z; with α = 0.01 and n = 5 it is 3.747 (z of the normal would be 2.326).
- ``beats``: A beats B (fewer steps, or a lower loss) iff
  mean(B) − mean(A) > t_{1−α, ν} · √(s_A²/n_A + s_B²/n_B), Welch's one-sided test with
  the Welch–Satterthwaite degrees of freedom ν (Welch 1947, https://doi.org/10.2307/2332510).
  With no spread on either side (s_A = s_B = 0: e.g. every seed reaches the target at the same
  evaluation) the margin is 0 and the rule is mean(A) < mean(B).
- ``decay_end``: the step count from which an evaluation may count (module
  opt_study.report.steps_to_target; "schedules compared only after their decay ends").

``mean_ci`` (opt_study.report.stats) gives the two-sided 95% Student-t intervals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from opt_study.config.spec import ScheduleConfig

ALPHA = 0.01  # modded-nanogpt's p < 0.01


def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _mean_var(x: Sequence[float]) -> tuple[float, float]:
    m = sum(x) / len(x)
    return m, sum((v - m) ** 2 for v in x) / (len(x) - 1)


def reach_margin(n: int, sd: float, alpha: float = ALPHA) -> float:
    """t_{1−α, n−1} · sd/√n: how far below the target the mean must lie (NaN for n < 2)."""
    from scipy.stats import t as student_t

    if n < 2:
        return math.nan
    return float(student_t.ppf(1.0 - alpha, n - 1) * sd / math.sqrt(n))


def reaches(losses: Sequence[float], target: float, alpha: float = ALPHA) -> bool:
    """True iff mean + t_{1−α, n−1}·s/√n < target over the losses; a non-finite loss (a
    diverged or failed seed) or fewer than 2 seeds: False (σ cannot be measured)."""
    x = [float(v) for v in losses]
    if len(x) < 2 or len(_finite(x)) < len(x):
        return False
    m, var = _mean_var(x)
    return m + reach_margin(len(x), math.sqrt(var), alpha) < target


def welch_margin(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA) -> float:
    """t_{1−α, ν} · √(s_A²/n_A + s_B²/n_B), ν by Welch–Satterthwaite; 0 when both spreads are 0;
    NaN with fewer than 2 values on a side."""
    from scipy.stats import t as student_t

    if len(a) < 2 or len(b) < 2:
        return math.nan
    (_, va), (_, vb) = _mean_var(a), _mean_var(b)
    qa, qb = va / len(a), vb / len(b)
    if qa + qb == 0.0:
        return 0.0
    nu = (qa + qb) ** 2 / (qa**2 / (len(a) - 1) + qb**2 / (len(b) - 1))
    return float(student_t.ppf(1.0 - alpha, nu) * math.sqrt(qa + qb))


def beats(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA) -> bool:
    """True iff A's mean is below B's by more than ``welch_margin`` (lower is better: steps or
    loss). Every value must be finite (a seed that never reached the target has no step count)."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(_finite(a)) < max(2, len(a)) or len(_finite(b)) < max(2, len(b)):
        return False
    return _mean_var(b)[0] - _mean_var(a)[0] > welch_margin(a, b, alpha)


def decay_end(schedule: ScheduleConfig, steps: int) -> int:
    """Steps done from which an evaluation counts: the LR multiplier has reached the value it
    keeps (opt_study.optim.schedules.lr_factor). constant: after warm-up (warmup_steps);
    linear, cosine, wsd, trapezoidal: they decay until the last step, so only the final
    evaluation counts (steps); cosine_restarts: likewise the final evaluation (a later cycle
    would restart the decay)."""
    return schedule.warmup_steps if schedule.type == "constant" else steps


def steps_to_target(evals: Sequence[tuple[int, float]], target: float, counted_from: int) -> float:
    """Steps done at the first evaluation (step index k: k + 1 steps done) with loss ≤ target
    among those with k + 1 ≥ counted_from; +inf if there is none."""
    hits = [k + 1 for k, v in sorted(evals) if k + 1 >= counted_from and v is not None and v <= target]
    return float(hits[0]) if hits else math.inf
