"""Learning-rate schedules: pure functions of the step that multiply each group's base lr.

Conventions shared by every kind: `step` is the 0-based optimizer step; warm-up (Goyal et al.
2017, https://arxiv.org/abs/1706.02677) gives (step + 1) / warmup_steps for step < warmup_steps,
so step 0 already moves and the last warm-up step reaches 1; a decay reaches min_ratio at
step == total_steps (one past the last step of the run) and stays there.
"""

from __future__ import annotations

import math

from opt_study.config import ScheduleConfig

SCHEDULES = ScheduleConfig.TYPES  # one list of names: the config slice owns it


def lr_factor(
    step: int,
    total_steps: int,
    kind: str,
    warmup_steps: int,
    min_ratio: float,
    *,
    period: int | None = None,
    mult: float = 1.0,
    decay_fraction: float = 0.2,
) -> float:
    """The multiplier of the base lr at `step`. After warm-up, with progress
    p = (step − warmup_steps) / (total_steps − warmup_steps) clipped to [0, 1]:

      constant:        1
      linear:          min_ratio + (1 − min_ratio)(1 − p)
      cosine:          min_ratio + (1 − min_ratio) · ½(1 + cos(π p))
                       (Loshchilov & Hutter 2017, SGDR, https://arxiv.org/abs/1608.03983, Eq. 5
                       with one period spanning the run)
      cosine_restarts: SGDR itself (same paper, Eq. 5): with t = step − warmup_steps, the first
                       cycle lasts `period` steps and each next one `mult` times longer,
                       T_i = period · mult^i; inside cycle i at T_cur steps from its start,
                       min_ratio + (1 − min_ratio) · ½(1 + cos(π T_cur / T_i)). Restarts (factor
                       back to 1) do not depend on total_steps.
      wsd / trapezoidal: warmup-stable-decay (Hägele et al. 2024,
                       https://arxiv.org/abs/2405.18392): 1 until the last
                       D = round(decay_fraction · total_steps) steps (at least 1, at most
                       total_steps − warmup_steps), then linear to min_ratio:
                       min_ratio + (1 − min_ratio)(1 − (step − (total_steps − D)) / D).
    """
    _check(step, total_steps, kind, warmup_steps, min_ratio, period, mult, decay_fraction)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "cosine_restarts":
        return _sgdr(step - warmup_steps, period, mult, min_ratio)
    if kind in ("wsd", "trapezoidal"):
        return _wsd(step, total_steps, warmup_steps, min_ratio, decay_fraction)
    if step >= total_steps:
        return min_ratio
    p = (step - warmup_steps) / (total_steps - warmup_steps)
    if kind == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - p)
    return _cosine(p, min_ratio)


def schedule_factor(step: int, total_steps: int, schedule) -> float:
    """lr_factor with the fields of an `opt_study.config.ScheduleConfig` (what the loop calls)."""
    return lr_factor(
        step,
        total_steps,
        schedule.type,
        schedule.warmup_steps,
        schedule.min_ratio,
        period=getattr(schedule, "period", None),
        mult=getattr(schedule, "mult", 1.0),
        decay_fraction=getattr(schedule, "decay_fraction", 0.2),
    )


def _cosine(p: float, min_ratio: float) -> float:
    # SGDR Eq. 5 (https://arxiv.org/abs/1608.03983) as a multiplier: η_min = min_ratio · η_max.
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def _sgdr(t: int, period: int, mult: float, min_ratio: float) -> float:
    if mult == 1.0:
        return _cosine((t % period) / period, min_ratio)
    length = float(period)
    while t >= length:  # at most log_mult(t / period) + 1 cycles: mult > 1 here
        t -= length
        length *= mult
    return _cosine(t / length, min_ratio)


def _wsd(step: int, total_steps: int, warmup_steps: int, min_ratio: float, decay_fraction: float) -> float:
    if step >= total_steps:
        return min_ratio
    decay = min(max(1, math.floor(decay_fraction * total_steps + 0.5)), total_steps - warmup_steps)
    start = total_steps - decay
    if step < start:
        return 1.0
    return min_ratio + (1.0 - min_ratio) * (1.0 - (step - start) / decay)


def _check(step, total_steps, kind, warmup_steps, min_ratio, period, mult, decay_fraction) -> None:
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r} (known: {', '.join(SCHEDULES)})")
    if step < 0 or total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"need step >= 0, total_steps >= 1 and 0 <= warmup_steps <= total_steps; "
            f"got step={step}, total_steps={total_steps}, warmup_steps={warmup_steps}"
        )
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    if kind == "cosine_restarts":
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"cosine_restarts needs an integer period >= 1 (steps of the first cycle), got {period!r}")
        if not 1.0 <= mult < math.inf:
            raise ValueError(f"mult must be a finite number >= 1, got {mult!r}")
    if kind in ("wsd", "trapezoidal") and not 0.0 < decay_fraction <= 1.0:
        raise ValueError(f"decay_fraction must be in (0, 1], got {decay_fraction!r}")
