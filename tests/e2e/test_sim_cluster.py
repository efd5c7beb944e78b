"""A simulated GPU cluster on loopback (issue 16 item 7): Ray nodes with logical GPUs
(`ray start --num-gpus 2`), trials of 2 ranks that each reserve a GPU (`gpus_per_worker: 1`) but
train on CPU (`accelerator: cpu`, gloo). The scheduler must fill the GPUs it has (a trial on each
of two nodes), never exceed them, and start a waiting trial on a third node as soon as it joins,
while the first two still hold theirs.

The first trials hold their GPUs at their 5th step until the test opens a gate (a user model,
tests/user_code.py:make_gated_mlp), so the overlap does not depend on how fast this machine
boots a worker group against how fast it trains. The full 4 nodes x 8 GPUs with 8-rank trials
(32 rank processes) is benchmarks/bench_sim_cluster.py; this shape (6 rank processes at most)
proves the same property within the CI machine (2 cores, 24 GiB)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from opt_study.results.parquet import read_steps
from opt_study.results.trials import read_trial_records
from opt_study.validate import load_study

import specs
from cli_process import start_cli

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from sim_cluster import LoopbackCluster, busy_intervals, concurrency  # noqa: E402

GPUS, RANKS, TRIALS, WAIT_S = 2, 2, 4, 400


def _training(study_dir: Path) -> int:
    """How many trials have stored step rows (their ranks hold their GPUs and train)."""
    return len(set(read_steps(study_dir).column("trial_id").to_pylist()))


def _wait_for(n: int, study_dir: Path, proc) -> bool:
    """Whether `n` trials trained before the study ended or WAIT_S passed."""
    deadline = time.time() + WAIT_S
    while _training(study_dir) < n:
        if proc.poll() is not None or time.time() > deadline:
            return False
        time.sleep(1)
    return True


def test_trials_fill_logical_gpus_and_a_joining_node(tmp_path):
    gate = tmp_path / "gate"
    f = specs.write_spec(
        tmp_path / "sim.yaml",
        tmp_path / "store",
        study={"name": "sim"},
        workload={
            "type": "dataset",
            "dataset": "user_code:make_digits",
            "model": "user_code:make_gated_mlp",
            "model_args": {"gate": str(gate), "hold_at": 5, "max_wait_s": WAIT_S},
            "eval_size": 64,
        },
        scale={"workers": RANKS, "gpus_per_worker": 1, "accelerator": "cpu", "cpus_per_worker": 0.25},
        training={"steps": 6, "eval_every": 2, "checkpoint_every": 0},
        optimizers=[{"name": "sgd", "params": {"lr": {"grid": [0.01 * (i + 1) for i in range(TRIALS)]}}}],
        measure={"every": 0},
    )
    pythonpath = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    cluster = LoopbackCluster(gpus_per_node=GPUS, cpus_per_node=1, env={"PYTHONPATH": pythonpath})
    spec = load_study(f)
    try:
        cluster.add_node()
        cluster.add_node()
        proc = start_cli(["run", str(f)], env=cluster.env, ray_address=cluster.address)
        filled = _wait_for(2, spec.study_dir, proc)  # both nodes' GPUs taken
        joined = cluster.add_node()
        third = _wait_for(3, spec.study_dir, proc)  # placed on the new node
        gate.touch()  # the held trials finish; the last one runs
        out, _ = proc.communicate(timeout=600)
        node_ids = cluster.node_ids()
    finally:
        gate.touch()
        cluster.stop()
    assert proc.returncode == 0, out[-3000:]
    assert filled and third, out[-3000:]
    records = read_trial_records(spec.study_dir)
    assert [r["status"] for r in records] == ["completed"] * TRIALS, out[-3000:]
    busy = busy_intervals(spec.study_dir, RANKS)
    shown = [(b.trial_id, round(b.start - joined, 1), round(b.end - joined, 1), sorted(b.nodes)) for b in busy]
    # two nodes x 2 GPUs hold two 2-rank trials: filled and never exceeded until the third joined
    assert concurrency(busy, until=joined) == 2, shown
    # then three at once: a waiting trial started on the new node while the first two held theirs
    assert concurrency(busy) == 3, shown
    on_new = [b for b in busy if b.nodes == {node_ids[2]}]
    assert on_new and all(b.start > joined for b in on_new), (node_ids, shown)
    # the accelerator switch: every rank reserved a GPU yet trained on CPU
    assert {r["resources"]["device"] for r in records} == {"cpu"}
    assert {r["resources"]["total_gpu"] for r in records} == {RANKS}
