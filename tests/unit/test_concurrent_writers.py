"""Concurrent writers, for real: several processes write different trials' step chunks into one
study folder at once while a reader process polls `read_steps` and DuckDB the whole time, and
one more writer is SIGKILLed in the middle of writing a large chunk (while its temporary file
exists). Readers only ever see whole committed chunks, the interrupted chunk is never visible,
and at the end every (trial, step) is stored exactly once."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
import warnings
import zlib
from pathlib import Path

import duckdb
import pytest

from opt_study.results.parquet import StepWriter, check_chunks, read_steps
from opt_study.results.schema import METRIC_COLUMNS
from opt_study.storage import layout

pytestmark = pytest.mark.slow

WRITERS = ("w0", "w1", "w2")
STEPS, CHUNK = 600, 50  # 12 chunks per writer trial
VICTIM_SMALL = 100  # the victim commits 2 chunks of this size, then starts a large one
VICTIM_BIG = 40_000  # wide random rows: ~15 MB of Parquet, so the write takes a while


def _loss(tid: str, step: int) -> float:
    """A value only (trial, step) produces: a reader can check every row it sees."""
    return zlib.crc32(f"{tid}:{step}".encode()) / 2**32


def _writer(study: str, tid: str, go, pause_s: float) -> None:
    go.wait(60)
    with StepWriter(study, tid, attempt=0, start_step=0, rows_per_chunk=CHUNK) as w:
        for s in range(STEPS):
            w.append({"step": s, "loss": _loss(tid, s), "measured": s % 7 == 0})
            if (s + 1) % CHUNK == 0:
                time.sleep(pause_s)  # the chunk was just committed: let the reader look


def _victim(study: str, tid: str, go, small_done) -> None:
    go.wait(60)
    rng = random.Random(tid)
    w = StepWriter(study, tid, attempt=0, start_step=0, rows_per_chunk=10**9)
    for s in range(2 * VICTIM_SMALL):
        w.append({"step": s, "loss": _loss(tid, s)})
        if (s + 1) % VICTIM_SMALL == 0:
            w.flush()
    small_done.set()
    for s in range(2 * VICTIM_SMALL, 2 * VICTIM_SMALL + VICTIM_BIG):
        w.append({"step": s, **{c: rng.random() for c in METRIC_COLUMNS}, "loss": _loss(tid, s)})
    w.flush()  # killed while this chunk's temporary file is being written
    time.sleep(60)  # (only reached if the kill came late: the test then retries)


def _check_view(study: str, chunk_of: dict[str, int]) -> tuple[list[str], dict[str, int]]:
    """What one reader poll sees, checked: (violations, rows seen per trial)."""
    bad = []
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        table = read_steps(study)  # it skips a bad chunk with a warning: that is a violation here
    bad += [f"read_steps warned: {w.message}" for w in warned]
    rows_by_trial: dict[str, list] = {}
    cols = (table[c].to_pylist() for c in ("trial_id", "step", "loss", "attempt"))
    for tid, step, loss, att in zip(*cols):
        rows_by_trial.setdefault(tid, []).append(step)
        if loss != _loss(tid, step) or att != 0:
            bad.append(f"read_steps: bad row {tid} step {step}: loss {loss} attempt {att}")
    for tid, steps in rows_by_trial.items():
        if steps != list(range(len(steps))) or len(steps) % chunk_of[tid]:
            bad.append(f"read_steps: {tid} steps are not whole chunks from 0: {len(steps)} rows")
    glob = f"{layout.steps_dir(Path(study))}/**/*.parquet"
    if list(Path(study).glob("steps/*/*/*.parquet")):
        counts = duckdb.sql(
            f"SELECT trial_id, count(*), count(DISTINCT step), max(step), count(*) - count(loss) "
            f"FROM read_parquet('{glob}', hive_partitioning = true) GROUP BY 1"
        ).fetchall()
        for tid, n, distinct, hi, nulls in counts:
            if not (n == distinct == hi + 1 and n % chunk_of[tid] == 0 and nulls == 0):
                bad.append(f"duckdb: {tid}: {n} rows, {distinct} distinct, max {hi}, {nulls} null")
    return bad, {tid: len(steps) for tid, steps in rows_by_trial.items()}


def _reader(study: str, chunk_of: dict, stop, results) -> None:
    polls, partial, violations = 0, 0, []
    while not stop.is_set():
        try:
            bad, counts = _check_view(study, chunk_of)
        except Exception as e:  # noqa: BLE001 - any reader crash is a violation to report
            bad, counts = [f"reader raised {type(e).__name__}: {e}"], {}
        violations.extend(bad)
        polls += 1
        partial += any(0 < counts.get(t, 0) < STEPS for t in WRITERS)  # caught mid-study
    results.put({"polls": polls, "partial": partial, "violations": violations[:20]})


def _kill_mid_chunk(ctx, study: str, tid: str, go) -> bool:
    """Start a victim writer, SIGKILL it as soon as its large chunk's temp file appears;
    True if it died with that temp file still on disk (the kill landed mid-write)."""
    small_done = ctx.Event()
    p = ctx.Process(target=_victim, args=(study, tid, go, small_done))
    p.start()
    assert small_done.wait(120), "victim never committed its first chunks"
    adir = layout.attempt_dir(Path(study), tid, 0)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(n.startswith(".part-") for n in os.listdir(adir)):
        time.sleep(0.0005)
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    return any(n.startswith(".part-") for n in os.listdir(adir))


def test_concurrent_writers_and_a_killed_one(tmp_path):
    ctx = mp.get_context("spawn")
    study = str(tmp_path / "store" / "conc")
    victims = [f"v{i}" for i in range(3)]
    chunk_of = {**{t: CHUNK for t in WRITERS}, **{v: VICTIM_SMALL for v in victims}}
    go, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    reader = ctx.Process(target=_reader, args=(study, chunk_of, stop, results))
    writers = [ctx.Process(target=_writer, args=(study, t, go, 0.15)) for t in WRITERS]
    for p in [reader, *writers]:
        p.start()
    go.set()
    killed = []  # a late kill (chunk already renamed) does not test anything: try another victim
    for v in victims:
        killed.append(v)
        if _kill_mid_chunk(ctx, study, v, go):
            break
    else:
        pytest.fail("no victim was killed while its chunk's temp file existed")
    for p in writers:
        p.join(120)
        assert p.exitcode == 0
    time.sleep(0.3)  # a few more polls of the final state
    stop.set()
    seen = results.get(timeout=60)
    reader.join(30)

    assert seen["violations"] == []
    assert seen["polls"] >= 5 and seen["partial"] >= 1  # it did look while writes were under way
    # the interrupted chunk stays a hidden temp file: on disk, never read
    last = killed[-1]
    adir = layout.attempt_dir(Path(study), last, 0)
    temps = [n for n in os.listdir(adir) if n.startswith(".part-")]
    assert len(temps) == 1 and sorted(n for n in os.listdir(adir) if not n.startswith(".")) == [
        "_START",
        layout.chunk_name(0, VICTIM_SMALL - 1),
        layout.chunk_name(VICTIM_SMALL, 2 * VICTIM_SMALL - 1),
    ]
    # final state: every (trial, step) exactly once; the killed trial keeps its committed chunks
    table = read_steps(study)
    per = {}
    for tid, step in zip(table["trial_id"].to_pylist(), table["step"].to_pylist()):
        per.setdefault(tid, []).append(step)
    assert per[last] == list(range(2 * VICTIM_SMALL))
    for t in WRITERS:
        assert per[t] == list(range(STEPS))
    assert set(per) == set(WRITERS) | set(killed)
    glob = f"{study}/steps/**/*.parquet"
    assert duckdb.sql(
        f"SELECT count(*) - count(DISTINCT (trial_id, step)) FROM read_parquet('{glob}', hive_partitioning = true)"
    ).fetchall() == [(0,)]
    assert check_chunks(study) == []
