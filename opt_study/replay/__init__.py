"""Checkpoint replay: reference-point metrics recomputed over a trial's saved fp32 snapshots.

`job` starts a torchrun job at the trial's own world size; `worker` is what each rank runs.
"""
