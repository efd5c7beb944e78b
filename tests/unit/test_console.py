"""The study console (opt_study.study.console): counts, per-trial rates, the study's ETA, the
plain lines written to a log file, the in-place redraw on a terminal, and the noise filter."""

from __future__ import annotations

import io
import logging
import os
import sys

import pytest

from opt_study.study import console
from opt_study.study.console import Progress, format_duration


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _progress(tty=False, trials=("a", "b", "c"), steps=100):
    clock, out = Clock(), io.StringIO()
    return Progress(list(trials), steps, out, tty=tty, clock=clock), clock, out


def test_durations():
    assert [format_duration(s) for s in (0, 42.4, 65, 3600 + 120 + 5, None, float("nan"))] == [
        "0s",
        "42s",
        "1m05s",
        "1h02m",
        "?",
        "?",
    ]


def test_counts_rates_and_eta():
    p, clock, _ = _progress()
    assert p.counts() == {"running": 0, "pending": 3, "done": 0, "diverged": 0, "failed": 0}
    assert p.eta() is None  # no rate yet
    p.start("a")
    p.start("b")
    clock.t += 30  # start-up: not counted in a rate, which starts at the first progress seen
    p.update("a", 5)
    p.update("b", 5)
    assert p.trials["a"].steps_per_s is None
    clock.t += 10
    p.update("a", 25, units_per_s=512.0)  # 20 steps in 10 s: 2 steps/s
    p.update("b", 15, units_per_s=256.0)  # 1 step/s
    assert p.trials["a"].steps_per_s == pytest.approx(2.0) and p.trials["b"].steps_per_s == pytest.approx(1.0)
    assert p.rates() == (pytest.approx(3.0), pytest.approx(768.0))
    # a: 75 steps at 2/s; b: 85 at 1/s; c (pending): the 30 s start-up seen, then 100 steps at the
    # mean per-trial rate 1.5/s; two trials at a time
    assert p.eta() == pytest.approx((75 / 2 + 85 / 1 + 30 + 100 / 1.5) / 2)
    clock.t += 10
    p.update("a", 65)  # 4 steps/s now; the average moves halfway (RATE_SMOOTHING = 0.5)
    assert p.trials["a"].steps_per_s == pytest.approx(3.0)
    p.update("a", 50, loss=9.0)  # a board post read after a later evaluation report: ignored
    assert (p.trials["a"].done_steps, p.trials["a"].loss) == (65, None)
    p.finish("b", "diverged", "loss nan")
    assert p.counts() == {"running": 1, "pending": 1, "done": 1, "diverged": 1, "failed": 0}
    assert p.rates()[0] == pytest.approx(3.0)  # only running trials count
    # a diverged trial has nothing left to run (its rate still counts in the per-trial mean)
    assert p.eta() == pytest.approx((35 / 3.0 + 30 + 100 / 2.0) / 2)


def test_eta_from_completed_trials_counts_start_up():
    """Short trials are mostly start-up: once one completed, the ETA is the mean trial time,
    run as many at once as were seen running."""
    p, clock, _ = _progress(trials=("a", "b", "c", "d", "e"))
    p.start("a")
    p.start("b")
    clock.t += 60
    p.finish("a", "completed", "")  # 60 s a trial, 2 at a time
    p.start("c")
    clock.t += 20
    # b: 60 - 80 < 0 left; c: 40 s left; d, e: 60 s each -> 160 s of trial time, 2 at a time
    assert p.eta() == pytest.approx(80.0)
    assert p.summary_line() == "[ 1m20s] 2 running  2 pending  1 done  - steps/s  - units/s  ETA 1m20s"


def test_plain_lines_show_counts_rates_eta_and_parquet_step_numbers():
    p, clock, out = _progress()
    p.start("a")
    p.update("a", 5)
    clock.t += 10
    p.update("a", 25, units_per_s=1500.0)
    p.tick()
    clock.t += 5
    p.evaluated("a", 25, loss=2.5, eval_loss=2.75)
    p.tick()  # 5 s after the last block: not due (PLAIN_EVERY_S)
    clock.t += console.PLAIN_EVERY_S
    p.tick()
    lines = out.getvalue().splitlines()
    assert lines[0] == "[    0s] a                        RUNNING   started"
    # the summary line (ETA: 75 + 100 + 100 steps left at 2 steps/s), then one line per running trial
    assert lines[1] == "[   10s] 1 running  2 pending  0 done  2 steps/s  1,500 units/s  ETA 2m18s"
    assert lines[2] == "    a                        step    24 ( 25%)  2 steps/s  1,500 units/s"
    # an evaluation after 25 steps is the Parquet row step=24, as in MLflow's curves
    assert lines[3] == "[   15s] a                        EVAL      step    24 ( 25%)  loss 2.5000  eval 2.7500"
    assert lines[4].startswith("[   30s] 1 running  2 pending  0 done") and lines[4].endswith("best a eval 2.7500")
    assert len(lines) == 6 and "\x1b" not in out.getvalue()  # no terminal codes in a log file


def test_terminal_block_is_redrawn_in_place():
    p, clock, out = _progress(tty=True, trials=("a",))
    p.start("a")  # the event line, then the block (summary + the running trial)
    clock.t += console.TTY_EVERY_S
    p.update("a", 10)
    p.tick()
    assert (
        "step     9 ( 10%)" in out.getvalue()
        and "    a                        starting (Ray, DeepSpeed) for 0s" in out.getvalue()
    )
    text = out.getvalue()
    assert text.count("\x1b[2F\x1b[J") == 1  # the 2-line block was erased once and drawn again
    assert text.rstrip("\n").splitlines()[-1].startswith("    a ")
    p.finish("a", "completed", "loss 1.0000")
    p.close()
    final = out.getvalue().rsplit("\x1b[J", 1)[-1]  # what stays on screen: the last block, as plain lines
    assert final.startswith("[    2s] 0 running  0 pending  1 done") and final.endswith("ETA 0s\n")


def test_quiet_drops_noise_lines_only(capsys):
    before = {k: os.environ.get(k) for k in console.QUIET_ENV}
    with console.quiet():
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0" or before["RAY_AIR_NEW_OUTPUT"] is not None
        assert logging.getLogger("mlflow").getEffectiveLevel() == logging.WARNING
        print("kept line")
        sys.stdout.write("\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started on node: x\n")
        print("NaN or Inf found in input tensor.", file=sys.stderr)
        print("(raylet) A worker died or was killed while executing a task", file=sys.stderr)
    assert {k: os.environ.get(k) for k in console.QUIET_ENV} == before
    out, err = capsys.readouterr()
    assert out == "kept line\n"
    assert err == "(raylet) A worker died or was killed while executing a task\n"  # substance stays
    with console.quiet(verbose=True):
        print("NaN or Inf found in input tensor.")
    assert capsys.readouterr().out == "NaN or Inf found in input tensor.\n"
