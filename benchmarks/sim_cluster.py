"""A simulated GPU cluster on loopback: several Ray nodes on this machine, each started with
`ray start --num-gpus N` (logical GPUs: Ray only counts them), and what a study did on it.

A study run on it with `scale.gpus_per_worker: 1, accelerator: cpu` schedules exactly as on a
real GPU cluster (one GPU per rank, placement across nodes, pending trials waiting for GPUs)
while its ranks train on CPU over gloo. Used by benchmarks/bench_sim_cluster.py (4 nodes x 8
GPUs) and tests/e2e/test_sim_cluster.py (a smaller shape that fits the CI machine).

Occupancy is read from what the study stored: a trial holds its GPUs while its ranks train,
i.e. from its first to its last Parquet step row (`time_unix`, stamped by rank 0 after each
step), which never exceeds the time Ray holds its placement group (a lower bound on
reservation; the worker group's start-up before step 0 is not counted).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
OBJECT_STORE_BYTES = 200 * 2**20  # per node: trials pass little through the object store


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LoopbackCluster:
    """Ray nodes on 127.0.0.1, started as separate `ray start` processes. Node i carries the
    custom resource ``sim_node_<i>`` so its Ray node id can be found (`node_ids`). `stop`
    SIGKILLs only the processes of this cluster (its own RAY_TMPDIR), never another Ray."""

    gpus_per_node: int
    cpus_per_node: float
    env: dict = field(default_factory=dict)
    port: int = 0
    tmpdir: str = ""
    joined: list[float] = field(default_factory=list)  # time.time() at which node i was up

    def __post_init__(self):
        self.port = self.port or _free_port()
        # short: Ray's Unix sockets live under it and a socket path is limited to 107 bytes
        self.tmpdir = tempfile.mkdtemp(prefix="rsim", dir="/tmp")
        from opt_study.study.run import ray_env

        # what the nodes' workers need (CPU DeepSpeed, op cache), then the caller's own; a
        # worker inherits its raylet's environment
        env = {**os.environ, **ray_env(), **self.env, "RAY_TMPDIR": self.tmpdir, "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        self.env = env

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add_node(self) -> float:
        """Start the next node (the head first); returns when `ray start` has, with its time."""
        i = len(self.joined)
        where = ["--head", "--port", str(self.port), "--include-dashboard", "false"] if i == 0 else []
        where = where or ["--address", self.address]
        args = [
            *where,
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            f"{self.cpus_per_node:g}",
            "--num-gpus",
            str(self.gpus_per_node),
            "--object-store-memory",
            str(OBJECT_STORE_BYTES),
            "--resources",
            json.dumps({f"sim_node_{i}": 1}),
            "--disable-usage-stats",
        ]
        subprocess.run([RAY, "start", *args], env=self.env, check=True, capture_output=True, text=True, timeout=180)
        self.joined.append(time.time())
        return self.joined[-1]

    def node_ids(self) -> list[str]:
        """Ray node id of node 0, 1, ... (asked from a short-lived driver of this cluster)."""
        code = (
            "import json, ray; ray.init(address=%r, log_to_driver=False, configure_logging=False);"
            "print(json.dumps({k: n['NodeID'] for n in ray.nodes() if n['Alive']"
            " for k in n['Resources'] if k.startswith('sim_node_')}))" % self.address
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env=self.env, check=True, capture_output=True, text=True, timeout=180
        )
        ids = json.loads(out.stdout.strip().splitlines()[-1])
        return [ids[f"sim_node_{i}"] for i in range(len(self.joined))]

    def stop(self) -> None:
        """SIGKILL this cluster's processes (not `ray stop`: that stops every Ray of the user)."""
        import psutil

        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if self.tmpdir in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid():
                    p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.tmpdir, ignore_errors=True)


# ------------------------------------------------------------------------ what the study did
@dataclass(frozen=True)
class Busy:
    """One trial's training interval: GPUs it held (ranks), the nodes its ranks ran on."""

    trial_id: str
    start: float
    end: float
    gpus: int
    nodes: frozenset


def busy_intervals(study_dir: Path, gpus_per_trial: int) -> list[Busy]:
    """Each completed trial's [first step, last step] from its Parquet rows, with its nodes."""
    from opt_study.results.parquet import read_steps
    from opt_study.results.trials import read_trial_records

    out = []
    for rec in read_trial_records(study_dir):
        t = read_steps(study_dir, trial_ids=[rec["trial_id"]]).column("time_unix").to_pylist()
        if t:
            nodes = frozenset(n for n in (rec.get("nodes") or "").split(",") if n)
            out.append(Busy(rec["trial_id"], min(t), max(t), gpus_per_trial, nodes))
    return out


def concurrency(busy: list[Busy], since: float = float("-inf"), until: float = float("inf")) -> int:
    """The most trials training at one moment within [since, until]."""
    events = sorted(
        [(max(b.start, since), 1) for b in busy if b.end > since and b.start < until]
        + [(min(b.end, until), -1) for b in busy if b.end > since and b.start < until],
        key=lambda e: (e[0], e[1]),  # an end before a start at the same instant
    )
    now = peak = 0
    for _, d in events:
        now += d
        peak = max(peak, now)
    return peak


def utilization(busy: list[Busy], joined: list[float], gpus_per_node: int, t0: float, t1: float) -> float:
    """GPU-seconds trials trained / GPU-seconds the cluster offered over [t0, t1] (a node offers
    its GPUs from its join time)."""
    offered = sum(gpus_per_node * max(0.0, t1 - max(t0, j)) for j in joined)
    used = sum(b.gpus * max(0.0, min(b.end, t1) - max(b.start, t0)) for b in busy)
    return used / offered if offered else float("nan")
