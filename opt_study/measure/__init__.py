"""Measurement of optimization assumptions during training (METRICS.md).

- ``sums``: this rank's partial raw sums over its shard, packed for ONE all-reduce.
- ``metrics``: derived metrics and per-trial summaries, pure functions of the global sums.
- ``reference``: the float64 single-process oracle the tests compare against.
- ``shards``, ``probe``, ``hook``: reading DeepSpeed shards, the same-batch probe, the step hook.

Submodules are imported explicitly (``from opt_study.measure import metrics``) so that the pure
math never pulls in DeepSpeed.
"""
