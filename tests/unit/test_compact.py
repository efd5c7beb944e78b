"""Compaction of a trial's chunks: every reader (read_steps, the query ``steps`` view,
parquet.steps_sql) gives exactly the same table before, at every intermediate state (a
compaction killed after k changes) and after; a rerun finishes the job and is then a no-op."""

from __future__ import annotations

import itertools
import shutil

import duckdb
import pyarrow.parquet as pq
import pytest

from opt_study.results.compact import compact_study, compact_trial, compaction_steps
from opt_study.results.parquet import (
    StepWriter,
    check_chunks,
    list_chunks,
    next_attempt,
    read_steps,
    steps_sql,
    trial_chunks,
)
from opt_study.results.query import query
from opt_study.results.schema import STEP_SCHEMA, STEP_SCHEMA_VERSION, schema_version
from opt_study.storage import layout


def _write(study, trial, attempt, start, stop, tag=0.0, rows_per_chunk=3):
    """Steps start..stop-1, loss = step + tag; every 4th step measured (sums, groups, class)."""
    with StepWriter(study, trial, attempt, start, rows_per_chunk=rows_per_chunk) as w:
        for s in range(start, stop):
            row = {"step": s, "loss": s + tag, "lr": 0.1, "time_unix": 1000.0 + s + tag}
            if s % 4 == 0:
                row.update(
                    measured=True,
                    sq_grad=2.0 * s,
                    cls_convexity_fwd="holds",
                    groups={"g0": {"sq_grad": float(s)}, "g1": {"sq_grad": s + tag}},
                )
            if s % 5 == 0:
                row.update(eval_loss=s / 10, flag="zero_update")
            w.append(row)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """a: one attempt, 7 chunks. b: restarted three times, attempt 1 wholly replaced by
    attempt 2 (both start at 8), 4 + 2 + 4 + 3 chunks. c: already one chunk."""
    s = tmp_path_factory.mktemp("compact") / "study"
    _write(s, "a", 0, 0, 21)
    _write(s, "b", 0, 0, 20, rows_per_chunk=5)
    _write(s, "b", 1, 8, 15, tag=100.0, rows_per_chunk=5)
    _write(s, "b", 2, 8, 26, tag=200.0, rows_per_chunk=5)
    _write(s, "b", 3, 20, 31, tag=300.0, rows_per_chunk=5)
    _write(s, "c", 0, 0, 6, rows_per_chunk=100)
    return s


@pytest.fixture(scope="module")
def gap_study(tmp_path_factory):
    """d: attempt 1 started at 6 and died before its first chunk; attempt 2 resumed from 8.
    Attempt 1 cuts attempt 0 at 6 through its _START only, so removing it before attempt 0
    is cut would bring steps 6, 7 of attempt 0 back (steps_sql, blind to _START, shows them
    even before compaction: parquet.steps_sql)."""
    s = tmp_path_factory.mktemp("compact_gap") / "study"
    _write(s, "d", 0, 0, 12)
    StepWriter(s, "d", 1, 6).close()
    _write(s, "d", 2, 8, 16, tag=200.0)
    return s


def _answers(study, sql: bool = True) -> list:
    """The study's rows through each reader, in STEP_SCHEMA, sorted by (trial_id, step)."""
    tables = [read_steps(study), query(study, "SELECT * FROM steps")]
    if sql:
        con = duckdb.connect()
        try:
            tables.append(con.sql(steps_sql(study)).to_arrow_table())
        finally:
            con.close()
    out = []
    for t in tables:
        t = t.select(STEP_SCHEMA.names).sort_by([("trial_id", "ascending"), ("step", "ascending")])
        out.append(t.cast(STEP_SCHEMA.remove_metadata()).combine_chunks())
    return out


def _assert_same(study, ref, sql: bool = True):
    for got in _answers(study, sql):
        assert got.equals(ref), got.to_pylist()[:3]


def test_readers_agree_and_know_the_answer(study):
    ref, view, sql = _answers(study)
    assert view.equals(ref) and sql.equals(ref)
    b = ref.filter(ref["trial_id"].to_numpy(zero_copy_only=False) == "b")
    assert b["step"].to_pylist() == list(range(31))
    assert b["attempt"].to_pylist() == [0] * 8 + [2] * 12 + [3] * 11
    assert b["loss"].to_pylist()[7:9] == [7.0, 208.0]


@pytest.mark.parametrize("which, trial", [("study", "a"), ("study", "b"), ("gap_study", "d")])
def test_every_intermediate_state_reads_the_same(request, tmp_path, which, trial):
    study, sql = request.getfixturevalue(which), which == "study"
    ref = _answers(study, sql)[0]
    if trial == "d":
        assert _pairs(ref, "step", "attempt") == [(s, 0) for s in range(6)] + [(s, 2) for s in range(8, 16)]
    full = _copy(study, tmp_path / "full")
    n = len(list(compaction_steps(full, trial)))
    assert n >= 5
    for k in range(n):
        s = _copy(study, tmp_path / f"k{k}")
        done = list(itertools.islice(compaction_steps(s, trial), k))  # killed after k changes
        assert len(done) == k
        _assert_same(s, ref, sql)
        # The rerun finishes the job: the files of an uninterrupted compaction, the same rows.
        files = compact_trial(s, trial)
        assert [p.relative_to(s) for p in files] == [p.relative_to(full) for p in trial_chunks(full, trial)]
        assert read_steps(s).equals(read_steps(full))
    _assert_same(full, ref)  # steps_sql too: compaction removed what it could not see


def test_compaction_leaves_one_file_per_attempt_with_rows(study, tmp_path):
    s = _copy(study, tmp_path / "s")
    before = {t: len(trial_chunks(s, t)) for t in "abc"}
    c_file = trial_chunks(s, "c")[0]
    c_mtime = c_file.stat().st_mtime_ns
    assert before == {"a": 7, "b": 4 + 2 + 4 + 3, "c": 1}
    out = compact_study(s)
    tdir = layout.trial_steps_dir(s, "b")
    assert out["a"] == [layout.attempt_dir(s, "a", 0) / layout.chunk_name(0, 20)]
    assert out["b"] == [
        layout.attempt_dir(s, "b", 0) / layout.chunk_name(0, 7),
        layout.attempt_dir(s, "b", 2) / layout.chunk_name(8, 19),
        layout.attempt_dir(s, "b", 3) / layout.chunk_name(20, 30),
    ]
    assert out["c"] == [c_file] and c_file.stat().st_mtime_ns == c_mtime  # untouched
    assert sorted(p.name for p in tdir.iterdir()) == ["attempt=0", "attempt=2", "attempt=3"]
    assert list_chunks(s) == out["a"] + out["b"] + out["c"]
    assert check_chunks(s) == []
    meta = pq.ParquetFile(out["a"][0]).metadata
    assert meta.num_rows == 21 and meta.row_group(0).column(0).compression == "ZSTD"
    assert schema_version(pq.read_schema(out["a"][0])) == STEP_SCHEMA_VERSION
    _assert_same(s, _answers(study)[0])
    # Idempotent: nothing left to do, nothing rewritten.
    mtimes = [p.stat().st_mtime_ns for p in list_chunks(s)]
    assert [list(compaction_steps(s, t)) for t in "abc"] == [[], [], []]
    assert compact_study(s) == out and [p.stat().st_mtime_ns for p in list_chunks(s)] == mtimes
    assert next_attempt(s, "b") == 4  # the last attempt stays: numbers are never reused


def test_a_started_attempt_without_rows_cuts_older_rows_for_good(tmp_path):
    """An attempt that committed _START but no chunk hides older rows from its start on;
    steps_sql cannot see _START (parquet.steps_sql), compaction makes it agree for good."""
    _write(tmp_path, "t", 0, 0, 10)
    StepWriter(tmp_path, "t", 1, 5).close()
    ref = read_steps(tmp_path)
    assert ref["step"].to_pylist() == [0, 1, 2, 3, 4]
    assert compact_trial(tmp_path, "t") == [layout.attempt_dir(tmp_path, "t", 0) / layout.chunk_name(0, 4)]
    _assert_same(tmp_path, _answers(tmp_path)[0])
    assert _answers(tmp_path)[2]["step"].to_pylist() == [0, 1, 2, 3, 4]
    assert layout.attempt_dir(tmp_path, "t", 1).is_dir() and next_attempt(tmp_path, "t") == 2


def test_compacting_while_the_writer_still_appends_loses_nothing(tmp_path):
    w = StepWriter(tmp_path, "t", 0, 0, rows_per_chunk=2)
    for s in range(6):
        w.append({"step": s, "loss": float(s)})
    assert len(compact_trial(tmp_path, "t")) == 1
    for s in range(6, 10):
        w.append({"step": s, "loss": float(s)})
    w.close()
    assert read_steps(tmp_path)["loss"].to_pylist() == [float(s) for s in range(10)]
    assert len(trial_chunks(tmp_path, "t")) == 3
    assert compact_trial(tmp_path, "t") == [layout.attempt_dir(tmp_path, "t", 0) / layout.chunk_name(0, 9)]
    assert read_steps(tmp_path)["loss"].to_pylist() == [float(s) for s in range(10)]


def test_a_bad_chunk_stops_that_trial_and_changes_nothing(study, tmp_path):
    s = _copy(study, tmp_path / "s")
    bad = trial_chunks(s, "a")[2]
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size // 2)
    files = list_chunks(s)
    with pytest.raises(ValueError, match=bad.name):
        compact_trial(s, "a")
    assert list_chunks(s) == files
    with pytest.warns(UserWarning, match=f"not compacting trial 'a'.*{bad.name}"):
        out = compact_study(s)
    assert "a" not in out and len(out["b"]) == 3 and len(trial_chunks(s, "a")) == 7


def test_a_leftover_temp_file_is_ignored(study, tmp_path):
    """A compaction killed inside atomic_write leaves a hidden temp file: never read."""
    s = _copy(study, tmp_path / "s")
    adir = layout.attempt_dir(s, "a", 0)
    temp = layout.temp_path(adir / layout.chunk_name(0, 20))
    temp.write_bytes(b"PAR1 half a file")
    _assert_same(s, _answers(study)[0])
    assert len(compact_trial(s, "a")) == 1 and temp.exists()
    _assert_same(s, _answers(study)[0])


def _pairs(table, *cols):
    return list(zip(*(table[c].to_pylist() for c in cols)))


def _copy(study, dst):
    shutil.copytree(study, dst)
    return dst
