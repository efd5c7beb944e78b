"""`opt-study`: the one parser listing every subcommand, and the one way a command finds its study.

Exit codes: 0 success; 1 a study ran (or a replay / an MLflow delivery was attempted) but
something failed, or it could not go on (the study is run by another process, the disk is full:
one line, nothing committed lost); 2 bad input (the error names the file and the field; nothing
is started or written); 130 interrupted (Ctrl-C; `opt-study resume` continues).
Heavy imports (torch, Ray, DuckDB, MLflow) happen inside the command functions, so
`opt-study --help` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import sys

from opt_study.cli import results_commands as results_cmd
from opt_study.cli import study_commands as study_cmd
from opt_study.config import ConfigError
from opt_study.storage.runlock import StudyBusy

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # the shell's code for a command ended by SIGINT


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="opt-study",
        description="Run, query and report optimizer studies "
        "(Ray Tune trials of DeepSpeed training with sharded measurements).",
        epilog="exit codes: 0 success, 1 some trials (or deliveries) failed, the study is already running "
        "or the disk is full, 2 bad input, 130 interrupted",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("validate", help="check a study YAML without starting anything; print its trial plan")
    r.add_argument("file")
    r.add_argument("--json", action="store_true", help="print the summary and every planned trial as JSON")
    r.set_defaults(fn=study_cmd.cmd_validate)
    r = sub.add_parser("run", help="run a study from its YAML file (continues an existing one)")
    r.add_argument("file")
    r.add_argument("--dry-run", action="store_true", help="print the trial plan, resources and storage; start nothing")
    r.add_argument("--json", action="store_true", help="with --dry-run: print it as JSON")
    r.add_argument(
        "--extend", action="store_true", help="allow a spec that adds trials to an existing study (and changes none)"
    )
    _verbose(r)
    r.set_defaults(fn=study_cmd.cmd_run)
    r = sub.add_parser("resume", help="finish the unfinished trials of a study folder or YAML")
    r.add_argument("study")
    _verbose(r)
    r.set_defaults(fn=study_cmd.cmd_resume)
    r = sub.add_parser("status", help="one line per trial: status, losses, hyperparameters")
    r.add_argument("study")
    r.add_argument("--json", action="store_true", help="print every trial record as JSON")
    r.set_defaults(fn=study_cmd.cmd_status)
    q = sub.add_parser(
        "query",
        help="run SQL over a study's Parquet record and trials",
        description=results_cmd.QUERY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("study", help="the study folder (<storage>/<study>) or its YAML file")
    q.add_argument("sql", help="one SQL statement over the views above")
    q.add_argument("--csv", metavar="PATH", help="also save the result as CSV")
    q.add_argument("--parquet", metavar="PATH", help="also save the result as Parquet")
    q.add_argument("--max-rows", type=int, default=50, help="rows to print (default 50)")
    q.add_argument(
        "--format",
        choices=("table", "csv", "json", "markdown"),
        default="table",
        help="table (default: fitted to the terminal width), csv, json (one object per row) or markdown",
    )
    q.set_defaults(fn=results_cmd.cmd_query)
    r = sub.add_parser(
        "report", help="write the study's HTML report (tables, figures) and log it to the study's MLflow parent run"
    )
    r.add_argument("study", help="the study folder (<storage>/<study>) or its YAML file")
    r.add_argument("--out", metavar="DIR", help="where to write it (default STUDY/report)")
    r.add_argument("--no-mlflow", action="store_true", help="do not log it to MLflow")
    r.set_defaults(fn=results_cmd.cmd_report)
    r = sub.add_parser(
        "replay",
        help="checkpoint replay: ⟨∇F(x_e), x_e − y⟩ and F(x_e) − F(y) "
        "for every saved snapshot x_e against a reference y",
    )
    r.add_argument("study", help="the study folder (with spec.yaml), or the study's YAML file")
    r.add_argument("--trial", action="append", help="trial id (repeatable; default: every trial with snapshots)")
    r.add_argument("--reference", default="final", help="final (default), init, or a snapshot step")
    r.add_argument(
        "--objective",
        default="eval",
        choices=("eval", "train"),
        help="F: the held-out evaluation set in eval mode (default), or f(·; B_e), the training batch of "
        "each snapshot's step e in train mode with that step's dropout masks",
    )
    results_cmd.add_hessian_args(r)
    r.set_defaults(fn=results_cmd.cmd_replay)
    r = sub.add_parser("compact", help="merge each trial's Parquet chunks into one file per attempt")
    r.add_argument("study")
    r.set_defaults(fn=study_cmd.cmd_compact)
    r = sub.add_parser(
        "sync-mlflow", help="deliver a study's queued MLflow writes (after the tracking server was unreachable)"
    )
    r.add_argument("study", help="the study's folder under the storage root, or its YAML file")
    r.add_argument(
        "--retry-failed",
        action="store_true",
        help="also retry the writes the server refused before (mlflow_queue/failed)",
    )
    r.set_defaults(fn=results_cmd.cmd_sync_mlflow)
    r = sub.add_parser(
        "mlflow-server",
        help="an MLflow tracking server on PostgreSQL for a study's mlflow_uri (cluster scripts start it)",
        description=results_cmd.MLFLOW_SERVER_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("study", nargs="?", help="the study's YAML file or folder (optional)")
    r.add_argument("--home", help="server state: database, password, logs (default <storage>/mlflow_server)")
    r.add_argument("--artifacts", help="artifact store: a folder, s3://... or gs://... (default <storage>/mlartifacts)")
    r.add_argument("--host", default="127.0.0.1", help="MLflow's bind address (default: loopback only)")
    r.add_argument("--port", type=int, default=5000, help="MLflow's port without a study (default 5000)")
    r.add_argument("--pg-port", type=int, help="the private PostgreSQL's port on 127.0.0.1 (default: a free one)")
    r.add_argument("--workers", type=int, default=2, help="MLflow server worker processes (default 2)")
    r.add_argument("--backend-store-uri", help="your own database (postgresql://user@host/db); no PostgreSQL starts")
    r.add_argument("--wait", type=float, metavar="SECONDS", help="start nothing; wait until the server answers")
    r.set_defaults(fn=results_cmd.cmd_mlflow_server)
    r = sub.add_parser("ui", help="the MLflow UI on the study's tracking store")
    r.add_argument("study")
    r.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    r.add_argument("--port", type=int, default=5000)
    r.set_defaults(fn=study_cmd.cmd_ui)
    return p


def _verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="also show Ray's and MLflow's own banners and warnings")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("opt_study")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        return a.fn(a)
    except ConfigError as e:  # ConfigErrors: one line per problem
        for err in getattr(e, "errors", [e]):
            print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StudyBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # also opt_study.study.run.StudyInterrupted
        print(f"interrupted: {e or 'stopped by the user'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(
            f"error: no space left on device writing {e.filename or 'the study'}; everything committed is kept: "
            "free space, then continue with `opt-study resume STUDY`",
            file=sys.stderr,
        )
        return 1
