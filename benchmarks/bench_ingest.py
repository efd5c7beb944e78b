"""Ingest throughput: the same per-step rows into Parquet (opt_study's StepWriter) and into
MLflow (``MlflowClient.log_batch``, the fastest MLflow path, into a SQLite store).

A row is a measured step as the trial loop writes it: the training columns, the raw sums, the
derived metrics (float64 each: ``N_METRICS`` values) and the two class strings; MLflow gets the
float values as metrics at that step (it cannot hold strings as metrics), 1000 metrics per
``log_batch`` call (MLflow's limit). Parquet: ``StepWriter.append`` per row (as the trial loop
calls it), a chunk converted and validated (``step_cells.rows_table``), written (snappy) and
committed (temp file, fsync, rename) every ``rows_per_chunk`` rows, all timed, including
``close``.
The two sides alternate in ``REPEATS`` rounds; the reported ratio is the median of the per-round
ratios (adjacent timings, so a burst of foreign load hits both alike).

    .venv/bin/python benchmarks/bench_ingest.py [OUT.json]     # prints one JSON line
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opt_study.measure.metrics import derive  # noqa: E402
from opt_study.results.schema import METRIC_COLUMNS  # noqa: E402

TARGET = 500.0
PARQUET_ROWS = 20_000
MLFLOW_ROWS = 300
REPEATS = 3
ROWS_PER_CHUNK = 1000
N_METRICS = len(METRIC_COLUMNS)


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """n measured-step rows with every float column filled (derived by ``metrics.derive``)."""
    rng = random.Random(seed)
    rows = []
    for step in range(n):
        sums = {
            k: rng.uniform(0.1, 2.0)
            for k in (
                "sq_grad",
                "sq_grad_probe",
                "sq_update",
                "sq_param",
                "sq_dist_init",
                "sq_grad_diff",
                "sq_update_prev",
                "sq_grad_prev",
            )
        }
        sums.update(
            {
                k: rng.uniform(-1.0, 1.0)
                for k in (
                    "ip_grad_update",
                    "ip_probe_update",
                    "ip_param_update",
                    "ip_param_grad",
                    "ip_update_prev",
                    "ip_grad_prev",
                )
            }
        )
        loss = 3.0 - step * 1e-5
        d = derive(sums, loss, loss - 1e-3, 1.0)
        row = {
            "step": step,
            "measured": True,
            "time_unix": 1e9 + step,
            "loss": loss,
            "lr": 1e-3,
            "engine_grad_norm": d["grad_norm"],
            "step_time_s": 0.2,
            "units_per_s": 5000.0,
            "eval_loss": loss,
            "loss_probe": loss - 1e-3,
            "probe_s": 1.0,
            **sums,
            **{k: v for k, v in d.items() if v is not None},
        }
        # Columns added to the schema later (e.g. the noise-scale ones) are filled too.
        row.update({k: rng.uniform(0.1, 2.0) for k in METRIC_COLUMNS if row.get(k) is None})
        rows.append(row)
    return rows


def time_parquet(rows: list[dict], root: Path, tag: str) -> float:
    from opt_study.results.parquet import StepWriter

    t0 = time.perf_counter()
    with StepWriter(root, f"t{tag}", 0, 0, rows_per_chunk=ROWS_PER_CHUNK) as w:
        for r in rows:
            w.append(r)
    return time.perf_counter() - t0


def time_write_only(tables: list, root: Path) -> float:
    """Diagnostic: only the storage path of StepWriter's flush (Parquet with its options, temp
    file, fsync, rename) for the same rows already built as Arrow tables of ``ROWS_PER_CHUNK``
    rows: the ceiling of a writer that took columnar batches instead of row dicts."""
    import pyarrow.parquet as pq

    from opt_study.results.parquet import CHUNK_WRITE_OPTIONS
    from opt_study.storage import layout

    root.mkdir(parents=True)
    t0 = time.perf_counter()
    for i, table in enumerate(tables):
        layout.atomic_write(root / f"part-{i}.parquet", lambda f, t=table: pq.write_table(t, f, **CHUNK_WRITE_OPTIONS))
    return time.perf_counter() - t0


def time_mlflow(rows: list[dict], client, experiment_id: str) -> float:
    from mlflow.entities import Metric

    run_id = client.create_run(experiment_id).info.run_id
    t0 = time.perf_counter()
    batch = []
    for r in rows:
        ts = int(r["time_unix"] * 1000)
        batch.extend(Metric(k, float(r[k]), ts, r["step"]) for k in METRIC_COLUMNS)
        while len(batch) >= 1000:
            client.log_batch(run_id, metrics=batch[:1000])
            batch = batch[1000:]
    if batch:
        client.log_batch(run_id, metrics=batch)
    return time.perf_counter() - t0


def main() -> dict:
    from mlflow.tracking import MlflowClient

    from opt_study.results.parquet import read_steps

    rows = make_rows(PARQUET_ROWS)
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        root = Path(tmp)
        client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
        exp = client.create_experiment("ingest", artifact_location=str(root / "art"))
        time_mlflow(rows[:20], client, exp)  # warm-up: schema, connection pool, imports
        time_parquet(rows[:100], root / "warm", "w")
        time_parquet(rows, root / "ref", "ref")
        built = read_steps(root / "ref")
        chunks = [built.slice(i, ROWS_PER_CHUNK) for i in range(0, built.num_rows, ROWS_PER_CHUNK)]
        rounds = []
        for rep in range(REPEATS):
            load = os.getloadavg()[0]
            order = ("parquet", "mlflow") if rep % 2 == 0 else ("mlflow", "parquet")
            t = {}
            for side in order:
                if side == "parquet":
                    t[side] = time_parquet(rows, root / f"pq{rep}", str(rep))
                else:
                    t[side] = time_mlflow(rows[:MLFLOW_ROWS], client, exp)
            pq_rps, ml_rps = PARQUET_ROWS / t["parquet"], MLFLOW_ROWS / t["mlflow"]
            wo_rps = PARQUET_ROWS / time_write_only(chunks, root / f"wo{rep}")
            rounds.append(
                {
                    "rep": rep,
                    "load1": round(load, 2),
                    "parquet_rows_per_s": pq_rps,
                    "mlflow_rows_per_s": ml_rps,
                    "ratio": pq_rps / ml_rps,
                    "write_only_rows_per_s": wo_rps,
                    "write_only_ratio": wo_rps / ml_rps,
                }
            )
    med = lambda k: statistics.median(r[k] for r in rounds)  # noqa: E731
    return {
        "benchmark": "ingest",
        "metrics_per_row": N_METRICS,
        "parquet_rows": PARQUET_ROWS,
        "mlflow_rows": MLFLOW_ROWS,
        "rows_per_chunk": ROWS_PER_CHUNK,
        "parquet_rows_per_s": med("parquet_rows_per_s"),
        "mlflow_rows_per_s": med("mlflow_rows_per_s"),
        "mlflow_metrics_per_s": med("mlflow_rows_per_s") * N_METRICS,
        "ratio": med("ratio"),
        "target_ratio": TARGET,
        "pass": med("ratio") >= TARGET,
        "write_only_rows_per_s": med("write_only_rows_per_s"),
        "write_only_ratio": med("write_only_ratio"),
        "rounds": rounds,
    }


def summarize(res: dict):
    """The RESULTS.md section (for run_all.py)."""
    from common import Section, fmt

    table = [
        [
            "round",
            "StepWriter rows/s",
            "MLflow rows/s",
            "ratio",
            "write-only rows/s (diagnostic)",
            "write-only ratio",
            "load1",
        ]
    ]
    table += [
        [
            str(r["rep"]),
            fmt(r["parquet_rows_per_s"]),
            fmt(r["mlflow_rows_per_s"]),
            fmt(r["ratio"]),
            fmt(r["write_only_rows_per_s"]),
            fmt(r["write_only_ratio"]),
            fmt(r["load1"]),
        ]
        for r in res["rounds"]
    ]
    return Section(
        "Ingest: StepWriter (Parquet) vs MLflow log_batch",
        f"rows/s ratio >= {TARGET:g}",
        "PASS" if res["pass"] else "MISS",
        f"median ratio {fmt(res['ratio'])}",
        table,
        [
            f"{res['metrics_per_row']} float metrics per row; MLflow SQLite store, "
            f"log_batch of 1000 metrics ({fmt(res['mlflow_metrics_per_s'])} metrics/s); "
            f"Parquet chunks of {res['rows_per_chunk']} rows (snappy), fsynced; "
            f"{res['parquet_rows']:,} Parquet rows and {res['mlflow_rows']} MLflow rows per "
            "round, the two sides alternated; the ratio is the median of the per-round ratios.",
            "Write-only (diagnostic): the same chunks already built as Arrow tables, only "
            "written and committed: the ceiling for the row path.",
        ],
    )


if __name__ == "__main__":
    result = main()
    line = json.dumps(result, default=float)
    print(line)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(line)
    if not math.isfinite(result["ratio"]):
        sys.exit(1)
