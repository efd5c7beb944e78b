"""What `opt-study run` prints while a study runs: progress (counts, rates, ETA) and nothing else.

Two sources feed `Progress`: the trials' evaluation reports (Tune results, via the recorder) and
a light progress board (`ProgressBoard`, a zero-CPU Ray actor) that each trial's rank 0 writes
to every few seconds between evaluations. The board is not a Tune report on purpose: Tune counts
every report as a training iteration (ASHA's rungs, TPE's results, Ray Train's report barrier
across ranks), so rates and ETA stay out of the results stream.

On a terminal the status block (one summary line and one line per running trial) is redrawn in
place every `TTY_EVERY_S`; elsewhere (CI, log files) it is printed as plain lines every
`PLAIN_EVERY_S`. Trial events (start, evaluation, end) are always printed as one line each.

Step numbering is the Parquet/MLflow one everywhere: `step 19` is the 20th optimizer step (row
`step = 19` in the trial's Parquet steps), printed with the share of the trial's steps done.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass

TTY_EVERY_S = 2.0  # redraw of the live block on a terminal
PLAIN_EVERY_S = 15.0  # a status block in a log file
BOARD_EVERY_S = 5.0  # how often a trial's rank 0 posts its progress (wall time)
RATE_SMOOTHING = 0.5  # weight of the newest rate in the per-trial moving average


def format_duration(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``42s``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _rate(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:.3g}" if v < 1000 else f"{v:,.0f}"


@dataclass
class TrialProgress:
    state: str = "pending"  # pending | running | a final status (completed, stopped, diverged, failed)
    done_steps: int = 0  # optimizer steps finished (the last Parquet step is done_steps - 1)
    seen_at: float | None = None  # driver time of the last progress seen
    steps_per_s: float | None = None
    units_per_s: float | None = None
    loss: float | None = None
    started_at: float | None = None
    first_step_at: float | None = None  # when its first progress was seen: start-up ends
    ended_at: float | None = None


class Progress:
    """Counts, per-trial rates and the study's ETA, and the lines that show them."""

    def __init__(self, trial_ids, steps: int, out=None, tty: bool | None = None, clock=time.time):
        self.out = out or sys.stdout
        self.tty = bool(tty if tty is not None else getattr(self.out, "isatty", lambda: False)())
        self.steps, self.clock = steps, clock
        self.t0 = clock()
        self.trials = {t: TrialProgress() for t in trial_ids}
        self.best: tuple[float, str] | None = None
        self._last_block, self._block_lines = -math.inf, 0
        self.max_running = 0  # the concurrency seen: how many trials the ETA runs at once

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks (the recorder holds this) into tuner.pkl; a stream is not
        # picklable and a copy has nowhere to print but stdout
        return {**self.__dict__, "out": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, out=sys.stdout)

    # ------------------------------------------------------------------------------- updates
    def add(self, trial_id: str) -> TrialProgress:
        return self.trials.setdefault(trial_id, TrialProgress())

    def start(self, trial_id: str) -> None:
        t = self.add(trial_id)
        t.state, t.seen_at = "running", self.clock()
        t.started_at = t.seen_at
        self.max_running = max(self.max_running, self.counts()["running"])
        self.event(trial_id, "RUNNING", "started")

    def update(self, trial_id: str, done_steps: int, units_per_s: float | None = None, loss: float | None = None):
        """A progress observation (``done_steps`` optimizer steps finished); the trial's rate is a
        moving average of the steps per second between observations."""
        t, now = self.add(trial_id), self.clock()
        if done_steps < t.done_steps:  # a board post older than the last evaluation report: stale
            return
        if t.state == "pending":
            t.state, t.started_at = "running", now
        # from the first progress on: the time before it is start-up (Ray, DeepSpeed), not steps
        if t.seen_at is not None and t.done_steps > 0 and done_steps > t.done_steps and now > t.seen_at:
            r = (done_steps - t.done_steps) / (now - t.seen_at)
            t.steps_per_s = r if t.steps_per_s is None else RATE_SMOOTHING * r + (1 - RATE_SMOOTHING) * t.steps_per_s
        if done_steps != t.done_steps or t.seen_at is None:
            t.seen_at = now
        if done_steps > 0 and t.first_step_at is None:
            t.first_step_at = now
        t.done_steps = done_steps
        t.units_per_s = units_per_s if units_per_s is not None else t.units_per_s
        t.loss = loss if loss is not None else t.loss

    def evaluated(self, trial_id: str, done_steps: int, loss: float, eval_loss: float, units_per_s=None) -> None:
        self.update(trial_id, done_steps, units_per_s, loss)
        if math.isfinite(eval_loss) and (self.best is None or eval_loss < self.best[0]):
            self.best = (eval_loss, trial_id)
        self.event(trial_id, "EVAL", f"{self.step_text(done_steps)}  loss {loss:.4f}  eval {eval_loss:.4f}")

    def finish(self, trial_id: str, status: str, text: str) -> None:
        t = self.add(trial_id)
        t.state, t.ended_at = status, self.clock()
        done = sum(t.state not in ("pending", "running") for t in self.trials.values())
        self.event(trial_id, status.upper(), f"{text}  [{done}/{len(self.trials)} done]")

    # ------------------------------------------------------------------------------ numbers
    def step_text(self, done_steps: int) -> str:
        """The last finished step in Parquet numbering, with the share of the trial done."""
        pct = 100 * done_steps / self.steps if self.steps else 0
        return f"step {done_steps - 1 if done_steps else '-':>5} ({pct:3.0f}%)"

    def counts(self) -> dict[str, int]:
        c = {"running": 0, "pending": 0, "done": 0, "diverged": 0, "failed": 0}
        for t in self.trials.values():
            key = t.state if t.state in ("running", "pending") else "done"
            c[key] += 1
            if t.state in ("diverged", "failed"):
                c[t.state] += 1
        return c

    def rates(self) -> tuple[float | None, float | None]:
        """(steps/s, units/s) of the study: the sums over running trials with a rate."""
        running = [t for t in self.trials.values() if t.state == "running"]
        steps = [t.steps_per_s for t in running if t.steps_per_s is not None]
        units = [t.units_per_s for t in running if t.units_per_s is not None]
        return (sum(steps) if steps else None), (sum(units) if units else None)

    def eta(self) -> float | None:
        """Seconds until every trial has ended: the trial time left (running trials) and to come
        (pending ones), run `max_running` at a time. A trial's time is, once one has completed,
        the mean wall time of completed trials; before that, the mean start-up seen (Ray,
        DeepSpeed: it dominates short trials) plus its steps at the mean per-trial rate. An upper
        bound under ASHA, which stops trials early; None before anything is known."""
        now, live = self.clock(), [t for t in self.trials.values() if t.state in ("pending", "running")]
        if not live:
            return 0.0
        done = [t.ended_at - t.started_at for t in self.trials.values() if t.state == "completed" and t.started_at]
        if done:
            mean = sum(done) / len(done)
            work = sum(mean if t.state == "pending" else max(0.0, mean - (now - (t.started_at or now))) for t in live)
            return work / max(self.max_running, 1)
        rates = [t.steps_per_s for t in self.trials.values() if t.steps_per_s]
        startups = [t.first_step_at - t.started_at for t in self.trials.values() if t.first_step_at and t.started_at]
        if not rates or not startups:
            return None
        rate, startup = sum(rates) / len(rates), sum(startups) / len(startups)
        work = 0.0
        for t in live:
            if t.state == "pending" or not t.first_step_at:  # still to start up (or starting)
                work += max(0.0, startup - (now - t.started_at if t.started_at else 0.0))
            work += (self.steps - t.done_steps) / (t.steps_per_s or rate)
        return work / max(self.max_running, 1)

    # ------------------------------------------------------------------------------ output
    def _stamp(self) -> str:
        return f"[{format_duration(self.clock() - self.t0):>6}]"

    def summary_line(self) -> str:
        c, (sps, ups) = self.counts(), self.rates()
        extra = ", ".join(f"{c[k]} {k}" for k in ("diverged", "failed") if c[k])
        best = f"  best {self.best[1]} eval {self.best[0]:.4f}" if self.best else ""
        return (
            f"{self._stamp()} {c['running']} running  {c['pending']} pending  {c['done']} done"
            f"{f' ({extra})' if extra else ''}  {_rate(sps)} steps/s  {_rate(ups)} units/s"
            f"  ETA {format_duration(self.eta())}{best}"
        )

    def block(self) -> list[str]:
        """The status block: the summary line, then one line per running trial."""
        lines = [self.summary_line()]
        for tid, t in sorted(self.trials.items()):
            if t.state == "running" and not t.done_steps:
                since = format_duration(self.clock() - (t.started_at or self.clock()))
                lines.append(f"    {tid:<24} starting (Ray, DeepSpeed) for {since}")
            elif t.state == "running":
                lines.append(
                    f"    {tid:<24} {self.step_text(t.done_steps)}  {_rate(t.steps_per_s)} steps/s"
                    f"  {_rate(t.units_per_s)} units/s" + (f"  loss {t.loss:.4f}" if t.loss is not None else "")
                )
        return lines

    def event(self, trial_id: str, state: str, text: str) -> None:
        self._clear_block()
        self._write(f"{self._stamp()} {trial_id:<24} {state:<9} {text}\n")
        if self.tty:
            self._draw_block()

    def tick(self, force: bool = False) -> None:
        """Print (or, on a terminal, redraw) the status block when it is due."""
        every = TTY_EVERY_S if self.tty else PLAIN_EVERY_S
        if not force and self.clock() - self._last_block < every:
            return
        self._clear_block()
        self._draw_block()

    def close(self) -> None:
        """Leave the final status block on screen as plain lines."""
        self._clear_block()
        self._block_lines = 0
        self._write("".join(line + "\n" for line in self.block()))

    def _draw_block(self) -> None:
        lines = self.block()
        self._write("".join(line + "\n" for line in lines))
        self._last_block = self.clock()
        self._block_lines = len(lines) if self.tty else 0

    def _clear_block(self) -> None:
        if self.tty and self._block_lines:  # cursor up over the block, erase to the end of the screen
            self._write(f"\x1b[{self._block_lines}F\x1b[J")
            self._block_lines = 0

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


# ------------------------------------------------------------------------ the progress board
def progress_board():
    """A zero-CPU actor holding each trial's latest progress post (``put``) for the driver to
    read (``snapshot``). Owned by the driver: it ends with the run."""
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        def __init__(self):
            self.latest: dict[str, dict] = {}

        def put(self, trial_id: str, info: dict) -> None:
            self.latest[trial_id] = info

        def snapshot(self) -> dict[str, dict]:
            return dict(self.latest)

    return ProgressBoard.remote()


def board_poster(board, trial_id: str):
    """The `progress` callable a trial's rank 0 gets: posts without waiting (fire and forget)."""
    if board is None:
        return None
    return lambda info: board.put.remote(trial_id, info)


# --------------------------------------------------------------------------------- quiet run
# Lines other libraries print on the driver that say nothing to a study's user; with -v they stay.
NOISE = (
    # Ray's raylet, when many workers start at once (worker groups of fractional-CPU ranks)
    re.compile(r"PYTHON worker processes have been started on node"),
    # tensorboardX, from Tune's default TensorBoard logger, on a NaN metric (eval_loss between evaluations)
    re.compile(r"^NaN or Inf found in input tensor"),
)
QUIET_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0",  # Tune's legacy reporter, silent at verbose=0: no configuration box
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # no "Creating initial MLflow database tables" INFO lines
}
QUIET_LOGGERS = ("mlflow", "alembic", "ray.tune", "ray.train")


class _LineFilter:
    """A text stream that drops whole lines matching NOISE and passes everything else on."""

    def __init__(self, stream):
        self.stream, self._buf = stream, ""

    def write(self, text: str) -> int:
        self._buf += text
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            if not any(p.search(line) for p in NOISE):
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self._buf and not any(p.search(self._buf) for p in NOISE):
            self.stream.write(self._buf)
        self._buf = ""
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding: the wrapped stream's
        return getattr(self.stream, name)


@contextlib.contextmanager
def quiet(verbose: bool = False):
    """A study run without Ray's and MLflow's banners and warnings (unless ``verbose``): the
    environment Tune and MLflow read, their loggers at WARNING, and NOISE lines dropped from
    stdout and stderr. Warnings and errors of substance (a dead worker, an OOM kill) still show."""
    if verbose:
        yield
        return
    # for the rest of the process, not restored: Ray prints a trial's error again, as an
    # "Unhandled error" with its traceback, when it frees the trial's abandoned result at exit
    # (after a study-stopping error such as a full disk). The error is already reported: by Tune,
    # in the trial's record and in trials/<id>.error.txt.
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    saved_env = {k: os.environ.get(k) for k in QUIET_ENV}
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    levels = {n: logging.getLogger(n).level for n in QUIET_LOGGERS}
    for n in QUIET_LOGGERS:
        logging.getLogger(n).setLevel(logging.WARNING)
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _LineFilter(out), _LineFilter(err)
    try:
        yield
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        sys.stdout, sys.stderr = out, err
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
