"""A real two-node Ray cluster on loopback: `ray start --head` and `ray start --address` as separate
processes with one CPU each, so a trial of two workers (one CPU each) must put one rank on each node.
`opt-study run` connects through RAY_ADDRESS; results are checked as in the end-to-end tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pytest

from opt_study.distributed import free_port
from opt_study.results.parquet import read_steps
from opt_study.results.trials import read_trial_records
from opt_study.validate import load_study

import specs
from cli_process import start_cli

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def _ray(*args, env):
    subprocess.run([RAY, *args], env=env, check=True, capture_output=True, text=True, timeout=180)


@pytest.fixture
def two_nodes(tmp_path):
    port = free_port()
    # a short RAY_TMPDIR: Ray's Unix sockets live under it and a socket path is limited to 107 bytes
    short = tempfile.mkdtemp(prefix="r2n", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": short, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    from opt_study.study.run import ray_env

    env.update(ray_env())  # what the nodes' workers need (CPU DeepSpeed, op cache)
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    try:
        _ray(
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--include-dashboard",
            "false",
            *common,
            env=env,
        )
        _ray("start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1", *common, env=env)
        yield f"127.0.0.1:{port}", env
    finally:
        _stop_cluster_under(short)  # not `ray stop`: that would also stop the session's own Ray
        shutil.rmtree(short, ignore_errors=True)


def _stop_cluster_under(tmpdir: str) -> None:
    """SIGKILL the processes of the Ray cluster whose session lives under `tmpdir`."""
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        if tmpdir in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid():
            try:
                p.kill()
            except psutil.Error:
                pass


def test_trial_workers_spread_over_two_nodes(two_nodes, tmp_path):
    address, env = two_nodes
    f = specs.write_spec(
        tmp_path / "twonodes.yaml",
        tmp_path / "store",
        study={"name": "twonodes"},
        workload={"type": "tiny_lm", "layers": 1, "heads": 2, "width": 32, "context": 16},
        scale={"workers": 2, "cpus_per_worker": 1, "zero_stage": 2, "micro_batch_size": 4},
        training={"steps": 10, "eval_every": 5},
        optimizers=[{"name": "adamw", "params": {"lr": 0.003}}],
        measure={"every": 5},
    )
    proc = subprocess.run(
        [sys.executable, "-m", "opt_study.cli", "run", str(f)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "RAY_ADDRESS": address},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    spec = load_study(f)
    (rec,) = read_trial_records(spec.study_dir)
    assert rec["status"] == "completed"
    assert len(rec["nodes"].split(",")) == 2, rec["nodes"]  # one rank on each node
    rows = duckdb.from_arrow(read_steps(spec.study_dir))
    per = rows.query("rows", "SELECT count(*), count(DISTINCT step), sum(measured::INT) FROM rows").fetchall()
    assert per == [(10, 10, 2)]
    worst = rows.query("rows", "SELECT max(abs(grad_norm - engine_grad_norm) / engine_grad_norm) FROM rows").fetchall()[
        0
    ][0]
    assert worst < 1e-5


def _ray_head(port: int, env: dict) -> None:
    _ray(
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--include-dashboard",
        "false",
        "--num-cpus",
        "1",
        "--disable-usage-stats",
        env=env,
    )


def _overlapping_pairs(records: list[dict]) -> list[tuple[dict, dict]]:
    return [
        (a, b)
        for i, a in enumerate(records)
        for b in records[i + 1 :]
        if max(a["started"], b["started"]) < min(a["ended"], b["ended"])
    ]


def test_a_node_added_mid_study_runs_a_second_trial_at_once(tmp_path):
    """Concurrency follows the cluster (issue 16): a study started on a cluster with room for one
    trial runs two at once after a second node joins mid-study. A bound taken from the cluster's
    size at start (1) would leave the new node idle, and an autoscaler would never add it."""
    port = free_port()
    short = tempfile.mkdtemp(prefix="r1n", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": short, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    from opt_study.study.run import ray_env

    env.update(ray_env())
    f = specs.write_spec(
        tmp_path / "grow.yaml",
        tmp_path / "store",
        study={"name": "grow"},
        scale={"launcher": "in_process", "workers": 1, "cpus_per_worker": 1},
        training={"steps": 300, "eval_every": 150, "checkpoint_every": 0},
        optimizers=[{"name": "sgd", "params": {"lr": {"grid": [0.01, 0.02, 0.03, 0.04]}}}],
        measure={"every": 0},
    )
    spec = load_study(f)
    try:
        _ray_head(port, env)
        proc = start_cli(["run", str(f)], env=env, ray_address=f"127.0.0.1:{port}")
        deadline = time.time() + 300
        while not any(r["status"] == "running" for r in read_trial_records(spec.study_dir)):
            assert proc.poll() is None and time.time() < deadline, "no trial started"
            time.sleep(0.5)
        _ray("start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", env=env)
        out, _ = proc.communicate(timeout=600)
    finally:
        _stop_cluster_under(short)
        shutil.rmtree(short, ignore_errors=True)
    assert proc.returncode == 0, out[-3000:]
    records = read_trial_records(spec.study_dir)
    assert [r["status"] for r in records] == ["completed"] * 4, out[-3000:]
    pairs = _overlapping_pairs(records)
    assert pairs, [(r["trial_id"], r["started"], r["ended"], r["nodes"]) for r in records]
    assert any(a["nodes"] != b["nodes"] for a, b in pairs)  # one on each node
    assert len({r["nodes"] for r in records}) == 2
    assert "as many at a time as the cluster holds" in out
