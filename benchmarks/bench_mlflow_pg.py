"""MLflow at 10,000 child runs: `search_runs` for the best trial per optimizer, on PostgreSQL
(behind `mlflow server`, as `opt-study mlflow-server` runs it) and on SQLite (the default store,
read directly as `opt-study ui` / a user's `mlflow.search_runs` read it). Issue 16 item 4.

Run as `python benchmarks/bench_mlflow_pg.py OUT.json [RUNS] [OPTIMIZERS] [postgres]` (defaults 10,000
and 8; `postgres`: that store only);
not part of `make bench` (run_all.py), a targeted run recorded in RESULTS.md.

The study: one experiment, one parent run, RUNS child runs spread over OPTIMIZERS optimizers,
each shaped as `MlflowSink.log_trial` writes a trial: tags (parent, trial id, role, status,
label, optimizer, start/end), params (optimizer, hp.lr, hp.weight_decay, seed), summary/ and hp/
metrics, and curves train/loss (50 points) and eval/loss (10 points).

How the runs get there: MLflow's REST API has no batch run creation (one `runs/create` per run,
then `log-batch`), so 10,000 trials through the server cost what `delivered` below measures per
trial. The first `DELIVERED` (200) children are logged for real through `MlflowSink.log_trial`
via the server (the driver's own path, timed per trial); the rest are inserted in transactions
of 500 runs with SQLAlchemy Core into MLflow's own tables (`mlflow.store.tracking.dbmodels`),
after MLflow created the schema. Both stores get the same rows.

Timed (median of REPEATS rounds, interleaved): for each optimizer,
    search_runs([exp], "tags.`opt_study.optimizer` = '<opt>' AND tags.`opt_study.role` = 'trial'",
                order_by=["metrics.`summary/best_eval_loss` ASC"], max_results=1)
and checked against the known best; the target is < 2 s for all optimizers together (and so for
each). Also: one page of 1,000 trials of the experiment (what the UI's table loads first).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHUNK = 500  # runs per insert transaction
DELIVERED = 200  # children logged through the real sink and server
REPEATS = 5
TRAIN_POINTS, EVAL_POINTS = 50, 10


def trial_rows(i: int, n_opt: int, rng: random.Random) -> dict:
    """One trial as the sink logs it: its tags, params, single metrics and curves."""
    opt = f"opt{i % n_opt}"
    lr, wd = 10 ** rng.uniform(-4, -1), rng.choice([0.0, 1e-4, 1e-2])
    best = rng.uniform(0.5, 5.0)
    train = [(s * 20, best + 3.0 * (1 - s / TRAIN_POINTS)) for s in range(TRAIN_POINTS)]
    evals = [(s * 100, best + 2.0 * (1 - s / EVAL_POINTS)) for s in range(EVAL_POINTS)]
    return {
        "trial_id": f"{opt}-{i:05d}-s0",
        "optimizer": opt,
        "params": {"optimizer": opt, "hp": {"lr": lr, "weight_decay": wd}, "seed": 0},
        "tags": {
            "opt_study.label": opt,
            "opt_study.optimizer": opt,
            "opt_study.started_unix": 1_700_000_000 + i,
            "opt_study.ended_unix": 1_700_000_060 + i,
        },
        "summary": {
            "summary/best_eval_loss": best,
            "summary/best_loss": best - 0.1,
            "summary/final_loss": best + 0.05,
            "hp/lr": lr,
            "hp/weight_decay": wd,
        },
        "curves": {"train/loss": train, "eval/loss": evals},
    }


def bulk_insert(engine, experiment_id: int, parent_id: str, trials: list[dict], artifact_root: str) -> float:
    """Insert ``trials`` as child runs, CHUNK runs per transaction; seconds taken."""
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag

    from opt_study.results.mlflow_sink import flatten_params

    t0 = time.perf_counter()
    for k in range(0, len(trials), CHUNK):
        runs, tags, params, metrics, latest = [], [], [], [], []
        for t in trials[k : k + CHUNK]:
            rid = uuid.uuid4().hex
            start, end = t["tags"]["opt_study.started_unix"] * 1000, t["tags"]["opt_study.ended_unix"] * 1000
            runs.append(
                {
                    "run_uuid": rid,
                    "name": t["trial_id"],
                    "source_type": "LOCAL",
                    "source_name": "",
                    "entry_point_name": "",
                    "user_id": "bench",
                    "status": "FINISHED",
                    "start_time": start,
                    "end_time": end,
                    "source_version": "",
                    "lifecycle_stage": "active",
                    "artifact_uri": f"{artifact_root}/{experiment_id}/{rid}/artifacts",
                    "experiment_id": experiment_id,
                }
            )
            all_tags = {
                **{k2: str(v) for k2, v in t["tags"].items()},
                "mlflow.parentRunId": parent_id,
                "mlflow.runName": t["trial_id"],
                "opt_study.trial_id": t["trial_id"],
                "opt_study.status": "completed",
                "opt_study.role": "trial",
            }
            tags += [{"key": k2, "value": v, "run_uuid": rid} for k2, v in all_tags.items()]
            params += [{"key": k2, "value": v, "run_uuid": rid} for k2, v in flatten_params(t["params"]).items()]
            points = [(key, v, 0) for key, v in t["summary"].items()]
            for key, pts in t["curves"].items():
                points += [(key, v, s) for s, v in pts]
            for key, v, s in points:
                metrics.append({"key": key, "value": v, "timestamp": end, "step": s, "is_nan": False, "run_uuid": rid})
            last = {}
            for key, v, s in points:  # latest = the highest step (MLflow's rule)
                if key not in last or s >= last[key][1]:
                    last[key] = (v, s)
            latest += [
                {"key": key, "value": v, "timestamp": end, "step": s, "is_nan": False, "run_uuid": rid}
                for key, (v, s) in last.items()
            ]
        with engine.begin() as con:
            for model, rows in (
                (SqlRun, runs),
                (SqlTag, tags),
                (SqlParam, params),
                (SqlMetric, metrics),
                (SqlLatestMetric, latest),
            ):
                con.execute(model.__table__.insert(), rows)
    return time.perf_counter() - t0


def deliver(sink, parent_id: str, trials: list[dict]) -> list[float]:
    """Log ``trials`` through ``MlflowSink.log_trial`` (the driver's path); seconds per trial."""
    took = []
    for t in trials:
        t0 = time.perf_counter()
        sink.log_trial(parent_id, t["trial_id"], t["params"], t["tags"], t["summary"], t["curves"], "completed")
        took.append(time.perf_counter() - t0)
    return took


def best_queries(client, experiment_id: str, n_opt: int) -> tuple[float, dict[str, float], dict[str, float]]:
    """One round: the best trial of each optimizer; (total s, s per optimizer, best found)."""
    per, found = {}, {}
    t_all = time.perf_counter()
    for j in range(n_opt):
        opt = f"opt{j}"
        t0 = time.perf_counter()
        runs = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`opt_study.optimizer` = '{opt}' AND tags.`opt_study.role` = 'trial'",
            order_by=["metrics.`summary/best_eval_loss` ASC"],
            max_results=1,
        )
        per[opt] = time.perf_counter() - t0
        found[opt] = runs[0].data.metrics["summary/best_eval_loss"]
    return time.perf_counter() - t_all, per, found


def page_query(client, experiment_id: str, n_runs: int) -> float:
    t0 = time.perf_counter()
    runs = client.search_runs([experiment_id], filter_string="tags.`opt_study.role` = 'trial'", max_results=1000)
    assert len(runs) == min(1000, n_runs)
    return time.perf_counter() - t0


def populate(client, engine, trials, sink_uri: str | None, artifact_root: str) -> dict:
    """The experiment, its parent and every child; what it cost."""
    import sqlalchemy

    from opt_study.results.mlflow_sink import MlflowSink

    sink = MlflowSink(sink_uri or client.tracking_uri, "opt_study/bench")
    parent = sink.parent_run("bench", {"workload": "quadratic", "trials": len(trials)}, {})
    took = deliver(sink, parent, trials[:DELIVERED])
    bulk_s = bulk_insert(engine, int(sink.experiment_id), parent, trials[DELIVERED:], artifact_root)
    with engine.connect() as con:  # every child is there, once: counted in MLflow's own table
        children = con.execute(
            sqlalchemy.text(
                "SELECT count(*) FROM tags t JOIN runs r ON r.run_uuid = t.run_uuid "
                "WHERE r.experiment_id = :e AND t.key = 'opt_study.role' AND t.value = 'trial'"
            ),
            {"e": int(sink.experiment_id)},
        ).scalar()
    assert children == len(trials), (children, len(trials))
    return {
        "experiment_id": sink.experiment_id,
        "delivered": len(took),
        "delivered_s_per_trial_median": statistics.median(took),
        "delivered_s_per_trial_p90": sorted(took)[int(0.9 * len(took))],
        "bulk_inserted": len(trials) - DELIVERED,
        "bulk_s": bulk_s,
    }


def measure(client, experiment_id: str, n_opt: int, want: dict[str, float], n_runs: int) -> dict:
    totals, pers, pages, load = [], {}, [], []
    for _ in range(REPEATS):
        load.append(os.getloadavg()[0])
        total, per, found = best_queries(client, experiment_id, n_opt)
        assert all(abs(found[o] - want[o]) < 1e-12 for o in want), (found, want)
        totals.append(total)
        for o, s in per.items():
            pers.setdefault(o, []).append(s)
        pages.append(page_query(client, experiment_id, n_runs))
    return {
        "all_optimizers_s_median": statistics.median(totals),
        "all_optimizers_s_runs": totals,
        "per_optimizer_s_median": statistics.median(statistics.median(v) for v in pers.values()),
        "per_optimizer_s_max": max(max(v) for v in pers.values()),
        "page_1000_s_median": statistics.median(pages),
        "load1": load,
    }


def main() -> int:
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    out = Path(sys.argv[1])
    n_runs = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    n_opt = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    import sqlalchemy
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking import MlflowClient

    from opt_study.results.mlflow_server import MlflowServer, Postgres, free_port

    rng = random.Random(0)
    trials = [trial_rows(i, n_opt, rng) for i in range(n_runs)]
    want = {}
    for t in trials:
        o, v = t["optimizer"], t["summary"]["summary/best_eval_loss"]
        want[o] = min(want.get(o, float("inf")), v)
    home = Path(tempfile.mkdtemp(prefix="opt_study_bench_pg_"))
    home.chmod(0o755)
    result = {"runs": n_runs, "optimizers": n_opt, "cpus": os.cpu_count(), "load1_start": os.getloadavg()[0]}
    pg = Postgres(home / "pg", free_port())
    ml = None
    try:
        pg.init()
        pg.start()
        ml = MlflowServer(pg.uri, str(home / "artifacts"), port=free_port(), workers=2, env=pg.env())
        t0 = time.perf_counter()
        ml.start()
        result["server_start_s"] = time.perf_counter() - t0
        client = MlflowClient(tracking_uri=ml.url)
        os.environ["PGPASSWORD"] = pg.password  # this process's own engine for the bulk insert
        engine = sqlalchemy.create_engine(pg.uri)
        pg_pop = populate(client, engine, trials, None, "mlflow-artifacts:")
        with engine.connect() as con:
            result["pg_db_bytes"] = con.execute(sqlalchemy.text("SELECT pg_database_size('mlflow')")).scalar()
            con.execute(sqlalchemy.text("ANALYZE"))  # what autovacuum does soon after a bulk load
        engine.dispose()
        result["postgres"] = {**pg_pop, **measure(client, pg_pop["experiment_id"], n_opt, want, n_runs)}
        print("postgres", json.dumps(result["postgres"]), flush=True)

        # The same database read in-process (MLflow's SqlAlchemyStore, no HTTP): what the server adds.
        direct = MlflowClient(tracking_uri=pg.uri)
        result["postgres_direct"] = measure(direct, pg_pop["experiment_id"], n_opt, want, n_runs)
        print("postgres_direct", json.dumps(result["postgres_direct"]), flush=True)

        if not (len(sys.argv) > 4 and sys.argv[4] == "postgres"):  # `postgres`: a second sample of it only
            db = home / "mlflow.db"
            sqlite_uri = f"sqlite:///{db}"
            SqlAlchemyStore(sqlite_uri, (home / "mlartifacts").as_uri())  # MLflow creates its schema
            sqlite_engine = sqlalchemy.create_engine(sqlite_uri)
            sclient = MlflowClient(tracking_uri=sqlite_uri)
            s_pop = populate(sclient, sqlite_engine, trials, sqlite_uri, (home / "mlartifacts").as_uri())
            sqlite_engine.dispose()
            result["sqlite_db_bytes"] = db.stat().st_size
            result["sqlite"] = {**s_pop, **measure(sclient, s_pop["experiment_id"], n_opt, want, n_runs)}
            print("sqlite", json.dumps(result["sqlite"]), flush=True)
    finally:
        if ml is not None:
            ml.stop()
        pg.stop("fast")
        shutil.rmtree(home, ignore_errors=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("postgres", "postgres_direct", "sqlite")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
