"""SQL over a study folder (DuckDB on the Parquet record) and trial selection through MLflow.

``open_study(study_dir)`` returns a ``StudyDB``: an in-memory DuckDB connection on which these
views are registered (read-only; nothing in the study folder is written):

``steps``     one row per (trial, step), "last attempt wins" exactly as ``parquet.read_steps``:
              the live chunks of ``scan``, each read within its bounds (``scan.select_sql``);
              a chunk DuckDB fails on that pyarrow cannot read either is skipped with
              ``read_steps``'s warning. Columns: ``schema.STEP_SCHEMA``.
``trials``    one row per planned trial: the trial records (``trials/<id>.json``, the latest
              state, not the ``trials.parquet`` snapshot) flattened as in ``trials.parquet``
              (``"hp.<name>"``, ``"summary.<name>"``, ``"resources.<name>"``: quote them, they
              contain dots), plus the ``index`` of the trial within its optimizer's budget and,
              for trials of ``plan.json`` that have no record yet, a row with status ``pending``.
``steps_hp``  ``steps`` joined with the trial's ``label, optimizer, workload, seed, status,
              index`` and every ``"hp.<name>"`` column (a LEFT JOIN: a step row is never lost).
``groups``    the per-parameter-group raw sums: ``trial_id, step, group_name`` and the sums of
              ``schema.GROUP_SUM_COLUMNS``, one row per (trial, step, group) on measured steps.
``replay``    checkpoint-replay rows (``replay/**/*.parquet``: ``trial_id, step, reference,
              ip_grad_dist, loss_gap``), only where the study has a ``replay/`` dataset.

A layer above may add a view computed from these (``StudyDB.add_view``: the steps-to-target
tables of ``opt_study.report.steps_to_target`` for ``opt-study query``).

``query(study_dir, sql)`` runs one statement and returns a ``pyarrow.Table``. ``find_trials``
and ``best_per_optimizer`` select trials through ``mlflow.search_runs`` on the study's
experiment ``opt_study/<study>`` (the index: params, tags and summary metrics of each trial).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import warnings
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from opt_study.measure import authors
from opt_study.results import parquet, scan
from opt_study.results.schema import GROUP_SUM_COLUMNS, STEP_SCHEMA
from opt_study.results.trials import read_trial_records, trials_table
from opt_study.storage import layout

# Trial columns that steps_hp carries next to the hyperparameters.
_TRIAL_KEYS = ("label", "optimizer", "workload", "seed", "status", "index")


class QueryError(ValueError):
    """A SQL statement DuckDB refused (syntax, unknown view or column, type error)."""


def _sql_str(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# ------------------------------------------------------------------------------ step files


def _step_chunks(study_dir: Path) -> list[scan.Chunk]:
    """The live chunks of ``scan``'s rules, newest first: the fast path takes the first file's
    columns, and the schema only grows (see ``StudyDB._define_steps``)."""
    chunks = [c for trial in scan.scan_study(study_dir) for c in trial.live]
    return sorted(chunks, key=lambda c: _mtime(c.path), reverse=True)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:  # removed since the listing (a compaction): see StudyDB._skip_bad_chunk
        return 0


# ------------------------------------------------------------------------------ trials


def trial_rows(study_dir) -> pa.Table:
    """The ``trials`` view's table: records, plus ``plan.json`` trials without one (pending),
    with each trial's ``index`` from the plan (else parsed from ``<label>-<index>-s<seed>``)."""
    study_dir = Path(study_dir)
    records = {r["trial_id"]: dict(r) for r in read_trial_records(study_dir)}
    plan = _read_plan(study_dir)
    for p in plan:
        rec = records.setdefault(p["trial_id"], {"status": "pending"})
        for key in ("trial_id", "label", "optimizer", "hparams", "seed", "index"):
            rec.setdefault(key, p.get(key))
    for rec in records.values():
        if rec.get("index") is None:
            rec["index"] = _index_from_id(rec["trial_id"])
    table = trials_table(sorted(records.values(), key=lambda r: str(r["trial_id"])))
    if "index" in table.column_names:
        i = table.column_names.index("index")
        table = table.set_column(i, "index", table["index"].cast(pa.int64()))
    else:
        table = table.append_column("index", pa.nulls(table.num_rows, pa.int64()))
    return table


def _read_plan(study_dir: Path) -> list[dict]:
    try:
        plan = json.loads(layout.plan_path(study_dir).read_text())
    except (OSError, ValueError):
        return []
    return [p for p in plan if isinstance(p, dict) and "trial_id" in p] if isinstance(plan, list) else []


def _index_from_id(trial_id: str) -> int | None:
    parts = str(trial_id).rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


# ------------------------------------------------------------------------------ the database


class StudyDB:
    """A DuckDB connection with the views of the module docstring on one study folder.

    ``threads`` caps DuckDB's worker threads (None: DuckDB's default, all cores). Views are
    fixed when the object is made: a still-running study is seen as it was then.
    """

    def __init__(self, study_dir, threads: int | None = None):
        self.study_dir = Path(study_dir)
        if not self.study_dir.is_dir():
            raise FileNotFoundError(f"not a study folder: {self.study_dir}")
        self.con = duckdb.connect(":memory:")
        if threads is not None:
            self.con.execute(f"SET threads = {int(threads)}")
        self.trials = trial_rows(self.study_dir)
        self._register()

    def _register(self) -> None:
        con, self._chunks = self.con, _step_chunks(self.study_dir)
        # Footers are read once per connection, not at every query of the view.
        con.execute("SET parquet_metadata_cache = true")
        con.register("_trials", self.trials)
        con.execute("CREATE VIEW trials AS SELECT * FROM _trials")
        con.register("_no_steps", STEP_SCHEMA.empty_table())
        self._define_steps(union_by_name=False)
        hp = [n for n in self.trials.column_names if n.startswith("hp.")]
        keep = ", ".join(f"t.{_ident(n)}" for n in (*_TRIAL_KEYS, *hp) if n in self.trials.column_names)
        con.execute(
            f"CREATE VIEW steps_hp AS SELECT s.*, {keep} FROM steps s LEFT JOIN trials t ON s.trial_id = t.trial_id"
        )
        sums = ", ".join(f"g.{_ident(c)}" for c in GROUP_SUM_COLUMNS)
        con.execute(
            "CREATE VIEW groups AS SELECT trial_id, step, g.name AS group_name, "
            f"{sums} FROM (SELECT trial_id, step, UNNEST(groups) AS g FROM steps "
            "WHERE groups IS NOT NULL)"
        )
        replay = layout.replay_dir(self.study_dir)
        self.has_replay = replay.is_dir() and any(replay.rglob("*.parquet"))
        if self.has_replay:
            glob = _sql_str(str(replay / "**" / "*.parquet"))
            con.execute(
                f"CREATE VIEW replay AS SELECT * FROM read_parquet({glob}, "
                "hive_partitioning = false, union_by_name = true)"
            )

    def _define_steps(self, union_by_name: bool) -> None:
        """(Re)define ``steps``: ``scan.select_sql`` over the live chunks; where they lack
        columns of this code's schema (older files), those columns are added as typed NULLs
        (UNION ALL BY NAME with an empty STEP_SCHEMA table). Dependent views bind by name at
        each query, so they follow. No chunk yet: the right columns, no rows.

        ``union_by_name`` false (the fast path): DuckDB takes the columns of the first file
        (the newest, ``_step_chunks``) and matches the others by name, without reading every
        footer at each query (~0.2-0.7 ms per file). It is widened at once if the first file
        lacks a column; a later file that lacks one makes a query fail with a schema mismatch,
        and ``table`` widens then."""
        con, self._union = self.con, union_by_name
        if not self._chunks:
            con.execute("CREATE OR REPLACE VIEW steps AS SELECT * FROM _no_steps")
            return
        try:  # binding the view reads the first file's footer
            con.execute(f"CREATE OR REPLACE VIEW _steps_scan AS {scan.select_sql(self._chunks, union_by_name)}")
            have = [d[0] for d in con.execute("DESCRIBE _steps_scan").fetchall()]
        except duckdb.Error as e:
            if self._skip_bad_chunk(e):
                return self._define_steps(union_by_name)
            raise
        # Schema order first, then any column newer than this code's schema.
        cols = ", ".join(_ident(n) for n in (*STEP_SCHEMA.names, *(n for n in have if n not in STEP_SCHEMA.names)))
        if set(STEP_SCHEMA.names) <= set(have):
            con.execute(f"CREATE OR REPLACE VIEW steps AS SELECT {cols} FROM _steps_scan")
        elif not union_by_name:
            self._define_steps(union_by_name=True)
        else:
            con.execute(
                f"CREATE OR REPLACE VIEW steps AS SELECT {cols} FROM (SELECT * FROM _steps_scan "
                "UNION ALL BY NAME SELECT * FROM _no_steps)"
            )

    def _widen(self) -> bool:
        """Rebuild ``steps`` with union_by_name (files of different schemas); False if it
        already was."""
        if self._union or not self._chunks:
            return False
        self._define_steps(union_by_name=True)
        return True

    def _skip_bad_chunk(self, error: duckdb.Error) -> bool:
        """Rule 4 of ``scan``, found when DuckDB fails on a chunk its message names: a chunk
        pyarrow cannot use either (``parquet.read_chunk``) leaves the view's chunks with the
        warning of ``read_steps``; a chunk removed since the scan (a compaction) makes the view
        scan the study again. True if the chunks changed: redefine ``steps`` and retry.
        (The message may quote the view's SQL, which names other files: each is checked.)"""
        for chunk in [c for c in self._chunks if str(c.path) in str(error)]:
            if not chunk.path.exists():
                self._chunks = _step_chunks(self.study_dir)
                return True
            try:
                parquet.read_chunk(chunk)
            except ValueError as e:
                warnings.warn(f"skipping bad step chunk {chunk.path}: {e}", stacklevel=4)
                self._chunks = [c for c in self._chunks if c is not chunk]
                return True
        return False  # every file it names is fine: the error is the statement's

    def table(self, sql: str, params=None) -> pa.Table:
        """The result of one SQL statement as a ``pyarrow.Table``; ``QueryError`` if DuckDB
        refuses it. ``params`` fill ``?`` placeholders."""
        try:
            return self._fetch(sql, params)
        except duckdb.Error as e:
            if "schema mismatch" in str(e) and self._widen():
                return self.table(sql, params)
            if self._skip_bad_chunk(e):
                self._define_steps(self._union)
                return self.table(sql, params)
            raise QueryError(str(e)) from e

    def _fetch(self, sql: str, params) -> pa.Table:
        rel = self.con.sql(sql, params=params)
        if rel is None:  # a statement without a result (e.g. SET, CREATE VIEW)
            return pa.table({})
        # duckdb >= 1.4 names it to_arrow_table; older releases only have fetch_arrow_table.
        fetch = getattr(rel, "to_arrow_table", None) or rel.fetch_arrow_table
        return fetch()

    def add_view(self, name: str, rows: list[dict], columns: list[str]) -> None:
        """Register ``rows`` (dicts with ``columns``) as the read-only view ``name``."""
        self.con.register(f"_{name}", pa.table({c: [r.get(c) for r in rows] for c in columns}))
        self.con.execute(f"CREATE OR REPLACE VIEW {_ident(name)} AS SELECT * FROM {_ident('_' + name)}")

    def rows(self, sql: str, params=None) -> list[dict]:
        """The result as a list of dicts (column name -> Python value)."""
        return self.table(sql, params).to_pylist()

    def columns(self, sql: str, params=None) -> dict[str, np.ndarray]:
        """The result as column name -> numpy array (nulls become NaN in numeric columns)."""
        t = self.table(sql, params)
        return {n: _to_numpy(t[n]) for n in t.column_names}

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "StudyDB":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# The stored columns the authors' aggregates read (measure.authors.aggregate).
_AUTHORS_COLS = ("loss", "loss_probe", "probe_s", "ip_probe_update", "smoothness_authors", "flag")


def authors_aggregates(db: StudyDB, window: int | None = None) -> list[dict]:
    """The aggregates of arXiv:2407.01825's code (docs/METRICS.md §Authors' aggregates) per
    trial and window: ``window`` = None takes a trial's whole run (their run_clm.py: nothing is
    reset), ``window`` = k restarts every k steps, i.e. windows step // k (their CIFAR
    train.py: reset every epoch). One dict per (trial_id, window) with ``first_step``,
    ``last_step`` and measure.authors.AUTHORS_NAMES."""
    if window is not None and int(window) < 1:
        raise ValueError(f"window must be >= 1 step, got {window}")
    have = {d[0] for d in db.con.execute("DESCRIBE steps").fetchall()}
    cols = ", ".join(c if c in have else f"NULL AS {c}" for c in _AUTHORS_COLS)
    key = "0" if window is None else f"step // {int(window)}"
    rows = db.rows(f"SELECT trial_id, {key} AS win, step, {cols} FROM steps WHERE measured ORDER BY trial_id, step")
    out: list[dict] = []
    for (tid, w), group in itertools.groupby(rows, key=lambda r: (r["trial_id"], r["win"])):
        part = list(group)
        head = {"trial_id": tid, "window": w, "first_step": part[0]["step"], "last_step": part[-1]["step"]}
        out.append({**head, **authors.aggregate(part)})
    return out


def _to_numpy(col: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_floating(col.type) or pa.types.is_integer(col.type):
        return col.cast(pa.float64()).to_numpy() if col.null_count else col.to_numpy()
    return np.array(col.to_pylist(), dtype=object)


def open_study(study_dir, threads: int | None = None) -> StudyDB:
    """A ``StudyDB`` on ``study_dir`` (see the module docstring for the views)."""
    return StudyDB(study_dir, threads=threads)


def query(study_dir, sql: str, threads: int | None = None) -> pa.Table:
    """Run ``sql`` against the views of ``study_dir`` and return a ``pyarrow.Table``."""
    with open_study(study_dir, threads=threads) as db:
        return db.table(sql)


def write_csv(table: pa.Table, path) -> Path:
    """Save a query result as CSV (header row; nulls as empty cells); return the path."""
    import pyarrow.csv as pacsv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(table, path)
    return path


def write_parquet(table: pa.Table, path) -> Path:
    """Save a query result as one Parquet file (zstd); return the path."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")
    return path


# ------------------------------------------------------------------------------ MLflow index


@contextlib.contextmanager
def _tracking(tracking_uri: str):
    """Point ``mlflow``'s fluent API at ``tracking_uri`` for the block, then restore it."""
    import mlflow

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(before)


def experiment_name(study: str) -> str:
    """The MLflow experiment of a study (as ``opt_study.study`` creates it)."""
    return f"opt_study/{layout.check_name(study, 'study name')}"


def parent_run_id(tracking_uri: str, study: str) -> str | None:
    """The id of the study's parent run (tag ``opt_study.role=parent``), None if absent."""
    with _tracking(tracking_uri) as mlflow:
        runs = mlflow.search_runs(
            experiment_names=[experiment_name(study)],
            filter_string=f"tags.`opt_study.study` = {_sql_str(study)} AND tags.`opt_study.role` = 'parent'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
            output_format="list",
        )
    return runs[0].info.run_id if runs else None


def find_trials(tracking_uri: str, study: str, optimizer: str | None = None, filter_string: str | None = None):
    """The trial (child) runs of ``study`` as the pandas DataFrame of ``mlflow.search_runs``
    (columns ``run_id``, ``params.*``, ``metrics.*``, ``tags.*``), optionally only those of
    ``optimizer`` (tag ``opt_study.optimizer``) and matching an MLflow ``filter_string``
    (e.g. ``"metrics.best_eval_loss < 3.5"``). Empty if the study has no runs."""
    parent = parent_run_id(tracking_uri, study)
    clauses = [f"tags.`mlflow.parentRunId` = {_sql_str(parent or '-')}"]
    if optimizer is not None:
        clauses.append(f"tags.`opt_study.optimizer` = {_sql_str(layout.check_name(optimizer, 'optimizer'))}")
    if filter_string:
        clauses.append(f"{filter_string}")
    with _tracking(tracking_uri) as mlflow:
        return mlflow.search_runs(
            experiment_names=[experiment_name(study)], filter_string=" AND ".join(clauses), max_results=100_000
        )


def best_per_optimizer(tracking_uri: str, study: str, metric: str = "summary/best_eval_loss"):
    """One row per optimizer (tag ``opt_study.optimizer``): the trial run with the lowest
    finite ``metrics.<metric>`` (by default the best evaluation loss as the runner logs it,
    mlflow_sink.trial_metrics), as a pandas DataFrame sorted by that metric. Optimizers whose
    every trial lacks a finite value (all diverged or failed) are left out; ``find_trials``
    lists them."""
    runs = find_trials(tracking_uri, study)
    col, key = f"metrics.{metric}", "tags.opt_study.optimizer"
    if runs.empty or col not in runs.columns or key not in runs.columns:
        return runs.iloc[0:0]
    ok = runs[np.isfinite(runs[col].astype(float))]
    best = ok.loc[ok.groupby(key)[col].idxmin()]
    return best.sort_values(col).reset_index(drop=True)
