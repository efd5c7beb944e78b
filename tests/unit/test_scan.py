"""The one "last attempt wins" scan (opt_study.results.scan): the pure rules on hand-made
listings, the SQL it writes, the DuckDB view skipping a bad chunk as read_steps does, and the
study folder paths of storage.layout."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from opt_study.results import scan
from opt_study.results.parquet import StepWriter, list_chunks, read_steps
from opt_study.results.query import open_study, query
from opt_study.storage import layout


def _listing(**attempts):
    """attempt=(start or None, [(first, last), ...]) -> a Listing with made-up paths."""
    out = {}
    for name, (start, ranges) in attempts.items():
        a = int(name[1:])
        out[a] = (start, [(f, la, Path(f"a{a}") / layout.chunk_name(f, la)) for f, la in ranges])
    return out


def test_resolve_cuts_each_attempt_at_the_lowest_later_start():
    t = scan.resolve("t", _listing(a0=(0, [(4, 7), (0, 3), (8, 11)]), a1=(6, [(6, 9)]), a2=(9, [])))
    assert [(a.number, a.start_step, a.cutoff) for a in t.attempts] == [(0, 0, 6), (1, 6, 9), (2, 9, None)]
    assert [(c.first, c.last) for c in t.attempts[0].chunks] == [(0, 3), (4, 7), (8, 11)]  # by name
    assert [(c.attempt, c.first, c.cut) for c in t.live] == [(0, 0, False), (0, 4, True), (1, 6, True)]


def test_resolve_takes_the_first_committed_step_when_start_is_lost():
    t = scan.resolve("t", _listing(a0=(None, [(0, 9)]), a1=(None, [(5, 7)]), a2=(None, [])))
    assert [(a.start_step, a.cutoff) for a in t.attempts] == [(0, 5), (5, None), (None, None)]


def test_select_sql_adds_only_the_clauses_it_needs():
    plain = scan.resolve("t", _listing(a0=(0, [(0, 3), (4, 7)]))).live
    sql = scan.select_sql(plain)
    assert "NOT EXISTS" not in sql and "QUALIFY" not in sql
    restarted = scan.resolve("t", _listing(a0=(0, [(0, 3), (2, 3)]), a1=(3, [(3, 5)]))).live
    sql = scan.select_sql(restarted, union_by_name=False)
    assert "NOT EXISTS" in sql and "QUALIFY" in sql and "union_by_name = false" in sql
    with pytest.raises(ValueError):
        scan.select_sql([])


@pytest.mark.parametrize("newest", [True, False])  # found when the view is made / queried
def test_the_steps_view_skips_a_truncated_chunk_like_read_steps(tmp_path, newest):
    for trial, start, stop in (("t1", 0, 8), ("t2", 0, 4)):
        with StepWriter(tmp_path, trial, 0, start, rows_per_chunk=4) as w:
            for s in range(start, stop):
                w.append({"step": s, "loss": float(s)})
    bad = list_chunks(tmp_path)[1]  # t1 steps 4..7
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size // 2)
    if not newest:
        os.utime(bad, ns=(1, 1))
    with pytest.warns(UserWarning, match=bad.name):
        ref = read_steps(tmp_path)
    with pytest.warns(UserWarning, match=f"skipping bad step chunk .*{bad.name}"):
        got = query(tmp_path, "SELECT * FROM steps ORDER BY trial_id, step")
    assert got.to_pylist() == ref.to_pylist() and got.num_rows == 8


def test_the_steps_view_rescans_when_a_chunk_went_away(tmp_path):
    with StepWriter(tmp_path, "t", 0, 0, rows_per_chunk=2) as w:
        for s in range(6):
            w.append({"step": s, "loss": float(s)})
    with open_study(tmp_path) as db:
        from opt_study.results.compact import compact_trial

        compact_trial(tmp_path, "t")  # removes the chunks the view was made of
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert db.rows("SELECT count(*) AS n FROM steps") == [{"n": 6}]


def test_every_study_path_comes_from_layout(tmp_path):
    s = tmp_path / "study"
    rel = {
        p.relative_to(s).as_posix()
        for p in (
            layout.spec_path(s),
            layout.plan_path(s),
            layout.trials_dir(s),
            layout.trials_table_path(s),
            layout.stop_path(s, "t"),
            layout.checkpoint_dir(s, "t"),
            layout.snapshot_rank_file(s, "t", 4, 1, 2),
            layout.replay_path(s, "t", "final"),
            layout.mlflow_queue_dir(s),
            layout.ray_train_dir(s),
            layout.report_dir(s),
            layout.attempt_dir(s, "t", 0),
        )
    }
    assert rel == {
        "spec.yaml",
        "plan.json",
        "trials",
        "trials.parquet",
        "control/t.stop",
        "checkpoints/t",
        "snapshots/t/step-4/rank-1-of-2.pt",
        "replay/trial_id=t/reference=final.parquet",
        "mlflow_queue",
        "ray/train",
        "report",
        "steps/trial_id=t/attempt=0",
    }
    assert layout.parse_snapshot_step_dir("step-12") == 12 and layout.parse_snapshot_step_dir("x") is None
    assert layout.parse_trial_dir("trial_id=t") == "t" and layout.parse_trial_dir("trial_id=..") is None
    for bad in (
        lambda: layout.checkpoint_dir(s, "../x"),
        lambda: layout.snapshot_step_dir(s, "t", -1),
        lambda: layout.replay_path(s, "t", "best"),
        lambda: layout.replay_path(s, "t", "²"),
    ):
        with pytest.raises(ValueError):
            bad()
    assert not s.exists()  # path arithmetic only
