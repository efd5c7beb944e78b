"""`opt-study query / report / replay / sync-mlflow`: commands that read a study's results."""

from __future__ import annotations

import sys

from opt_study.cli.resolve import study_folder, study_spec
from opt_study.replay.job import add_hessian_args, hessian_options  # noqa: F401 - the parser uses add_hessian_args

EXIT_BAD_INPUT = 2

QUERY_HELP = """SQL over the study's views (DuckDB dialect):
  steps     one row per (trial, step), last attempt wins (columns: opt_study/results/schema.py)
  trials    one row per trial: trial_id, label, optimizer, workload, seed, status, index,
            "hp.<name>", "summary.<name>" (quote names that contain dots)
  steps_hp  steps joined with label, optimizer, workload, seed, status, index, "hp.<name>"
  groups    trial_id, step, group_name and the per-parameter-group raw sums
  replay    checkpoint-replay rows, where the study has a replay/ dataset
  steps_to_target, steps_to_target_pairs
            a search.protocol: steps_to_target study's result, as in its report: per optimizer
            the steps to the target (mean, 95% CI), final eval loss, margin, verdict; and the
            ordered pairs where A beats B (Welch at search.alpha)
example: opt-study query results/quickstart "SELECT optimizer, avg(smoothness_local)
         FROM steps_hp WHERE measured GROUP BY optimizer"
"""


def cmd_query(args) -> int:
    """The result on stdout in --format: table (fitted to the terminal) and markdown show
    --max-rows rows; csv and json print every row (for pipes). "saved" lines go to stderr then."""
    import shutil

    from opt_study.report.text import render
    from opt_study.results.query import QueryError, query, write_csv, write_parquet

    study = study_folder(args.study, "query")
    try:
        table = _protocol_query(study, args.sql) if "steps_to_target" in args.sql.lower() else query(study, args.sql)
    except QueryError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    fmt = getattr(args, "format", "table")
    shown = table.slice(0, args.max_rows) if fmt in ("table", "markdown") else table
    width = shutil.get_terminal_size().columns if fmt == "table" and sys.stdout.isatty() else None
    text = render(fmt, table.column_names, shown.to_pylist(), table.num_rows, width=width)
    if text:
        print(text)
    saved_to = sys.stdout if fmt == "table" else sys.stderr  # machine formats keep stdout clean
    if args.csv:
        print(f"saved {write_csv(table, args.csv)}", file=saved_to)
    if args.parquet:
        print(f"saved {write_parquet(table, args.parquet)}", file=saved_to)
    return 0


def _protocol_query(study, sql: str):
    """``sql`` with the steps-to-target views (computed by the report's code) beside the others."""
    from opt_study.report import data, steps_to_target

    d = data.load(study)
    try:
        steps_to_target.add_views(d)
        return d.db.table(sql)
    finally:
        d.db.close()


def cmd_report(args) -> int:
    from opt_study.report.build import write_report

    study = study_folder(args.study, "report")
    path = write_report(study, out=args.out, mlflow=not args.no_mlflow)
    print(f"report: {path}")
    print(f"open the MLflow UI: opt-study ui {study}")
    return 0


def cmd_replay(a) -> int:
    """Exit 0: all replayed; 1: a replay job failed; 2: bad input (nothing started)."""
    from opt_study.replay.job import run_replay
    from opt_study.storage.layout import check_reference
    from opt_study.trial import snapshots

    study_dir = study_spec(a.study, "replay").study_dir
    try:
        check_reference(a.reference)
        hessian = hessian_options(a)
        trials = a.trial or snapshots.snapshot_trials(study_dir)
        if not trials:
            raise ValueError(f"no trial of {study_dir} has snapshots (set measure.snapshot_every)")
        for t in trials:
            snapshots.resolve_reference(study_dir, t, a.reference)
    except (ValueError, FileNotFoundError) as e:  # FieldError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    failed = 0
    for t in trials:
        try:
            path = run_replay(study_dir, t, a.reference, hessian, objective=a.objective)
            print(f"{t}: {path}")
        except RuntimeError as e:
            print(f"{t}: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def cmd_sync_mlflow(a) -> int:
    """Deliver everything queued; exit 0 if nothing is left, else 1 after listing what is."""
    from opt_study.results.mlflow_queue import QueuedSink, redact
    from opt_study.results.query import experiment_name

    spec = study_spec(a.study, "sync-mlflow")  # an object-store root: entries queued on other machines
    folder = spec.study_dir
    sink = QueuedSink(folder, spec.tracking_uri, experiment_name(spec.study.name), study=spec.study.name)
    before = len(sink.pending())
    if a.retry_failed:
        before += sink.requeue_failed()
    left = sink.drain(force=True)
    print(
        f"{folder.name}: delivered {before - len(sink.pending())} of {before} queued MLflow "
        f"write(s) to {redact(spec.tracking_uri)}"
    )
    for path in sink.pending():
        print(f"  pending  {path.name}")
    if sink.pending():
        print(f"  (server still unreachable? last error: {sink.last_error})")
    for path in sink.failed():
        err = path.with_name(path.name + ".error.txt")
        print(f"  refused  {path.name}: {err.read_text() if err.is_file() else '?'}")
    return 0 if left == 0 else 1


MLFLOW_SERVER_HELP = """Run an MLflow tracking server on PostgreSQL until Ctrl-C or SIGTERM (cluster/README.md §2).

With STUDY (its YAML file or folder), it serves the study's `mlflow_uri` when that is
http://127.0.0.1:PORT or http://localhost:PORT: a private PostgreSQL in HOME (default
<storage>/mlflow_server, initialised on first use) and `mlflow server` on that port, with
artifacts under <storage>/mlartifacts. A study tracked elsewhere (another host, SQLite, a
database URI) needs nothing started here: the command says so and exits 0.
Without STUDY, --home is required and --port chooses the port.
--backend-store-uri names a database of your own instead (postgresql://user@host/db, the password
in PGPASSWORD): only `mlflow server` starts.
--wait SECONDS starts nothing: it waits until the study's (or --port's) server answers, for
scripts that started the server in the background (exit 1 if it does not in time).
"""


def cmd_mlflow_server(a) -> int:
    from opt_study.results.mlflow_server import serve, wait_healthy
    from opt_study.storage import objectstore, uris

    port, host, home, artifacts = a.port, a.host, a.home, a.artifacts
    if a.study:
        spec = study_spec(a.study)
        uri = spec.tracking_uri
        served = _served_port(uri)
        if served is None:
            where = uris.redact(uri)
            if uri.startswith("sqlite:"):
                print(
                    f"{spec.study.name} writes MLflow to the SQLite file {where}: nothing to serve. On a shared "
                    "file system (NFS, EFS, Lustre) SQLite's locking is unreliable: set "
                    "study.mlflow_uri: http://127.0.0.1:5000 and run this command beside the driver",
                    file=sys.stderr,
                )
                return 0
            if a.wait is not None and uri.startswith(("http://", "https://")):
                return _wait_for(uri, a.wait, wait_healthy)
            print(f"{spec.study.name} is tracked by {where}: nothing to start here")
            return 0
        port = served
        if objectstore.is_uri(spec.study.storage):
            home = home or "~/opt_study_mlflow"
            artifacts = artifacts or spec.study.storage.split("?", 1)[0].rstrip("/") + "/mlartifacts"
        else:
            home = home or str(spec.storage_root / "mlflow_server")
            artifacts = artifacts or str(spec.storage_root / "mlartifacts")
    if a.wait is not None:
        return _wait_for(f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}", a.wait, wait_healthy)
    if home is None:
        print("error: give a study, or --home for the server's state (database, logs)", file=sys.stderr)
        return EXIT_BAD_INPUT
    return serve(
        home,
        artifacts=artifacts,
        host=host,
        port=port,
        pg_port=a.pg_port,
        workers=a.workers,
        backend_store_uri=a.backend_store_uri,
    )


def _served_port(uri: str) -> int | None:
    """The port of a loopback ``http://`` tracking URI (served on this host), else None."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost") or parts.path not in ("", "/"):
        return None
    return parts.port or 80


def _wait_for(url: str, seconds: float, wait_healthy) -> int:
    if wait_healthy(url, seconds):
        print(f"MLflow answers at {url}")
        return 0
    print(f"error: no MLflow server answered at {url} within {seconds:.0f} s", file=sys.stderr)
    return 1
