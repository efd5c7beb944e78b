"""Benchmark 14: a simulated 4 nodes x 8 GPUs cluster on loopback (issue 16 item 7).

Run as `python benchmarks/bench_sim_cluster.py OUT.json` (run_all.py does). Starts 3 Ray nodes
on this machine with 8 logical GPUs each (benchmarks/sim_cluster.py), runs `opt-study run` of
TRIALS 8-rank trials (`gpus_per_worker: 1, accelerator: cpu`: each rank reserves a GPU and
trains on CPU over gloo, the default launcher), and adds the 4th node once 3 trials train at
once (every GPU taken). Reports:

- trials/hour: completed trials over the study's wall time (first trial started by Tune to the
  last ended), start-up included;
- GPU utilization: GPU-seconds trials trained (first to last Parquet step row x 8 ranks) over
  GPU-seconds the nodes offered from their join times, over the same window; a lower bound on
  reserved GPU-seconds (a worker group's start-up before step 0 holds GPUs too);
- peak concurrent trials before and after the 4th node joined, and whether a trial ran on it;
- memory: the machine's used memory and the RSS of this cluster's and the driver's processes,
  peak over the study (sampled every 2 s); load average at start, peak and end.

No target: what the simulation costs and how full it keeps the GPUs on a 2-core machine.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sim_cluster import LoopbackCluster, busy_intervals, concurrency, utilization

from common import VENV_BIN, Section, child_env, fmt, load1, out_path, write_json

# 600 steps: the first wave must still train when the 4th node's 8 ranks have booted (with 200,
# at load 30-113, it had ended, and 4 trials never trained at once)
NODES, GPUS, RANKS, TRIALS, STEPS = 4, 8, 8, 6, 600
TIMEOUT_S = 1500


def study_yaml(storage: Path) -> str:
    lrs = ", ".join(f"{0.01 * (i + 1):g}" for i in range(TRIALS))
    return f"""\
study: {{name: simcluster, storage: {storage}}}
workload: {{type: quadratic, dim: 16, cols: 4}}
scale: {{workers: {RANKS}, gpus_per_worker: 1, accelerator: cpu, cpus_per_worker: 0.25}}
training: {{steps: {STEPS}, eval_every: 20, checkpoint_every: 0}}
optimizers:
  - name: sgd
    params: {{lr: {{grid: [{lrs}]}}}}
measure: {{every: 0}}
"""


class Sampler:
    """Peak used memory, peak RSS of the cluster's and the driver's processes, peak load1."""

    def __init__(self, tmpdir: str, driver_pid: int):
        self.tmpdir, self.driver = tmpdir, driver_pid
        self.mem_used = self.rss = self.load = 0.0

    def sample(self) -> None:
        import psutil

        # Ray's workers retitle themselves (ray::PoolRank): found as children of the raylets
        roots = [p for p in psutil.process_iter(["pid", "cmdline"]) if self.tmpdir in " ".join(p.info["cmdline"] or [])]
        procs = {}
        for p in roots + [psutil.Process(self.driver)]:
            try:
                for q in [p, *p.children(recursive=True)]:
                    procs[q.pid] = q
            except psutil.Error:
                pass
        rss = 0
        for q in procs.values():
            try:
                rss += q.memory_info().rss
            except psutil.Error:
                pass
        self.rss = max(self.rss, rss / 2**30)
        self.mem_used = max(self.mem_used, psutil.virtual_memory().used / 2**30)
        self.load = max(self.load, load1())


def trained_on(study_dir: Path) -> int:
    from opt_study.results.parquet import read_steps

    return len(set(read_steps(study_dir).column("trial_id").to_pylist()))


def main() -> None:
    from opt_study.results.trials import read_trial_records

    load_start = load1()
    with tempfile.TemporaryDirectory(prefix="optstudy-bench-sim-") as d:
        tmp = Path(d)
        cfg = tmp / "sim.yaml"
        cfg.write_text(study_yaml(tmp / "storage"))
        study_dir = tmp / "storage" / "simcluster"
        cluster = LoopbackCluster(gpus_per_node=GPUS, cpus_per_node=2, env=child_env())
        try:
            for _ in range(NODES - 1):
                cluster.add_node()
            env = {**cluster.env, "RAY_ADDRESS": cluster.address}
            with open(tmp / "run.log", "w") as log:
                proc = subprocess.Popen(
                    [str(VENV_BIN / "opt-study"), "run", str(cfg)], env=env, cwd=tmp, stdout=log, stderr=log
                )
            sampler, deadline = Sampler(cluster.tmpdir, proc.pid), time.time() + TIMEOUT_S
            while proc.poll() is None:
                if time.time() > deadline:
                    proc.kill()
                    raise RuntimeError(f"the study did not finish in {TIMEOUT_S} s")
                sampler.sample()
                if len(cluster.joined) < NODES and trained_on(study_dir) >= NODES - 1:
                    cluster.add_node()  # every GPU of the first nodes taken: the 4th joins
                time.sleep(2)
            if proc.returncode != 0:
                raise RuntimeError(f"opt-study run exited {proc.returncode}:\n{(tmp / 'run.log').read_text()[-3000:]}")
            node_ids = cluster.node_ids()
        finally:
            cluster.stop()
        records = read_trial_records(study_dir)
        busy = busy_intervals(study_dir, RANKS)
    t0, t1 = min(r["started"] for r in records), max(r["ended"] for r in records)
    joined = cluster.joined[-1] if len(cluster.joined) == NODES else float("inf")
    write_json(
        out_path(),
        {
            "nodes": NODES,
            "gpus_per_node": GPUS,
            "ranks": RANKS,
            "trials": len(records),
            "completed": sum(r["status"] == "completed" for r in records),
            "steps": STEPS,
            "wall_s": t1 - t0,
            "trials_per_hour": 3600 * len(records) / (t1 - t0),
            "utilization": utilization(busy, [max(j, t0) for j in cluster.joined], GPUS, t0, t1),
            "utilization_after_join": utilization(busy, [max(j, joined) for j in cluster.joined], GPUS, joined, t1)
            if joined < t1
            else float("nan"),
            "peak_before_join": concurrency(busy, until=joined),
            "peak_after_join": concurrency(busy, since=joined),
            "trials_on_new_node": sum(len(node_ids) == NODES and node_ids[-1] in b.nodes for b in busy),
            "join_after_s": joined - t0,
            "train_s": sorted(b.end - b.start for b in busy),
            # each trial's training interval from the first trial's start, and whether on the new node
            "intervals": sorted(
                (round(b.start - t0, 1), round(b.end - t0, 1), len(node_ids) == NODES and node_ids[-1] in b.nodes)
                for b in busy
            ),
            "first_step_s": min(b.start for b in busy) - t0,
            "mem_used_gib": sampler.mem_used,
            "cluster_rss_gib": sampler.rss,
            "load1": [load_start, sampler.load, load1()],
        },
    )


def summarize(r: dict) -> Section:
    table = [
        ["quantity", "value"],
        ["cluster", f"{r['nodes']} nodes x {r['gpus_per_node']} logical GPUs (the last joins mid-study)"],
        ["trials", f"{r['trials']} x {r['ranks']} ranks, {r['steps']} steps ({r['completed']} completed)"],
        ["study wall time s (first trial started -> last ended)", fmt(r["wall_s"])],
        ["trials/hour", fmt(r["trials_per_hour"])],
        ["GPU utilization (trained GPU-s / offered GPU-s)", fmt(r["utilization"])],
        ["GPU utilization after the 4th node joined", fmt(r["utilization_after_join"])],
        ["peak concurrent trials before / after the join", f"{r['peak_before_join']} / {r['peak_after_join']}"],
        ["trials that ran on the joined node", str(r["trials_on_new_node"])],
        ["4th node joined at s", fmt(r["join_after_s"])],
        ["first step at s", fmt(r["first_step_s"])],
        ["training time per trial s", ", ".join(fmt(x) for x in r["train_s"])],
        ["peak memory used on the machine GiB", fmt(r["mem_used_gib"])],
        ["peak RSS of the cluster + driver GiB", fmt(r["cluster_rss_gib"])],
        ["load1 start / peak / end", " / ".join(fmt(x) for x in r["load1"])],
    ]
    notes = [
        "Nodes: `ray start` on 127.0.0.1 with `--num-gpus 8 --num-cpus 2` each; trials reserve one "
        "logical GPU and 0.25 CPU per rank and train the quadratic workload on CPU (gloo). The 4th node "
        "is started once 3 trials have step rows (24 GPUs taken).",
        "Utilization counts a trial's GPUs from its first to its last step row: start-up (rank "
        "processes booting 8 at a time on 2 cores) is counted as idle, so on this machine it is "
        "dominated by start-up, not by the scheduler.",
    ]
    return Section(
        "14. Simulated cluster: 4 nodes x 8 logical GPUs, 8-rank trials",
        "none (reported)",
        "INFO",
        f"{fmt(r['trials_per_hour'])} trials/h, utilization {fmt(r['utilization'])}, "
        f"peak {r['peak_before_join']} -> {r['peak_after_join']} trials",
        table,
        notes,
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
