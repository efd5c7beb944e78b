"""The Parquet results: layout names, the step writer, the "last attempt wins" reader, DuckDB
access and the trials table. Real pyarrow and DuckDB on files in tmp_path."""

from __future__ import annotations

import json
import math
import os
import warnings

import duckdb
import pyarrow.parquet as pq
import pytest

from opt_study.results.parquet import (
    StepWriter,
    check_chunks,
    list_chunks,
    next_attempt,
    read_steps,
    steps_sql,
)
from opt_study.results.schema import (
    METRIC_COLUMNS,
    STEP_SCHEMA,
    STEP_SCHEMA_VERSION,
    schema_version,
)
from opt_study.results.trials import read_trial_records, write_trial_record, write_trials_table
from opt_study.storage import layout


def _write(study, trial, attempt, start, stop, tag=0.0, rows_per_chunk=4):
    """Steps start..stop-1 with loss = step + tag, so each row's origin is recognisable."""
    with StepWriter(study, trial, attempt, start, rows_per_chunk=rows_per_chunk) as w:
        for s in range(start, stop):
            w.append({"step": s, "loss": s + tag, "lr": 0.1, "time_unix": 1000.0 + s})


def _pairs(table, *cols):
    return list(zip(*(table[c].to_pylist() for c in cols)))


# ------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("bad", ["", "..", "a..b", "a/b", ".hidden", "_x", "x y", "é", "a" * 129, "trial_id=1"])
def test_check_name_rejects_unsafe(bad):
    with pytest.raises(ValueError, match="trial id"):
        layout.check_name(bad, "trial id")


def test_check_name_accepts_safe():
    for good in ["a", "00001", "adamw_lr-0.001", "A" * 128]:
        assert layout.check_name(good, "study") == good


def test_study_dir_stays_inside_root(tmp_path):
    assert layout.study_dir(tmp_path, "s1") == tmp_path.resolve() / "s1"
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "evil").symlink_to(outside)
    with pytest.raises(ValueError, match="not directly inside"):
        layout.study_dir(root, "evil")
    with pytest.raises(ValueError):
        layout.study_dir(root, "../outside")


# ------------------------------------------------------------------------------------ writer


def test_rows_round_trip(tmp_path):
    with StepWriter(tmp_path, "t1", 0, 0, rows_per_chunk=10) as w:
        for s in range(25):
            row = {"step": s, "loss": 2.0 - s / 100, "lr": 1e-3, "time_unix": 5.0 + s}
            if s % 5 == 0:  # a measured step carries the measurement columns
                row.update(
                    measured=True, sq_grad=float(s), convexity_gap_fwd=-0.5, cls_convexity_fwd="holds", flag=None
                )
            w.append(row)
    chunks = list_chunks(tmp_path)
    assert [c.name for c in chunks] == [layout.chunk_name(0, 9), layout.chunk_name(10, 19), layout.chunk_name(20, 24)]
    assert schema_version(pq.read_schema(chunks[0])) == STEP_SCHEMA_VERSION

    t = read_steps(tmp_path)
    assert t.schema.names == STEP_SCHEMA.names
    assert t.num_rows == 25
    assert t["step"].to_pylist() == list(range(25))
    assert t["loss"].to_pylist() == [2.0 - s / 100 for s in range(25)]
    assert t["time_unix"].to_pylist() == [5.0 + s for s in range(25)]
    assert set(t["trial_id"].to_pylist()) == {"t1"} and set(t["attempt"].to_pylist()) == {0}
    assert t["measured"].to_pylist() == [s % 5 == 0 for s in range(25)]
    assert t["sq_grad"].to_pylist() == [float(s) if s % 5 == 0 else None for s in range(25)]
    assert t["cls_convexity_fwd"].to_pylist()[:6] == ["holds", None, None, None, None, "holds"]
    assert t["eval_loss"].null_count == 25


def test_bad_rows_rejected(tmp_path):
    w = StepWriter(tmp_path, "t1", 0, 3)
    with pytest.raises(ValueError, match="expected >= 3"):
        w.append({"step": 2})
    with pytest.raises(ValueError, match="step"):
        w.append({"loss": 1.0})
    with pytest.raises(TypeError, match="column 'step' takes an integer, got 3.5"):
        w.append({"step": 3.5})
    with pytest.raises(ValueError, match="trial_id"):
        w.append({"step": 3, "trial_id": "t2"})
    w.append({"step": 3})
    with pytest.raises(ValueError, match="expected >= 4"):
        w.append({"step": 3})  # strictly increasing: one row per step
    w.close()
    t = read_steps(tmp_path)
    assert t["step"].to_pylist() == [3] and t["measured"].to_pylist() == [False]
    with pytest.raises(RuntimeError):
        w.append({"step": 4})


@pytest.mark.parametrize(
    "column, value, error, message",
    [
        ("loss", "1.0", TypeError, "column 'loss' takes a number, got '1.0' (step 1)"),
        ("measured", 1, TypeError, "column 'measured' takes a bool, got 1 (step 1)"),
        ("groups", {"g": 5.0}, TypeError, "column 'groups' takes {group: {sum name: number}}"),
        ("eval_loss", object(), TypeError, "column 'eval_loss' takes a number, got <object"),
        (
            "cls_convexity_bwd",
            "maybe",
            ValueError,
            "column 'cls_convexity_bwd' takes one of ['holds', 'indeterminate', 'violated'], got 'maybe'",
        ),
        ("flag", 7, TypeError, "column 'flag' takes a string, got 7"),
        ("flag", b"\xff", ValueError, "column 'flag' takes a string"),
        ("sq_gradient", 1.0, ValueError, "unknown step column(s): ['sq_gradient']"),
    ],
)
def test_bad_cell_raises_at_flush_naming_column_and_step(tmp_path, column, value, error, message):
    """Cells are converted a chunk at a time: the flush (here the append that fills the
    buffer) names the column and the step, drops that row, keeps the rest."""
    w = StepWriter(tmp_path, "t1", 0, 0, rows_per_chunk=3)
    w.append({"step": 0, "loss": 1.0})
    w.append({"step": 1, "loss": 2.0, column: value})
    with pytest.raises(error) as caught:
        w.append({"step": 2, "loss": 3.0, "measured": True})
    assert message in str(caught.value) and "(step 1)" in str(caught.value)
    w.close()  # the other rows were kept
    t = read_steps(tmp_path)
    assert _pairs(t, "step", "loss", "measured") == [(0, 1.0, False), (2, 3.0, True)]


def test_cells_float_accepts_are_stored(tmp_path):
    """What pyarrow refuses but float() takes (a Decimal, an int above 2**53) is converted on
    the per-column path; numpy scalars and bools go through the fast one."""
    import decimal

    import numpy as np

    with StepWriter(tmp_path, "t1", 0, 0, rows_per_chunk=10) as w:
        w.append(
            {
                "step": np.int64(0),
                "loss": np.float32(0.5),
                "lr": True,
                "measured": np.bool_(True),
                "groups": {"blocks.0": {"sq_grad": 2, "ip_grad_update": np.float64(-1.0)}},
            }
        )
        w.append({"step": 1, "loss": decimal.Decimal("1.25"), "lr": 2**60 + 1, "flag": b"utf8"})
    t = read_steps(tmp_path)
    assert t["flag"].to_pylist() == [None, "utf8"]
    assert _pairs(t, "step", "loss", "lr", "measured") == [(0, 0.5, 1.0, True), (1, 1.25, float(2**60 + 1), False)]
    g = t["groups"].to_pylist()
    assert g[1] is None and g[0][0]["name"] == "blocks.0" and g[0][0]["sq_grad"] == 2.0
    assert g[0][0]["ip_grad_update"] == -1.0 and g[0][0]["sq_update"] is None


def test_appended_dict_is_copied(tmp_path):
    with StepWriter(tmp_path, "t1", 0, 0, rows_per_chunk=10) as w:
        row = {"step": 0, "loss": 1.0}
        w.append(row)
        row.update(step=1, loss=2.0)  # a loop reusing its dict
        w.append(row)
    assert _pairs(read_steps(tmp_path), "step", "loss") == [(0, 1.0), (1, 2.0)]


def test_attempt_is_exclusive(tmp_path):
    assert next_attempt(tmp_path, "t1") == 0
    StepWriter(tmp_path, "t1", 0, 0).close()
    with pytest.raises(FileExistsError):
        StepWriter(tmp_path, "t1", 0, 0)
    assert next_attempt(tmp_path, "t1") == 1
    start = layout.attempt_dir(tmp_path, "t1", 0) / layout.START_FILE
    assert json.loads(start.read_text()) == {"start_step": 0}


def test_rows_buffered_when_the_loop_raises_are_committed(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with StepWriter(tmp_path, "t1", 0, 0, rows_per_chunk=100) as w:
            w.append({"step": 0, "loss": 1.0})
            raise RuntimeError("boom")
    assert read_steps(tmp_path)["loss"].to_pylist() == [1.0]


# ------------------------------------------------------------------------------------ reader


def test_uncommitted_temp_file_is_invisible(tmp_path):
    _write(tmp_path, "t1", 0, 0, 3)
    committed = list_chunks(tmp_path)[0]
    # A chunk caught mid-write: a hidden temp name beside the real chunks, with rows in it.
    temp = layout.temp_path(committed.with_name(layout.chunk_name(3, 5)))
    table = pq.read_table(committed)
    pq.write_table(table, temp)
    assert temp.name.startswith(".")
    assert list_chunks(tmp_path) == [committed]
    assert read_steps(tmp_path)["step"].to_pylist() == [0, 1, 2]
    glob = str(tmp_path / "steps" / "**" / "*.parquet")
    count = duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}', hive_partitioning=true)")
    assert count.fetchall() == [(3,)]


def test_restart_replaces_steps_from_its_start(tmp_path):
    _write(tmp_path, "t1", 0, 0, 10, tag=0.0)
    _write(tmp_path, "t2", 0, 0, 3, tag=0.5)
    assert next_attempt(tmp_path, "t1") == 1
    _write(tmp_path, "t1", 1, 5, 12, tag=100.0)

    t = read_steps(tmp_path, trial_ids=["t1"])
    assert t["step"].to_pylist() == list(range(12))  # each step exactly once
    expected = [(s, 0, float(s)) for s in range(5)] + [(s, 1, s + 100.0) for s in range(5, 12)]
    assert _pairs(t, "step", "attempt", "loss") == expected

    both = read_steps(tmp_path)
    assert _pairs(both, "trial_id", "step")[:12] == [("t1", s) for s in range(12)]
    assert _pairs(both, "trial_id", "loss")[12:] == [("t2", 0.5), ("t2", 1.5), ("t2", 2.5)]


def test_started_attempt_hides_replaced_rows_before_its_first_chunk(tmp_path):
    _write(tmp_path, "t1", 0, 0, 10)
    w = StepWriter(tmp_path, "t1", 1, 4)  # _START committed, no row yet
    assert read_steps(tmp_path)["step"].to_pylist() == [0, 1, 2, 3]
    # A third attempt restarting from an earlier checkpoint cuts both older attempts.
    w.append({"step": 4, "loss": 40.0})
    w.append({"step": 5, "loss": 50.0})
    w.close()
    _write(tmp_path, "t1", 2, 2, 4, tag=200.0)
    assert _pairs(read_steps(tmp_path), "step", "attempt") == [(0, 0), (1, 0), (2, 2), (3, 2)]


def test_same_step_twice_in_one_attempt_keeps_last_chunk(tmp_path):
    _write(tmp_path, "t1", 0, 0, 8)
    adir = layout.attempt_dir(tmp_path, "t1", 0)
    table = pq.read_table(list_chunks(tmp_path)[0])  # steps 0..3
    rewritten = table.slice(2, 2).set_column(table.schema.get_field_index("loss"), "loss", [[-2.0, -3.0]])
    pq.write_table(rewritten, adir / layout.chunk_name(2, 3))  # sorts after part-0-3
    t = read_steps(tmp_path)
    assert t["step"].to_pylist() == list(range(8))
    assert t["loss"].to_pylist() == [0.0, 1.0, -2.0, -3.0, 4.0, 5.0, 6.0, 7.0]
    dedup = duckdb.sql(steps_sql(tmp_path)).to_arrow_table()
    assert _pairs(dedup, "step", "loss") == _pairs(t, "step", "loss")


def test_truncated_chunk_is_reported_and_skipped(tmp_path):
    _write(tmp_path, "t1", 0, 0, 8)
    bad = list_chunks(tmp_path)[1]  # steps 4..7
    size = bad.stat().st_size
    with open(bad, "r+b") as f:
        f.truncate(size // 2)
    assert check_chunks(tmp_path) == [(bad, check_chunks(tmp_path)[0][1])]
    assert "unreadable" in check_chunks(tmp_path)[0][1]
    with pytest.warns(UserWarning, match=bad.name):
        t = read_steps(tmp_path)
    assert t["step"].to_pylist() == [0, 1, 2, 3]


def test_misplaced_chunk_is_reported(tmp_path):
    _write(tmp_path, "t1", 0, 0, 4)
    _write(tmp_path, "t2", 0, 0, 4)
    src = list_chunks(tmp_path)[0]  # t1's rows, copied under t2's directory
    dst = layout.attempt_dir(tmp_path, "t2", 0) / layout.chunk_name(0, 9)
    dst.write_bytes(src.read_bytes())
    assert [(p, "another trial" in why) for p, why in check_chunks(tmp_path)] == [(dst, True)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = read_steps(tmp_path, trial_ids=["t2"])
    assert len(caught) == 1 and t.num_rows == 4 and set(t["trial_id"].to_pylist()) == {"t2"}


def test_empty_study_reads_as_empty_table(tmp_path):
    t = read_steps(tmp_path / "nothing")
    assert t.num_rows == 0 and t.schema.names == STEP_SCHEMA.names
    assert list_chunks(tmp_path) == [] and check_chunks(tmp_path) == []


def test_duckdb_reads_the_dataset(tmp_path):
    _write(tmp_path, "00007", 0, 0, 10)
    _write(tmp_path, "00007", 1, 6, 9, tag=100.0)
    glob = str(tmp_path / "steps" / "**" / "*.parquet")
    raw = duckdb.sql(
        f"SELECT trial_id, attempt, step, loss FROM read_parquet('{glob}', "
        "hive_partitioning=true) ORDER BY attempt, step"
    ).fetchall()
    assert len(raw) == 13  # every committed row, before "last attempt wins"
    assert raw[0] == ("00007", 0, 0, 0.0)  # the file's string column, not an int partition
    dedup = duckdb.sql(steps_sql(tmp_path)).fetchall()
    t = read_steps(tmp_path)
    names = t.schema.names
    assert [(r[names.index("step")], r[names.index("loss")]) for r in dedup] == _pairs(t, "step", "loss")
    assert [r[2] for r in dedup] == list(range(9)) and dedup[7][names.index("loss")] == 107.0


def test_measurement_columns_are_in_schema():
    for name in ("sq_grad", "ip_probe_update", "trapezoid_residual", "noise_floor", "eval_loss"):
        assert name in METRIC_COLUMNS and STEP_SCHEMA.field(name).nullable
    assert not STEP_SCHEMA.field("step").nullable


# ------------------------------------------------------------------------------------ trials


def _record(i, status="completed", **extra):
    return {
        "trial_id": f"t{i}",
        "study": "s",
        "optimizer": "adamw",
        "workload": "mlp",
        "seed": i,
        "status": status,
        "attempt": 0,
        "started": 1.0,
        "ended": 2.0 + i,
        "error": None,
        "hparams": {"lr": 10.0**-i, "betas": {"b1": 0.9}},
        "summary": {"final_loss": 1.0 / (i + 1)},
        "resources": {"cpu": 1},
        **extra,
    }


def test_trials_table_round_trip(tmp_path):
    write_trial_record(tmp_path, _record(1))
    write_trial_record(tmp_path, _record(2, status="running"))
    write_trial_record(
        tmp_path, _record(2, status="diverged", error="loss is nan", summary={"final_loss": math.nan})
    )  # replaces
    records = read_trial_records(tmp_path)
    assert [r["trial_id"] for r in records] == ["t1", "t2"]
    assert records[1]["status"] == "diverged" and math.isnan(records[1]["summary"]["final_loss"])

    path = write_trials_table(tmp_path)
    t = pq.read_table(path)
    assert path == tmp_path / "trials.parquet"
    assert t["trial_id"].to_pylist() == ["t1", "t2"]
    assert t["hp.lr"].to_pylist() == [0.1, 0.01]
    assert t["hp.betas.b1"].to_pylist() == [0.9, 0.9]
    assert t["summary.final_loss"][0].as_py() == 0.5
    assert math.isnan(t["summary.final_loss"][1].as_py())
    assert t["resources.cpu"].to_pylist() == [1, 1]
    assert t["status"].to_pylist() == ["completed", "diverged"]
    assert t["error"].to_pylist() == [None, "loss is nan"]
    assert str(t.schema.field("seed").type) == "int64"
    rows = duckdb.sql(f"SELECT trial_id FROM '{path}' WHERE \"hp.lr\" > 0.05").fetchall()
    assert rows == [("t1",)]


def test_trials_table_mixed_types_and_empty(tmp_path):
    assert pq.read_table(write_trials_table(tmp_path)).num_rows == 0
    write_trial_record(tmp_path, _record(1, hparams={"schedule": 3}))
    write_trial_record(tmp_path, _record(2, hparams={"schedule": "cosine"}))
    t = pq.read_table(write_trials_table(tmp_path))
    assert t["hp.schedule"].to_pylist() == ["3", "cosine"]


def test_trial_record_validation(tmp_path):
    with pytest.raises(ValueError, match="status"):
        write_trial_record(tmp_path, _record(1, status="done"))
    with pytest.raises(ValueError, match="trial id"):
        write_trial_record(tmp_path, {"trial_id": "../x", "status": "pending"})
    with pytest.raises(ValueError, match="at least"):
        write_trial_record(tmp_path, {"trial_id": "x"})
    (tmp_path / "trials").mkdir(exist_ok=True)
    (tmp_path / "trials" / "junk.json").write_text("{not json")
    with pytest.warns(UserWarning, match="junk.json"):
        assert read_trial_records(tmp_path) == []
    assert not [p for p in os.listdir(tmp_path / "trials") if p.startswith(".")]
