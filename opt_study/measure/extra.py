"""User metrics (`measure.extra`): functions of a measured step's row, stored in the `extra` column.

Contract (docs in README §Bring your own): a metric is named by an import path
(`mypkg.metrics:my_metric`) or an `opt_study.metrics` entry point, and is a function
`fn(row) -> {name: float}` of one measured step's row, the dict of the schema's columns
(opt_study.results.schema: `loss`, `sq_grad`, `ip_grad_update`, `smoothness_local`, ...; a value
is None where it was not computed). It runs on rank 0 after the step's one all-reduce, so it sees
global quantities only and costs no collective; it must not touch the model. Its results go into
the row's `extra` map column (`SELECT extra['name'] FROM steps` in `opt-study query`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from opt_study import plugins
from opt_study.storage.names import is_safe_name


class ExtraMetrics:
    """The study's user metrics, resolved once per trial."""

    def __init__(self, names: tuple[str, ...]):
        self.fns = [(n, plugins.metric(n)) for n in names]

    def __bool__(self) -> bool:
        return bool(self.fns)

    def __call__(self, row: Mapping[str, Any]) -> dict[str, float]:
        """Every metric's values on `row`, merged; a name given twice or a non-number raises
        ValueError naming the metric (a bug in user code should stop the trial, not be stored)."""
        out: dict[str, float] = {}
        view = dict(row)  # a copy: a metric cannot edit the stored row
        for source, fn in self.fns:
            got = fn(view)
            if not isinstance(got, Mapping):
                raise ValueError(f"metric {source} returned {type(got).__name__}, not a {{name: float}} mapping")
            for k, v in got.items():
                if not isinstance(k, str) or not is_safe_name(k):
                    raise ValueError(f"metric {source}: {k!r} is not a safe metric name")
                if k in out:
                    raise ValueError(f"metric {source}: {k!r} is also returned by another metric")
                out[k] = _number(source, k, v)
        return out


def _number(source: str, key: str, v: Any) -> float:
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
        raise ValueError(f"metric {source}: {key} must be a number, got {v!r:.60}")
    return float(v)
