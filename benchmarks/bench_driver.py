"""Driver overhead per trial over a study of many tiny trials (issue 16, item 3).

Run as `python benchmarks/bench_driver.py OUT.json [TRIALS]` (default 1,000). It runs, in this
process, the study a user gets from `opt-study run` (`run_study`: Ray Tune, the recorder, the
trials table, MLflow on SQLite through its queue) with TRIALS tiny trials: quadratic (dim 4), 3
steps, in_process, checkpoint_every 0, measurement off, one CPU each on a local Ray of 2 CPUs.

What is measured (the product is not instrumented; the benchmark wraps the recorder's methods):

- per trial, the time Tune's event loop spent in the recorder's callbacks: the trial's own
  (on_trial_start / _result / _complete / _error) plus the loop's `on_step_end` calls since the
  previous trial ended; that is the driver overhead the issue's target (<= 0.5 s, flat) is about;
- the driver process's CPU seconds per trial (everything: Tune, Ray's client, the recorder and
  its background worker), and the wall seconds per trial;
- the driver's RSS (psutil) after trial 100 and at the end;
- per trial, the time of its jobs on the recorder's worker thread (off the loop: its record,
  compaction, read-back, MLflow).

Every number is reported per hundred trials, so growth with the study's size shows.

`python benchmarks/bench_driver.py OUT.json TRIALS recorder` runs the recorder alone, as Tune's
loop drives it, for TRIALS trials without Ray (a real StudyRecorder, each trial's 3 step rows
written by the real StepWriter, the real trials table and MLflow SQLite through its queue; the
Tune Trial is a stand-in holding the trial's config and last result): the per-trial loop time
without the noise of trial start-up, at study sizes this loaded 2-core machine cannot run
through Ray in the time of one benchmark. The time the recorder's worker thread still needs
after the last trial (its backlog; a real trial's own run time hides it) is reported too.

`BENCH_DRIVER_CODE=DIR` runs the opt_study package found in DIR (e.g. a `git archive` of an
older commit) instead of this checkout's: the before/after comparison.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import child_env, load1  # noqa: E402

CODE = os.environ.get("BENCH_DRIVER_CODE")  # another opt_study to measure (before/after)
if CODE:
    sys.path.insert(0, CODE)

CALLBACKS = ("on_trial_start", "on_trial_result", "on_trial_complete", "on_trial_error", "on_step_end")
WORKER_JOBS = ("_started", "_record_end")  # the recorder's worker-thread jobs (absent before the change)


def spec_for(storage: Path, trials: int):
    from opt_study.validate import parse_study

    lrs = [round(0.001 + 0.0001 * i, 6) for i in range(trials)]
    doc = {
        "study": {"name": "driverbench", "storage": str(storage), "seeds": [0]},
        "workload": {"type": "quadratic", "dim": 4, "cols": 2},
        "scale": {"workers": 1, "cpus_per_worker": 1, "launcher": "in_process"},
        "training": {"steps": 3, "eval_every": 3, "checkpoint_every": 0},
        "optimizers": [{"name": "sgd", "params": {"lr": {"grid": lrs}}}],
        "measure": {"every": 0},
    }
    return parse_study(doc, str(storage / "driverbench.yaml"))


class Meter:
    """Loop time per trial: the wrapped callbacks' durations, attributed to the trial that ends."""

    def __init__(self, partial: Path | None = None):
        import psutil

        self.partial = partial  # rewritten every 25 trials: a run stopped early still says something

        self.proc = psutil.Process()
        self.loop_s = 0.0  # loop time since the last trial ended
        self.worker_s: list[float] = []  # per finished trial, in order: its worker jobs' time
        self._worker_acc = 0.0
        self.rows: list[dict] = []
        self.t0 = time.perf_counter()
        self.cpu0 = self._cpu()
        self.rss_100: float | None = None

    def _cpu(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system

    def wrap(self, cls, name: str) -> None:
        orig = getattr(cls, name)
        meter = self

        @functools.wraps(orig)
        def timed(self_, *a, **kw):
            t = time.perf_counter()
            try:
                return orig(self_, *a, **kw)
            finally:
                meter.loop_s += time.perf_counter() - t
                if name in ("on_trial_complete", "on_trial_error"):
                    meter.trial_ended()

        setattr(cls, name, timed)

    def wrap_worker(self, cls, name: str) -> None:
        if not hasattr(cls, name):
            return
        orig = getattr(cls, name)
        meter = self

        @functools.wraps(orig)
        def timed(self_, *a, **kw):
            t = time.perf_counter()
            try:
                return orig(self_, *a, **kw)
            finally:
                meter._worker_acc += time.perf_counter() - t
                if name == "_record_end":
                    meter.worker_s.append(meter._worker_acc)
                    meter._worker_acc = 0.0

        setattr(cls, name, timed)

    def trial_ended(self) -> None:
        self.rows.append({"loop_s": self.loop_s, "t": time.perf_counter() - self.t0, "cpu": self._cpu() - self.cpu0})
        self.loop_s = 0.0
        if len(self.rows) == 100:
            self.rss_100 = self.proc.memory_info().rss / 2**20
        if self.partial is not None and len(self.rows) % 25 == 0:
            rss = self.proc.memory_info().rss / 2**20
            done = {"done": len(self.rows), "rss_mib_at_100": self.rss_100, "rss_mib_now": rss}
            blocks = per_hundred(self.rows, self.worker_s)
            self.partial.write_text(json.dumps({**done, "per_hundred": blocks}, indent=1))


def per_hundred(rows: list[dict], worker_s: list[float]) -> list[dict]:
    out, prev_t, prev_cpu = [], 0.0, 0.0
    for i in range(0, len(rows), 100):
        block = rows[i : i + 100]
        n = len(block)
        out.append(
            {
                "trials": f"{i + 1}-{i + n}",
                "loop_s_per_trial": sum(r["loop_s"] for r in block) / n,
                "loop_s_max": max(r["loop_s"] for r in block),
                "wall_s_per_trial": (block[-1]["t"] - prev_t) / n,
                "cpu_s_per_trial": (block[-1]["cpu"] - prev_cpu) / n,
                "worker_s_per_trial": sum(worker_s[i : i + 100]) / n if worker_s else None,
            }
        )
        prev_t, prev_cpu = block[-1]["t"], block[-1]["cpu"]
    return out


def recorder_only(meter: Meter, storage: Path, trials: int) -> float:
    """The recorder driven as Tune's loop drives it, trial after trial; the worker's backlog (s)."""
    from types import SimpleNamespace

    from opt_study.plan.planners import plan_trials
    from opt_study.results.mlflow_queue import QueuedSink
    from opt_study.results.parquet import StepWriter
    from opt_study.results.query import experiment_name
    from opt_study.results.trials import write_trials_table
    from opt_study.study.recorder import StudyRecorder
    from opt_study.study.resources import trial_resources

    spec = spec_for(storage, trials)
    plans = plan_trials(spec)
    sink = QueuedSink(spec.study_dir, spec.tracking_uri, experiment_name(spec.study.name))
    parent = sink.parent_run(spec.study.name, params={}, tags={})
    rec = StudyRecorder(spec, plans, trial_resources(spec), sink, parent, out=open(os.devnull, "w"))
    for p in plans:  # as opt_study.study.run._run_batch does before Tune starts
        rec.record(p, "pending")
    write_trials_table(spec.study_dir)
    for p in plans:
        trial = SimpleNamespace(config={"trial": p.as_dict()}, last_result={"status": "completed", "nodes": "n0"})
        rec.on_trial_start(0, [], trial)
        with StepWriter(spec.study_dir, p.trial_id, 0, 0) as w:  # the trial's own work: not timed
            for step in range(3):
                w.append({"step": step, "loss": 1.0 / (step + 1), "eval_loss": 2.0 - step})
        rec.on_trial_result(0, [], trial, {"step": 3, "loss": 0.3, "eval_loss": 0.0})
        rec.on_step_end(0, [])
        rec.on_trial_complete(0, [], trial)
    t = time.perf_counter()
    if hasattr(rec, "join"):
        rec.join()
    write_trials_table(spec.study_dir)  # once at the end, as _run_batch does
    return time.perf_counter() - t


def main(out: str, trials: int, mode: str = "study") -> None:
    os.environ.update(child_env())
    if CODE:
        os.environ["PYTHONPATH"] = os.pathsep.join((CODE, os.environ["PYTHONPATH"]))
    import ray

    from opt_study.study.recorder import StudyRecorder
    from opt_study.study.run import run_study

    meter = Meter(Path(out + ".partial"))
    for name in CALLBACKS:
        meter.wrap(StudyRecorder, name)
    for name in WORKER_JOBS:
        meter.wrap_worker(StudyRecorder, name)
    load_before = load1()
    backlog = None
    with tempfile.TemporaryDirectory(prefix="drvbench") as tmp:
        start = time.perf_counter()
        if mode == "recorder":
            backlog = recorder_only(meter, Path(tmp), trials)
        else:
            spec = spec_for(Path(tmp), trials)
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            run_study(spec, out=open(os.devnull, "w"))
            ray.shutdown()
        total = time.perf_counter() - start
        rss_end = meter.proc.memory_info().rss / 2**20
    result = {
        "mode": mode,
        "code": CODE or "checkout",
        "worker_backlog_s": backlog,
        "trials": trials,
        "done": len(meter.rows),
        "total_s": total,
        "load1_before": load_before,
        "load1_after": load1(),
        "rss_mib_at_100": meter.rss_100,
        "rss_mib_at_end": rss_end,
        "per_hundred": per_hundred(meter.rows, meter.worker_s),
    }
    Path(out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1000, *sys.argv[3:4])
