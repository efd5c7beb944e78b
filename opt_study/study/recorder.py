"""Driver-side recording of a study: the trials table, MLflow, and the live progress
(opt_study.study.console).

Runs in the `opt-study run` process only (a Tune Callback), so one process writes the trials table
and MLflow: no SQLite write contention between trials, and MLflow never sits on a worker's step
path. Per-trial summaries are computed from the trial's Parquet rows (the source of truth), not
from Tune's result objects.

Tune calls its callbacks on its event loop, which also starts trials and collects their results:
the per-trial work that does I/O (the trial's record, compaction and read-back of its steps,
its checkpoints' removal, MLflow delivery) runs on the recorder's one worker thread instead, in
the order it was asked for, so a study of thousands of trials keeps the loop's cost per trial
flat. Each job touches its own trial only; the trials table (`trials.parquet`, a snapshot of
every record) is written once per batch by `opt_study.study.run`. A job's exception stops the
study at the loop's next step (`on_step_end`) or at `join`.
"""

from __future__ import annotations

import collections
import logging
import math
import re
import sys
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ray.tune import Callback

from opt_study.config import Spec
from opt_study.measure.metrics import summarize
from opt_study.plan import TrialPlan
from opt_study.plan.fingerprint import config_hash
from opt_study.results import compact, parquet
from opt_study.results import trials as trials_tbl
from opt_study.results.mlflow_sink import TAG_ENDED, TAG_STARTED, trial_metrics
from opt_study.results.sink import Sink
from opt_study.results.trials import DONE_STATUSES
from opt_study.storage import layout, objectstore
from opt_study.study.console import TTY_EVERY_S, Progress
from opt_study.trial import checkpoint


def trial_summary(rows: list[dict], target: dict | None = None) -> dict[str, float]:
    """Final/best losses, time-to-target (AlgoPerf) and the measurement summary of a trial's rows."""
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    evals = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None and math.isfinite(r["eval_loss"])]
    out = {
        "steps_done": float(len(rows)),
        "final_loss": losses[-1] if losses else math.nan,
        "best_loss": min((x for x in losses if math.isfinite(x)), default=math.nan),
        "final_eval_loss": evals[-1] if evals else math.nan,
        "best_eval_loss": min(evals, default=math.nan),
    }
    times = [r["step_time_s"] for r in rows if r.get("step_time_s") is not None]
    if times:
        out["mean_step_time_s"] = sum(times) / len(times)
    if target:  # AlgoPerf's time-to-target: the first row reaching the target value
        hit = next(
            (r for r in rows if r.get(target["metric"]) is not None and r[target["metric"]] <= target["value"]), None
        )
        out["steps_to_target"] = float(hit["step"] + 1) if hit else math.nan
        out["time_to_target_s"] = hit["time_unix"] - rows[0]["time_unix"] if hit else math.nan
    measured = [r for r in rows if r.get("measured")]
    if measured:
        out.update(summarize(measured))
    return out


# The line of a traceback that names the exception: `ValueError: msg`, `pkg.mod.Error: msg`, Ray's
# `ray.exceptions.RayTaskError(ValueError): ...`, or a bare `KeyError`.
_EXC_LINE = re.compile(
    r"(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Failure)\b(?:\([\w.]+\))?(?::.*)?"
)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its traceback headers


def trial_error(trial, study_dir: Path, trial_id: str) -> str:
    """What a failed trial's record says: the exception's type and message, and where the full
    traceback is. Ray 2.60 keeps it in the trial's `error.txt` (its Trial has no `error_msg`), in
    Ray's temporary session folder: the tracebacks are copied to
    trials/<trial_id>.error.txt, which the record names."""
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text(errors="replace") if path else (trial.get_error() or "")
    except OSError:
        text = ""
    last = text.rsplit("Failure # ", 1)[-1]  # the file accumulates every failure of the trial
    lines = [ln.strip() for ln in last.splitlines() if _EXC_LINE.fullmatch(ln.strip())]
    what = lines[-1] if lines else "trial failed (no error recorded by Ray)"
    if not last.strip():
        return what[:1500]
    kept = layout.trial_error_path(study_dir, trial_id)
    layout.atomic_write_bytes(kept, _ANSI.sub("", text).encode(), mode=0o600)  # every failure, plain
    return f"{what[:1500]} (traceback: {kept})"


def _drop_trial_tracebacks(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Trial task failed for trial")


class StudyRecorder(Callback):
    def __init__(
        self,
        spec: Spec,
        plans: list[TrialPlan],
        resources: dict,
        sink: Sink,
        parent_run_id: str | None,
        out=None,
        board=None,
    ):
        self.spec, self.resources, self.sink, self.parent = spec, resources, sink, parent_run_id
        self.plans = {p.trial_id: p for p in plans}
        self.progress = Progress(self.plans, spec.training.steps, out or sys.stdout)
        self.board, self._polled = board, -math.inf  # trials' posts between evaluations (console.ProgressBoard)
        self.started: dict[str, float] = {}  # kept here: a record is rewritten whole at the end
        self.n_done = 0  # trials whose final record is written (by the worker; read after join)
        self._worker: ThreadPoolExecutor | None = None
        self._errors: collections.deque = collections.deque()  # exceptions of failed jobs, oldest first
        self._finished: collections.deque = collections.deque()  # progress lines of ended trials

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks into the experiment state: no thread or future goes along
        return {**self.__dict__, "_worker": None, "_errors": collections.deque(), "_finished": collections.deque()}

    # ------------------------------------------------------------------------ the worker thread
    def _submit(self, fn, *args) -> None:
        """Run ``fn(*args)`` on the worker thread, after every job submitted before it."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opt-study-recorder")
        self._worker.submit(fn, *args).add_done_callback(self._note_error)  # O(1): no list of jobs

    def _note_error(self, job: Future) -> None:
        if job.exception() is not None:
            self._errors.append(job.exception())

    def _wait(self) -> None:
        """Let every submitted job finish (no error raised here: see `join`)."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        self._show_finished()

    def _raise_failed(self) -> None:
        if self._errors:
            raise self._errors.popleft()

    def join(self) -> None:
        """Wait for the worker's jobs; raise the first one's exception, if any failed."""
        self._wait()
        self._raise_failed()

    def _show_finished(self) -> None:
        """Print the lines of the trials the worker finished (on the loop: Progress is not shared)."""
        while self._finished:
            self.progress.finish(*self._finished.popleft())

    # ------------------------------------------------------------------------ trials table rows
    def record(self, plan: TrialPlan, status: str, **extra) -> dict:
        rec = {
            "trial_id": plan.trial_id,
            "study": self.spec.study.name,
            "optimizer": plan.optimizer,
            "label": plan.label,
            "workload": self.spec.workload.type,
            "seed": plan.seed,
            "hparams": dict(plan.hparams),
            "config_hash": config_hash(self.spec, plan),  # what it ran with (opt_study.plan.fingerprint)
            "status": status,
            "resources": self.resources,
            "phase": plan.phase,
            "budget": plan.budget,
            **extra,
        }
        trials_tbl.write_trial_record(self.spec.study_dir, rec)
        return rec

    def _plan(self, trial) -> TrialPlan:
        """The plan the trial runs, from its Tune config: a TPE trial's hyperparameters exist
        only there (opt_study.plan.tpe proposes them when Tune asks), never in `plans`."""
        plan = TrialPlan(**trial.config["trial"])
        self.plans[plan.trial_id] = plan
        return plan

    # -------------------------------------------------------------------------- Tune callbacks
    def setup(self, **info):
        # A failed trial's record carries its error and the path of its traceback, and its
        # progress line says what failed: Tune's own multi-page traceback on stderr goes.
        logging.getLogger("ray.tune.execution.tune_controller").addFilter(_drop_trial_tracebacks)

    def on_trial_start(self, iteration, trials, trial, **info):
        plan = self._plan(trial)
        self.started[plan.trial_id] = time.time()
        self._submit(self._started, plan, self.started[plan.trial_id])
        self.progress.start(plan.trial_id)

    def _started(self, plan: TrialPlan, started: float) -> None:
        self.record(plan, "running", started=started)
        self._log_trial(plan, "running", {}, [])  # the child run starts with the trial: real durations

    def on_trial_result(self, iteration, trials, trial, result, **info):
        plan = self._plan(trial)
        ev = result.get("eval_loss", math.nan)
        self.progress.evaluated(
            plan.trial_id,
            int(result.get("step", 0)),  # steps done; printed as the last Parquet step
            float(result.get("loss", math.nan)),
            ev if isinstance(ev, float) else math.nan,
            result.get("units_per_s"),
        )

    def on_step_end(self, iteration, trials, **info):
        """Tune's loop, many times a second: read the trials' progress posts, redraw when due."""
        self._raise_failed()
        self._show_finished()
        now = time.time()
        if self.board is not None and now - self._polled >= TTY_EVERY_S:
            self._polled = now
            self._poll_board()
        self.progress.tick()

    def _poll_board(self) -> None:
        import ray

        try:
            posts = ray.get(self.board.snapshot.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - progress is a display; a slow or lost board never stops the study
            return
        for tid, p in posts.items():
            if self.progress.trials.get(tid) is not None and self.progress.trials[tid].state == "running":
                self.progress.update(tid, int(p["step"]), p.get("units_per_s"), p.get("loss"))

    def on_experiment_end(self, trials, **info):
        self._wait()  # every trial's line is printed before the summary
        self.progress.close()

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        status = last.get("status", "stopped")
        if status == "running":  # the scheduler stopped it at a report boundary
            status = "stopped"
        self._finish(trial, status, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, "failed", trial_error(trial, self.spec.study_dir, self._plan(trial).trial_id))

    def _finish(self, trial, status: str, error: str | None) -> None:
        plan = self._plan(trial)
        nodes = (trial.last_result or {}).get("nodes", "")
        self._submit(self._record_end, plan, status, error, nodes, self.started.get(plan.trial_id))

    def _record_end(self, plan: TrialPlan, status: str, error: str | None, nodes: str, started) -> None:
        """A trial's end, on the worker: its steps compacted and summarized, its final record,
        its checkpoints removed, its child run updated. Touches this trial's files only."""
        # an object-store root: the rows the trial's rank 0 uploaded, wherever it ran
        objectstore.pull(layout.trial_steps_dir(self.spec.study_dir, plan.trial_id), exact=False)
        if status in DONE_STATUSES:
            self._compact(plan.trial_id)
        rows = parquet.read_steps(self.spec.study_dir, trial_ids=[plan.trial_id]).to_pylist()
        summary = trial_summary(rows, getattr(plan, "target", None))
        ended = time.time()
        self.record(plan, status, summary=summary, started=started, ended=ended, error=error, nodes=nodes)
        if status in DONE_STATUSES:  # recorded finished: its checkpoints are no longer needed
            checkpoint.remove(self.spec.study_dir, plan.trial_id)
            # and an earlier failure's tracebacks, which the record no longer names
            layout.remove_tree(layout.trial_error_path(self.spec.study_dir, plan.trial_id))
        self._log_trial(plan, status, summary, rows, ended)
        self.n_done += 1
        self._finished.append(
            (
                plan.trial_id,
                status,
                f"loss {summary['final_loss']:.4f}  best eval {summary['best_eval_loss']:.4f}"
                + (f"  {error}" if error else ""),
            )
        )

    def _log_trial(
        self, plan: TrialPlan, status: str, summary: dict, rows: list[dict], ended: float | None = None
    ) -> None:
        """The trial's child run: its params, tags, summary and curves (the sink downsamples;
        names and prefixes: opt_study.results.mlflow_sink.trial_metrics)."""
        values, curves = trial_metrics(summary, rows, plan.hparams)
        params = {
            "optimizer": plan.optimizer,
            **{f"hp.{k}": v for k, v in plan.hparams.items()},
            "seed": plan.seed,
            "zero_stage": self.spec.scale.zero_stage,
            "workers": self.spec.scale.workers,
            "precision": self.spec.scale.precision,
            "micro_batch_size": self.spec.scale.micro_batch_size,
            "grad_accum": self.spec.scale.grad_accum,
            "steps": self.spec.training.steps,
        }
        tags = {
            "opt_study.workload": self.spec.workload.type,
            "opt_study.optimizer": plan.optimizer,
            "opt_study.label": plan.label,
            "opt_study.seed": str(plan.seed),
            "opt_study.config_hash": config_hash(self.spec, plan),
            TAG_STARTED: str(self.started.get(plan.trial_id, "")),
            TAG_ENDED: "" if ended is None else str(ended),
        }
        self.sink.log_trial(self.parent, plan.trial_id, params, tags, values, curves, status)

    def _compact(self, trial_id: str) -> None:
        """A finished trial's chunks become one file per attempt (opt_study.results.compact), so
        queries over thousands of trials open few files. Crash-safe and rerunnable; a bad
        chunk is reported and left as it is."""
        try:
            compact.compact_trial(self.spec.study_dir, trial_id)
        except (ValueError, OSError) as e:
            warnings.warn(f"{trial_id}: steps not compacted: {e}", stacklevel=2)
