"""``opt-study query STUDY "SQL"`` and ``opt-study report STUDY``: registered on the main CLI.

``register(subparsers)`` adds both subcommands; each sets ``fn(args) -> int`` (exit code 0 on
success, 2 on bad input: not a study folder, or SQL that DuckDB refuses). Heavy imports
(DuckDB, pyarrow, matplotlib, MLflow) happen inside the functions, so ``opt-study --help``
stays fast.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2

QUERY_HELP = """SQL over the study's views (DuckDB dialect):
  steps     one row per (trial, step), last attempt wins (columns: opt_study/results/schema.py)
  trials    one row per trial: trial_id, label, optimizer, workload, seed, status, index,
            "hp.<name>", "summary.<name>" (quote names that contain dots)
  steps_hp  steps joined with label, optimizer, workload, seed, status, index, "hp.<name>"
  groups    trial_id, step, group_name and the per-parameter-group raw sums
  replay    checkpoint-replay rows, where the study has a replay/ dataset
example: opt-study query results/quickstart "SELECT optimizer, avg(smoothness_local)
         FROM steps_hp WHERE measured GROUP BY optimizer"
"""


def register(subparsers) -> None:
    """Add the ``query`` and ``report`` subcommands to an argparse ``subparsers`` object."""
    import argparse

    q = subparsers.add_parser("query", help="run SQL over a study's Parquet record and trials",
                              description=QUERY_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("study", help="the study folder (<storage>/<study>) or its YAML file")
    q.add_argument("sql", help="one SQL statement over the views above")
    q.add_argument("--csv", metavar="PATH", help="also save the result as CSV")
    q.add_argument("--parquet", metavar="PATH", help="also save the result as Parquet")
    q.add_argument("--max-rows", type=int, default=50, help="rows to print (default 50)")
    q.set_defaults(fn=cmd_query)
    r = subparsers.add_parser("report", help="write the study's HTML report (tables, figures) "
                                             "and log it to the study's MLflow parent run")
    r.add_argument("study", help="the study folder (<storage>/<study>) or its YAML file")
    r.add_argument("--out", metavar="DIR", help="where to write it (default STUDY/report)")
    r.add_argument("--no-mlflow", action="store_true", help="do not log it to MLflow")
    r.set_defaults(fn=cmd_report)


def _study(path: str, command: str) -> Path | None:
    """The study folder named by ``path`` (a folder, or the study's YAML file), refreshed from
    the object store when its root is one."""
    from opt_study.storage import objectstore

    p = Path(path)
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        from opt_study.config import ConfigError
        from opt_study.validate import load_study

        try:
            p = load_study(p).study_dir
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return None
    objectstore.refresh_study(p, command)
    if not p.is_dir() or not ((p / "steps").is_dir() or (p / "trials").is_dir()
                              or (p / "spec.yaml").is_file()):
        print(f"error: {path} is not a study folder (no steps/, trials/ or spec.yaml)",
              file=sys.stderr)
        return None
    return p


def cmd_query(args) -> int:
    from opt_study.results.query import QueryError, query, write_csv, write_parquet

    study = _study(args.study, "query")
    if study is None:
        return EXIT_BAD_INPUT
    try:
        table = query(study, args.sql)
    except QueryError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(format_table(table.column_names, table.slice(0, args.max_rows).to_pylist(),
                       table.num_rows))
    if args.csv:
        print(f"saved {write_csv(table, args.csv)}")
    if args.parquet:
        print(f"saved {write_parquet(table, args.parquet)}")
    return 0


def format_table(names: list[str], rows: list[dict], total: int) -> str:
    """A plain-text table: a header, a rule, one line per row (floats to 6 significant digits),
    and ``(k of n rows)`` when rows were left out."""
    cells = [[_cell(r.get(n)) for n in names] for r in rows]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    out = [line(names), "  ".join("-" * w for w in widths), *(line(c) for c in cells)]
    out.append(f"({len(rows)} of {total} rows)" if len(rows) < total else f"({total} rows)")
    return "\n".join(out)


def _cell(v) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    return str(v)


def cmd_report(args) -> int:
    from opt_study.report.build import write_report

    study = _study(args.study, "report")
    if study is None:
        return EXIT_BAD_INPUT
    path = write_report(study, out=args.out, mlflow=not args.no_mlflow)
    print(f"report: {path}")
    print(f"open the MLflow UI: opt-study ui {study}")
    return 0
