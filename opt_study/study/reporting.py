"""What every multi-rank launcher (launch.worker_group, pool) shares about a trial's ranks:
quiet DeepSpeed logs, and each report reaching Tune once across restarted attempts."""

from __future__ import annotations

import logging


def quiet() -> None:
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def is_new_report(last_step: int | None, metrics: dict) -> bool:
    """Whether a result goes on to Tune: only a step after the last one forwarded. A restarted
    attempt (a worker group restarted by Ray Train, a pool trial run again on a fresh slot)
    resumes from its checkpoint and reports the evaluations between that checkpoint and the
    failure again; Tune counts every result it gets (`training_iteration`, ASHA's rungs), so a
    repeat must not reach it."""
    step = metrics.get("step")
    return last_step is None or not isinstance(step, int) or step > last_step
