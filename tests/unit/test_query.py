"""The query layer: DuckDB views over a study folder equal the exactly-once reader, joins and
UNNEST give known values, the MLflow helpers select trials, and `opt-study query` prints and
saves results."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from opt_study.cli.main import main as cli_main
from opt_study.results.mlflow_sink import MlflowSink, trial_metrics
from opt_study.results.parquet import StepWriter, read_steps
from opt_study.results.query import (
    QueryError,
    best_per_optimizer,
    find_trials,
    open_study,
    parent_run_id,
    query,
    trial_rows,
)
from opt_study.results.schema import STEP_SCHEMA
from opt_study.results.trials import write_trial_record
from opt_study.storage import layout


def _groups(step: int) -> dict:
    return {"blocks.0": {"sq_grad": 1.0 * step, "sq_update": 0.5}, "head": {"sq_grad": 2.0 * step}}


def _write(study, trial_id, attempt, start, steps, rows_per_chunk=4, loss=lambda s: 1.0 / (s + 1)):
    with StepWriter(study, trial_id, attempt, start, rows_per_chunk=rows_per_chunk) as w:
        for s in steps:
            row = {"step": s, "loss": loss(s), "time_unix": 1.0 + s}
            if s % 3 == 0:
                row.update(measured=True, sq_grad=3.0 * s, groups=_groups(s))
            w.append(row)


@pytest.fixture
def study(tmp_path):
    """Trial "t1": attempt 0 steps 0-9, attempt 1 restarted at step 6 and reached 11, attempt
    2 started at 10 without a committed chunk yet (so steps >= 10 of attempt 1 are replaced).
    Trial "0123" (an id a Hive reader would type as an integer): steps 0-4, plus a chunk
    written twice over steps 3-4 (the last chunk by name wins). Trial "t3": planned only."""
    s = tmp_path / "s"
    _write(s, "t1", 0, 0, range(10))
    _write(s, "t1", 1, 6, range(6, 12), loss=lambda st: 100.0 + st)
    StepWriter(s, "t1", 2, 10).close()
    _write(s, "0123", 0, 0, range(5))
    # Chunks 0-3 and 4-4 exist; a chunk 3-4 sorts after 0-3, before 4-4: it replaces step 3
    # of 0-3, and 4-4 (later by name) keeps step 4.
    old = read_steps(s, ["0123"])
    new = old.filter(pc.greater_equal(old["step"], 3))
    new = new.set_column(new.column_names.index("loss"), "loss", pa.array([-3.0, -4.0]))
    pq.write_table(new, layout.attempt_dir(s, "0123", 0) / layout.chunk_name(3, 4))
    for tid, opt, lr, seed, status in (("t1", "adamw", 0.001, 0, "completed"), ("0123", "sgd", 0.1, 1, "diverged")):
        write_trial_record(
            s,
            {
                "trial_id": tid,
                "status": status,
                "optimizer": opt,
                "label": opt,
                "seed": seed,
                "workload": "quadratic",
                "hparams": {"lr": lr},
                "summary": {"best_eval_loss": 1.5},
            },
        )
    plan = [
        {"trial_id": "t1", "label": "adamw", "optimizer": "adamw", "hparams": {"lr": 0.001}, "seed": 0, "index": 0},
        {"trial_id": "t3", "label": "adamw", "optimizer": "adamw", "hparams": {"lr": 0.01}, "seed": 0, "index": 1},
    ]
    (s / "plan.json").write_text(json.dumps(plan))
    return s


def test_steps_view_equals_read_steps(study):
    got = query(study, "SELECT * FROM steps ORDER BY trial_id, step")
    ref = read_steps(study)
    assert got.column_names == ref.column_names == STEP_SCHEMA.names
    assert got.to_pylist() == ref.to_pylist()
    t1 = query(study, "SELECT step, attempt, loss FROM steps WHERE trial_id = 't1' ORDER BY step")
    assert t1["step"].to_pylist() == list(range(10))
    assert t1["attempt"].to_pylist() == [0] * 6 + [1] * 4
    assert t1["loss"].to_pylist()[6:] == [106.0, 107.0, 108.0, 109.0]
    dup = query(study, "SELECT trial_id, loss FROM steps WHERE trial_id = '0123' AND step >= 3 ORDER BY step")
    assert dup["trial_id"].to_pylist() == ["0123", "0123"] and dup["loss"].to_pylist() == [-3.0, 0.2]


def test_trials_view_has_plan_and_hyperparameters(study):
    t = {r["trial_id"]: r for r in query(study, "SELECT * FROM trials").to_pylist()}
    assert set(t) == {"t1", "0123", "t3"}
    assert t["t3"]["status"] == "pending" and t["t3"]["hp.lr"] == 0.01 and t["t3"]["index"] == 1
    assert t["t1"]["index"] == 0 and t["0123"]["index"] is None
    assert t["0123"]["summary.best_eval_loss"] == 1.5 and t["0123"]["status"] == "diverged"
    assert trial_rows(study).num_rows == 3


def test_steps_hp_joins_every_step(study):
    rows = query(
        study,
        'SELECT optimizer, seed, status, "hp.lr", count(*) AS n, '
        "sum(loss) AS s FROM steps_hp GROUP BY ALL ORDER BY optimizer",
    ).to_pylist()
    assert rows == [
        {
            "optimizer": "adamw",
            "seed": 0,
            "status": "completed",
            "hp.lr": 0.001,
            "n": 10,
            "s": pytest.approx(sum(1.0 / (k + 1) for k in range(6)) + 106 + 107 + 108 + 109),
        },
        {
            "optimizer": "sgd",
            "seed": 1,
            "status": "diverged",
            "hp.lr": 0.1,
            "n": 5,
            "s": pytest.approx(1.0 + 0.5 + 1 / 3 - 3.0 + 0.2),
        },
    ]


def test_groups_view_unnests_the_per_group_sums(study):
    rows = query(
        study, "SELECT trial_id, step, group_name, sq_grad, sq_update FROM groups ORDER BY trial_id, step, group_name"
    ).to_pylist()
    # Measured steps (multiples of 3) that survive: "0123" 0, 3 (the replacing chunk's row);
    # t1 0, 3 (attempt 0), 6, 9 (attempt 1). Two groups each.
    assert [(r["trial_id"], r["step"]) for r in rows][::2] == [
        ("0123", 0),
        ("0123", 3),
        ("t1", 0),
        ("t1", 3),
        ("t1", 6),
        ("t1", 9),
    ]
    assert [r["group_name"] for r in rows[:2]] == ["blocks.0", "head"]
    assert rows[-2:] == [
        {"trial_id": "t1", "step": 9, "group_name": "blocks.0", "sq_grad": 9.0, "sq_update": 0.5},
        {"trial_id": "t1", "step": 9, "group_name": "head", "sq_grad": 18.0, "sq_update": None},
    ]


def test_empty_study_and_bad_sql(tmp_path):
    (tmp_path / "e").mkdir()
    t = query(tmp_path / "e", "SELECT * FROM steps")
    assert t.num_rows == 0 and t.column_names == STEP_SCHEMA.names
    assert query(tmp_path / "e", "SELECT count(*) AS n FROM trials")["n"].to_pylist() == [0]
    with open_study(tmp_path / "e") as db:
        assert not db.has_replay
        with pytest.raises(QueryError, match="no_such_view"):
            db.table("SELECT * FROM no_such_view")
        assert db.columns("SELECT 1.5 AS x, NULL::DOUBLE AS y")["x"].tolist() == [1.5]
    with pytest.raises(FileNotFoundError):
        open_study(tmp_path / "missing")


def test_threads_and_params(study):
    with open_study(study, threads=1) as db:
        assert db.rows("SELECT current_setting('threads') AS t")[0]["t"] == 1
        assert db.rows("SELECT count(*) AS n FROM steps WHERE step >= ?", [8])[0]["n"] == 2


# ------------------------------------------------------------------------------ MLflow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("opt_study/st", artifact_location=str(root / "art"))
    sink = MlflowSink(uri, "opt_study/st")
    parent = sink.parent_run("st", {}, {})
    for tid, opt, best, status in (
        ("a-0", "adamw", 2.0, "completed"),
        ("a-1", "adamw", 1.5, "completed"),
        ("s-0", "sgd", 1.75, "completed"),
        ("s-1", "sgd", math.nan, "diverged"),
        ("l-0", "lion", math.nan, "failed"),
    ):
        # named as the runner names them (summary/best_eval_loss, hp/lr)
        values, curves = trial_metrics({"best_eval_loss": best}, [], {"lr": 0.1})
        sink.log_trial(parent, tid, {"hp.lr": 0.1}, {"opt_study.optimizer": opt}, values, curves, status)
    return uri, parent


def test_find_trials_and_best_per_optimizer(store):
    uri, parent = store
    assert parent_run_id(uri, "st") == parent and parent_run_id(uri, "other") is None
    runs = find_trials(uri, "st")
    assert sorted(runs["tags.opt_study.trial_id"]) == ["a-0", "a-1", "l-0", "s-0", "s-1"]
    assert sorted(find_trials(uri, "st", optimizer="sgd")["tags.opt_study.trial_id"]) == ["s-0", "s-1"]
    low = find_trials(uri, "st", filter_string="metrics.`summary/best_eval_loss` < 1.8")
    assert sorted(low["tags.opt_study.trial_id"]) == ["a-1", "s-0"]
    best = best_per_optimizer(uri, "st")
    assert list(best["tags.opt_study.trial_id"]) == ["a-1", "s-0"]  # lion: nothing finite
    assert list(best["metrics.summary/best_eval_loss"]) == [1.5, 1.75]
    with pytest.raises(ValueError):
        find_trials(uri, "st", optimizer="x' OR '1'='1")


# ------------------------------------------------------------------------------ CLI


def _cli(argv):
    return cli_main(argv)


def test_query_command_prints_and_saves(study, tmp_path, capsys):
    sql = "SELECT trial_id, count(*) AS n, max(loss) AS top FROM steps GROUP BY trial_id ORDER BY trial_id"
    csv, parq = tmp_path / "out" / "r.csv", tmp_path / "out" / "r.parquet"
    assert _cli(["query", str(study), sql, "--csv", str(csv), "--parquet", str(parq)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["trial_id", "n", "top"]
    assert out[2].split() == ["0123", "5", "1"] and out[3].split() == ["t1", "10", "109"]
    assert out[4] == "(2 rows)"
    expected = {"trial_id": ["0123", "t1"], "n": [5, 10], "top": [1.0, 109.0]}
    assert pq.read_table(parq).to_pydict() == expected
    assert pacsv.read_csv(csv).to_pydict() == expected
    assert _cli(["query", str(study), "SELECT step FROM steps ORDER BY step", "--max-rows", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "(3 of 15 rows)"


def test_query_command_bad_input(study, tmp_path, capsys):
    assert _cli(["query", str(study), "SELEC nonsense"]) == 2
    assert "error:" in capsys.readouterr().err
    assert _cli(["query", str(tmp_path / "nowhere"), "SELECT 1"]) == 2


def test_mixed_schema_versions(tmp_path):
    """Files written before a column existed: the view still has every column (NULL there)."""
    s = tmp_path / "s"
    _write(s, "new", 0, 0, range(3))
    _write(s, "old", 0, 0, range(2))
    old = layout.attempt_dir(s, "old", 0) / layout.chunk_name(0, 1)
    table = pq.read_table(old)
    pq.write_table(table.drop_columns(["noise_floor", "eval_loss"]), old)
    os.utime(old, ns=(1, 1))  # the old file is the oldest
    got = query(s, "SELECT trial_id, step, loss, noise_floor FROM steps ORDER BY trial_id, step")
    assert got.to_pylist() == read_steps(s).select(["trial_id", "step", "loss", "noise_floor"]).to_pylist()
    # ... also when the old file is the newest (the fast path takes the first file's columns)
    os.utime(old, ns=(2**62, 2**62))
    with open_study(s) as db:
        assert db.table("SELECT * FROM steps").column_names[: len(STEP_SCHEMA)] == STEP_SCHEMA.names
        assert db.rows("SELECT count(noise_floor) AS n, count(*) AS m FROM steps") == [{"n": 0, "m": 5}]


def test_example_sql_runs(study):
    text = (Path(__file__).resolve().parents[2] / "analysis" / "examples.sql").read_text()
    statements = [s for s in text.split("\n;\n") if s.strip()]
    assert len(statements) == 8
    for sql in statements:
        query(study, sql)  # every statement binds and runs on a real study folder
    bad = query(study, statements[-1]).to_pylist()
    assert bad == []  # no non-finite loss in this study
    status = query(study, statements[0]).to_pylist()
    assert {"optimizer": "sgd", "status": "diverged", "trials": 1} in status


def test_query_formats(study, capsys):
    """--format csv / json (every row, pipeable) / markdown / table; time_unix as a UTC time in tables."""
    sql = "SELECT trial_id, count(*) AS n, max(loss) AS top, 1796400000.5 AS time_unix FROM steps GROUP BY 1 ORDER BY 1"
    assert _cli(["query", str(study), sql, "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "trial_id,n,top,time_unix",
        "0123,5,1.0,1796400000.5",
        "t1,10,109.0,1796400000.5",
    ]
    assert _cli(["query", str(study), sql, "--format", "json", "--max-rows", "1"]) == 0  # json: every row
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == [
        {"trial_id": "0123", "n": 5, "top": 1.0, "time_unix": 1796400000.5},
        {"trial_id": "t1", "n": 10, "top": 109.0, "time_unix": 1796400000.5},
    ]
    assert _cli(["query", str(study), sql, "--format", "markdown"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "| trial_id | n | top | time_unix |",
        "|---|---|---|---|",
        "| 0123 | 5 | 1 | 2026-12-04 16:00:00 |",
        "| t1 | 10 | 109 | 2026-12-04 16:00:00 |",
    ]
    assert _cli(["query", str(study), sql]) == 0  # table, not a terminal: no width fitting
    out = capsys.readouterr().out.splitlines()
    assert out[2].split() == ["0123", "5", "1", "2026-12-04", "16:00:00"] and "e+09" not in "".join(out)


def test_table_fits_the_width_and_json_has_no_nan():
    from opt_study.report.text import format_table, render

    rows = [{"name": "x" * 50, "v": 1.0, "note": "y" * 30}, {"name": "short", "v": math.nan, "note": None}]
    full = format_table(["name", "v", "note"], rows, 2).splitlines()
    assert max(map(len, full)) == 50 + 2 + 3 + 2 + 30
    fitted = render("table", ["name", "v", "note"], rows, 2, width=40).splitlines()
    assert max(map(len, fitted)) <= 40
    assert fitted[2].startswith("x" * 10) and fitted[2].split()[0].endswith("…")  # cut cells say so
    assert fitted[3].split()[1:] == ["nan", "NULL"]
    assert [json.loads(x)["v"] for x in render("json", ["v"], rows, 2).splitlines()] == [1.0, None]
    with pytest.raises(ValueError, match="unknown format"):
        render("xml", ["v"], rows, 2)
