"""Faults injected for real: a rank process of a 2-rank trial (a pool slot's PoolRank under the default
launcher) SIGKILLed mid-trial, and the `opt-study run`
driver SIGKILLed mid-study then `opt-study resume`. Assertions read the stored data: Parquet rows
per step, attempts, trial records, MLflow runs."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import duckdb
import psutil
import pytest

from opt_study.results.parquet import read_steps
from opt_study.results.trials import read_trial_records
from opt_study.study.recorder import StudyRecorder
from opt_study.study.run import run_study
from opt_study.validate import load_study

import specs
from cli_process import start_cli

pytestmark = pytest.mark.slow


def _raw_rows(study_dir: Path):
    return duckdb.sql(f"SELECT * FROM read_parquet('{study_dir}/steps/**/*.parquet', hive_partitioning=true)")


def _runs(spec):
    import mlflow

    mlflow.set_tracking_uri(spec.tracking_uri)
    return mlflow.search_runs(experiment_names=[f"opt_study/{spec.study.name}"])


def _kill_one_train_worker_when(cond, launcher: str, timeout=300) -> dict:
    """Background: once cond() holds, SIGKILL one rank process of the trial (a pool slot's
    PoolRank actor, or a Ray Train worker); report what was killed."""
    out: dict = {}
    name = "PoolRank" if launcher == "pool" else "RayTrainWorker"

    def run():
        t0 = time.time()
        while time.time() - t0 < timeout:
            if cond():
                procs = [
                    p for p in psutil.process_iter(["pid", "cmdline"]) if name in " ".join(p.info["cmdline"] or [])
                ]
                if procs:
                    out["pid"] = procs[0].pid
                    out["rows_at_kill"] = cond.rows
                    os.kill(procs[0].pid, signal.SIGKILL)
                    return
            time.sleep(0.2)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    out["thread"] = th
    return out


class RowsAtLeast:
    def __init__(self, study_dir: Path, n: int):
        self.study_dir, self.n, self.rows = study_dir, n, 0

    def __call__(self) -> bool:
        try:
            self.rows = read_steps(self.study_dir).num_rows
        except Exception:  # noqa: BLE001 - the dataset may not exist yet
            return False
        return self.rows >= self.n


def test_worker_killed_mid_trial_resumes_from_checkpoint(ray_cluster, spec_factory, monkeypatch):
    spec = spec_factory(
        file="killworker.yaml",
        study={"name": "killworker"},
        workload={"type": "tiny_lm", "layers": 2, "heads": 2, "width": 64, "context": 32},
        scale={"workers": 2, "cpus_per_worker": 0.5, "zero_stage": 1, "micro_batch_size": 8},
        training={"steps": 160, "eval_every": 40, "checkpoint_every": 20, "max_failures": 2},
        optimizers=[{"name": "adamw", "params": {"lr": 0.003}}],
        measure={"every": 10},
    )
    seen = []  # (step, training_iteration) of every result Tune delivered to the driver
    on_result = StudyRecorder.on_trial_result

    def watch(self, iteration, trials, trial, result, **info):
        seen.append((result.get("step"), result.get("training_iteration")))
        return on_result(self, iteration, trials, trial, result, **info)

    monkeypatch.setattr(StudyRecorder, "on_trial_result", watch)
    killer = _kill_one_train_worker_when(RowsAtLeast(spec.study_dir, 50), spec.scale.resolved_launcher)
    run_study(spec, out=io.StringIO())
    killer["thread"].join(timeout=1)
    assert "pid" in killer, "the worker was never killed (trial too fast?)"

    (rec,) = read_trial_records(spec.study_dir)
    assert rec["status"] == "completed"
    rows = read_steps(spec.study_dir).to_pylist()
    assert [r["step"] for r in rows] == list(range(160))  # every step exactly once
    raw = _raw_rows(spec.study_dir)
    attempts = raw.query(
        "raw", "SELECT attempt, min(step), max(step), count(*) FROM raw GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert len(attempts) >= 2, attempts
    # the restarted attempt began at a checkpoint (a multiple of 20) at or before the kill
    start = attempts[1][1]
    assert start % 20 == 0 and 0 < start <= killer["rows_at_kill"] + 20
    assert {r["attempt"] for r in rows if r["step"] >= start} == {attempts[-1][0]}
    runs = _runs(spec)
    children = runs[runs["tags.opt_study.trial_id"].notna()]
    assert len(children) == 1 and children.iloc[0]["status"] == "FINISHED"
    import mlflow

    hist = mlflow.tracking.MlflowClient(spec.tracking_uri).get_metric_history(children.iloc[0]["run_id"], "train/loss")
    steps = [m.step for m in hist]
    assert len(steps) == len(set(steps))  # no metric point twice
    # Tune saw each evaluation once: the restarted group's repeats stopped at the controller, so
    # Tune's own counter (training_iteration, ASHA's rungs) matches the evaluations made
    # (steps done at each evaluation). Ray Train's controller collects reports on a poll, so a
    # group killed soon after reporting loses them (on a quiet machine both the step-40 and the
    # step-80 reports were lost): each checkpoint carries every report made so far and the
    # restarted group repeats them (run_trial's repeat_report); the controller drops the repeats
    # it had forwarded
    assert seen == [(40, 1), (80, 2), (120, 3), (160, 4)], seen


def _write_study(tmp_path: Path) -> Path:
    return specs.write_spec(
        tmp_path / "killdriver.yaml",
        tmp_path / "store",
        study={"name": "killdriver"},
        workload={"dim": 32, "cols": 8},
        scale={"workers": 1, "cpus_per_worker": 1, "zero_stage": 0, "micro_batch_size": 8},
        training={"steps": 400, "eval_every": 50},
        optimizers=[{"name": "sgd", "params": {"lr": {"grid": [0.001, 0.002, 0.003, 0.004]}}}],
        search={"max_concurrent_trials": 1},
    )


def test_driver_killed_then_resume_finishes_without_rerunning(tmp_path):
    f = _write_study(tmp_path)
    spec = load_study(f)
    proc = start_cli(["run", str(f)], new_session=True)
    t0 = time.time()
    while time.time() - t0 < 300:  # kill once one trial is finished and another is under way
        done = (
            [r for r in read_trial_records(spec.study_dir) if r["status"] == "completed"]
            if (spec.study_dir / "trials").exists()
            else []
        )
        running = (
            [r for r in read_trial_records(spec.study_dir) if r["status"] == "running"]
            if (spec.study_dir / "trials").exists()
            else []
        )
        if done and running:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the study never reached a finished + a running trial")
    proc.send_signal(signal.SIGKILL)  # the driver only: a crash, not a clean shutdown
    proc.wait()
    os.killpg(proc.pid, signal.SIGKILL)  # then what it left behind (its local Ray)
    finished = {r["trial_id"] for r in read_trial_records(spec.study_dir) if r["status"] == "completed"}
    chunks_before = {
        tid: sorted(p.name for p in (spec.study_dir / "steps" / f"trial_id={tid}").rglob("*.parquet"))
        for tid in finished
    }

    res = start_cli(["resume", str(spec.study_dir)], new_session=True)
    out, _ = res.communicate(timeout=600)
    assert res.returncode == 0, out[-3000:]
    recs = {r["trial_id"]: r for r in read_trial_records(spec.study_dir)}
    assert len(recs) == 4 and all(r["status"] == "completed" for r in recs.values())
    for tid in finished:  # finished trials were not rerun: not one new chunk
        chunks = sorted(p.name for p in (spec.study_dir / "steps" / f"trial_id={tid}").rglob("*.parquet"))
        assert chunks == chunks_before[tid], tid
    rows = duckdb.from_arrow(read_steps(spec.study_dir))
    per = rows.query("rows", "SELECT trial_id, count(*), count(DISTINCT step) FROM rows GROUP BY 1").fetchall()
    assert sorted(per) == sorted((tid, 400, 400) for tid in recs)
    runs = _runs(spec)  # MLflow agrees with Parquet: one parent, one finished child per trial
    assert (runs["tags.opt_study.role"] == "parent").sum() == 1
    children = runs[runs["tags.opt_study.trial_id"].notna()]
    assert sorted(children["tags.opt_study.trial_id"]) == sorted(recs)
    assert set(children["status"]) == {"FINISHED"}
