"""Measurement of optimization assumptions during training (docs/METRICS.md).

- ``names``: every raw-sum, loss and derived-metric name (the schema and the C++ kernel read it).
- ``sums``: this rank's partial raw sums over its shard, packed for ONE all-reduce
  (``sum_layout``: the checks and row plan shared with ``fused_sums``, the one-pass C++ kernel).
- ``metrics``: derived metrics and per-trial summaries, pure functions of the global sums.
- ``reference``: the float64 single-process oracle the tests compare against.
- ``cadence``: which steps are measured, evaluated, logged, checkpointed (hook and loop share it).
- ``shards``, ``probe``, ``fp32eval``, ``hook``: reading DeepSpeed shards, the same-batch probe,
  the fp32 loss re-evaluation, the step hook.
- ``lossscale``: the losses' rounding magnitudes (the noise floor's loss terms), read from the
  logits of the measured forwards.
- ``deepspeed_state``: the only module that touches private DeepSpeed / torch state.

Imports run one way, lowest first: names, cadence < sum_layout < fused_sums < sums < metrics;
deepspeed_state < shards, probe < fp32eval < hook; lossscale < hook. Submodules are imported explicitly
(``from opt_study.measure import metrics``) so that the pure math never pulls in DeepSpeed.
"""
