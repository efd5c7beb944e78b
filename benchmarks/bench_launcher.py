"""Benchmark 2: per-trial start-up of the two launchers, through a real `opt-study run`.

Run as `python benchmarks/bench_launcher.py OUT.json` (run_all.py does). For each launcher it
writes a study YAML to a temp dir (storage in that temp dir too) with TRIALS one-step trials of a
tiny model and runs `.venv/bin/opt-study run FILE` as a subprocess (Ray, Tune, DeepSpeed, MLflow:
everything a user gets), then reads back:

- per-trial start-up: `time_unix` of the trial's step-0 row in Parquet minus `started` in
  `trials/<id>.json` (written by the driver when Tune starts the trial), i.e. from trial start
  to the end of its first (tiny) training step. The record is read while the study runs
  (`watch_started`): the driver rewrites it when the trial ends, and the final record need not
  keep `started`;
- whole-study wall time of the `opt-study run` process (Ray start-up and shutdown included).

Launchers: `in_process` with workers: 1 (the DeepSpeed engine in the Tune trial's own process)
and `worker_group` with workers: 2 (a TorchTrainer worker group per trial, cpus_per_worker 0.5).
Trials run as many at a time as the 2 CPUs allow (the default), which is what a user gets. No
target: the numbers say what a trial's start-up costs with each launcher.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

from common import VENV_BIN, Section, child_env, fmt, load1, median, out_path, write_json

TRIALS = 2
LAUNCHERS = {
    "in_process": {"workers": 1, "cpus_per_worker": 1.0},
    "worker_group": {"workers": 2, "cpus_per_worker": 0.5},
}
TIMEOUT_S = 300


def study_yaml(name: str, storage: Path, launcher: str) -> str:
    scale = LAUNCHERS[launcher]
    lrs = ", ".join(str(0.001 * (i + 1)) for i in range(TRIALS))
    return f"""\
study: {{name: {name}, storage: {storage}}}
workload: {{type: tiny_lm, layers: 1, heads: 2, width: 32, context: 16, dropout: 0.0}}
scale: {{workers: {scale["workers"]}, cpus_per_worker: {scale["cpus_per_worker"]}, zero_stage: 2,
        micro_batch_size: 4, launcher: {launcher}}}
training: {{steps: 1, eval_every: 1}}
optimizers:
  - name: adamw
    params: {{lr: {{grid: [{lrs}]}}}}
measure: {{every: 0}}
"""


def run_launcher(launcher: str, tmp: Path) -> dict:
    from opt_study.results.parquet import read_steps
    from opt_study.results.trials import read_trial_records

    name = f"bench-{launcher.replace('_', '-')}"
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(study_yaml(name, tmp / "storage", launcher))
    env = child_env()
    env.pop("RAY_ADDRESS", None)  # always a fresh local cluster, never someone else's
    study_dir = tmp / "storage" / name
    log = tmp / f"{name}.log"
    load = load1()
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [str(VENV_BIN / "opt-study"), "run", str(cfg)], env=env, cwd=tmp, stdout=f, stderr=subprocess.STDOUT
        )
        started = watch_started(proc, study_dir, t0 + TIMEOUT_S)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"opt-study run ({launcher}) exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    trials = []
    for rec in read_trial_records(study_dir):
        rows = read_steps(study_dir, trial_ids=[rec["trial_id"]]).to_pylist()
        first = next(r for r in rows if r["step"] == 0)
        start = rec.get("started", started.get(rec["trial_id"]))
        trials.append(
            {
                "trial_id": rec["trial_id"],
                "status": rec["status"],
                "started_kept_in_final_record": "started" in rec,
                "startup_s": first["time_unix"] - start,
                "trial_s": rec["ended"] - start,
                "start_offset_s": start - t0,
            }
        )
    return {"launcher": launcher, **LAUNCHERS[launcher], "load1": load, "wall_s": wall, "trials": trials}


def watch_started(proc: subprocess.Popen, study_dir: Path, deadline: float) -> dict[str, float]:
    """Poll trials/*.json until `proc` exits; return the first `started` seen per trial."""
    from opt_study.results.trials import read_trial_records

    seen: dict[str, float] = {}
    while proc.poll() is None:
        if time.time() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"opt-study run did not finish in {TIMEOUT_S} s")
        try:
            for rec in read_trial_records(study_dir):
                if "started" in rec:
                    seen.setdefault(rec["trial_id"], rec["started"])
        except (OSError, ValueError):
            pass  # a directory being created; the next poll reads it
        time.sleep(0.1)
    return seen


def main() -> None:
    results = []
    with tempfile.TemporaryDirectory(prefix="optstudy-bench-launch-") as d:
        for launcher in LAUNCHERS:
            results.append(run_launcher(launcher, Path(d)))
            print(f"launcher {json.dumps(results[-1])}", flush=True)
    write_json(out_path(), {"results": results, "trials_per_study": TRIALS})


def summarize(res: dict) -> Section:
    table = [
        [
            "launcher",
            "workers",
            "trials",
            "start-up per trial s (trial start -> step 0 row)",
            "median start-up s",
            "trial duration s (start -> end)",
            "study wall time s",
            "load1",
        ]
    ]
    med = {}
    for r in res["results"]:
        ts = r["trials"]
        med[r["launcher"]] = median(t["startup_s"] for t in ts)
        table.append(
            [
                r["launcher"],
                str(r["workers"]),
                f"{len(ts)} ({', '.join(sorted({t['status'] for t in ts}))})",
                ", ".join(fmt(t["startup_s"]) for t in ts),
                fmt(med[r["launcher"]]),
                ", ".join(fmt(t["trial_s"]) for t in ts),
                fmt(r["wall_s"]),
                fmt(r["load1"]),
            ]
        )
    ok = all(t["status"] == "completed" for r in res["results"] for t in r["trials"])
    notes = [
        f"`opt-study run` of a study with {res['trials_per_study']} one-step trials (tiny_lm, 1 layer, "
        "width 32, ZeRO-2), configs and storage in a temp dir; trials run as many at a time as "
        "the 2 CPUs allow (both at once for either launcher).",
        "Start-up = `time_unix` of the step-0 Parquet row minus `started` in trials/<id>.json; it "
        "includes the first (tiny) step. Study wall time includes Ray's start and shutdown, "
        "MLflow logging and evaluation.",
    ]
    head = ", ".join(f"{k} {fmt(v)} s" for k, v in med.items())
    return Section(
        "2. Launcher start-up: in_process vs worker_group",
        "none (reported)",
        "INFO" if ok else "MISS",
        f"median start-up: {head}",
        table,
        notes,
    )


if __name__ == "__main__":
    main()
