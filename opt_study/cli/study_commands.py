"""`opt-study validate / run / resume / status / compact / ui`: short entry points over opt_study.study."""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from opt_study.cli.resolve import study_spec
from opt_study.config import Spec
from opt_study.storage import layout
from opt_study.validate import load_study


def _load(file: str) -> Spec:
    """The validated spec of a study YAML that is to run: its storage and data too, and its
    trial ids (a layer above validate: the ids come from the planners)."""
    from opt_study.plan.planners import check_trial_ids
    from opt_study.validate import check_runnable, storage_warnings

    spec = load_study(file)
    check_runnable(spec)
    check_trial_ids(spec)
    for line in storage_warnings(spec):
        print(line, file=sys.stderr)
    return spec


def cmd_validate(a) -> int:
    """stdout: the plan only (a table, or JSON with --json), so it pipes; "OK" goes to stderr."""
    spec = _load(a.file)
    if not getattr(a, "json", False):
        print(f"{a.file}: OK", file=sys.stderr)
    print_plan(spec, getattr(a, "json", False))
    return 0


def print_plan(spec: Spec, as_json: bool) -> None:
    """The study summary and every trial it will run: a table, or (as_json) one JSON document
    {"summary", "imported", "trials"}. User code imported by validation is named."""
    from opt_study.report.text import format_table
    from opt_study.study.run import describe, plan_table
    from opt_study.validate import imported_modules

    rows, imported = plan_table(spec), imported_modules(spec)
    summary = describe(spec)
    if as_json:
        print(json.dumps({"summary": summary, "imported": imported, "trials": rows}, indent=1, default=str))
        return
    for line in imported:
        print(f"imported {line}")
    for k, v in summary.items():
        v = ", ".join(f"{a}: {b}" for a, b in v.items()) if isinstance(v, dict) else v
        print(f"{k + ':':<21}{v}")
    print()
    names = ["trial", "phase", "budget", "seed", "status", "hyperparameters"]
    table = [
        {
            "trial": r["trial_id"],
            "phase": r["phase"] or "-",
            "budget": r["budget"] or "-",
            "seed": r["seed"],
            "status": r["status"],
            "hyperparameters": ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(r["hparams"].items())) or "-",
        }
        for r in rows
    ]
    print(format_table(names, table, len(table), align_left=("trial", "phase", "budget", "status", "hyperparameters")))


def cmd_run(a) -> int:
    from opt_study.study.run import run_study

    spec = _load(a.file)
    if a.dry_run:
        print_plan(spec, a.json)
        return 0
    run_study(spec, source_text=Path(a.file).read_text(), extend=a.extend, verbose=a.verbose)
    return _finish(spec)


def cmd_resume(a) -> int:
    from opt_study.study.run import run_study

    spec = study_spec(a.study)
    run_study(spec, source_text=None, verbose=a.verbose)
    return _finish(spec)


def _finish(spec: Spec) -> int:
    rc = status_table(spec)
    remote = f" (working copy of {spec.study.storage})" if "://" in spec.study.storage else ""
    print(
        f"\nresults: {spec.study_dir}{remote}\n"
        f"  steps (Parquet): {layout.steps_dir(spec.study_dir)}\n"
        f"  trials table:    {layout.trials_table_path(spec.study_dir)}\n"
        f"  MLflow:          {spec.tracking_uri}\n"
        f"open the MLflow UI: opt-study ui {spec.study_dir}\n"
        # the `steps` view keeps the last attempt of each step (a raw read_parquet does not)
        f'query with SQL:     opt-study query {spec.study_dir} "SELECT * FROM steps LIMIT 5"'
    )
    return rc


def cmd_status(a) -> int:
    spec = study_spec(a.study, "status")
    if getattr(a, "json", False):
        return status_json(spec)
    return status_table(spec)


def status_json(spec: Spec) -> int:
    """{"study", "study_dir", "counts", "trials": [every trial record]}; exit code 1 if some trial failed."""
    from opt_study.results.trials import read_trial_records

    recs = sorted(read_trial_records(spec.study_dir), key=lambda r: r["trial_id"])
    counts = dict(sorted(collections.Counter(r["status"] for r in recs).items()))
    doc = {"study": spec.study.name, "study_dir": str(spec.study_dir), "counts": counts, "trials": recs}
    # NaN (a diverged trial's losses) is not JSON: null instead, so any JSON reader takes it
    print(json.dumps(_nan_to_none(doc), indent=1, default=str, allow_nan=False))
    return 1 if counts.get("failed") else 0


def _nan_to_none(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_nan_to_none(x) for x in v]
    return v


def status_table(spec: Spec) -> int:
    """One line per trial; exit code 1 if some trial failed."""
    from opt_study.results.trials import read_trial_records

    recs = sorted(read_trial_records(spec.study_dir), key=lambda r: r["trial_id"])
    counts: dict[str, int] = {}
    # The paper's per-trial summary (arXiv:2407.01825): how often each convexity inequality
    # holds / is violated / is indeterminate (within the noise floor) on measured steps, and the
    # median local smoothness ‖g⁺−g‖/‖Δ‖.
    print(
        f"{'trial':<20}{'status':<10}{'final loss':>11}{'best eval':>10}"
        f"{'fwd h/v/i':>16}{'bwd h/v/i':>16}{'L med':>9}  hyperparameters"
    )
    for r in recs:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        s = r.get("summary") or {}
        hp = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(r.get("hparams", {}).items()))
        print(
            f"{r['trial_id']:<20}{r['status']:<10}{_fmt(s.get('final_loss')):>11}{_fmt(s.get('best_eval_loss')):>10}"
            f"{_fracs(s, 'fwd'):>16}{_fracs(s, 'bwd'):>16}{_fmt(s.get('smoothness_local_median')):>9}  {hp}"
        )
    print("  ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "no trials yet")
    return 1 if counts.get("failed") else 0


def _fracs(s: dict, side: str) -> str:
    vals = [s.get(f"frac_convexity_{side}_{k}") for k in ("holds", "violated", "indeterminate")]
    if any(v is None or v != v for v in vals):
        return "-"
    return "/".join(f"{v:.2f}" for v in vals)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def cmd_compact(a) -> int:
    """Compact every trial's chunks (one file per attempt): for studies written before trials
    were compacted as they finished. Safe on a running study and rerunnable."""
    from opt_study.results.compact import compact_study

    spec = study_spec(a.study, "compact")
    done = compact_study(spec.study_dir)
    print(
        f"{spec.study.name}: {len(done)} trial(s), "
        f"{sum(len(files) for files in done.values())} file(s) after compaction"
    )
    return 0


def cmd_ui(a) -> int:
    """The MLflow UI on the study's store: a local store gets an ``mlflow ui`` started here; a
    tracking server already is one, so the command says where to open it and starts nothing."""
    from opt_study.results.mlflow_queue import fast_failing_http, redact
    from opt_study.results.mlflow_sink import experiment_link, repoint_local_artifacts
    from opt_study.results.query import experiment_name

    spec = study_spec(a.study)
    name = experiment_name(spec.study.name)
    if spec.tracking_uri.startswith(("http://", "https://")):
        print(f"{spec.study.name} is tracked by the MLflow server {redact(spec.tracking_uri)}; open:")
        with fast_failing_http(5):  # a server that is down: the UI's home page, not minutes of retries
            link = experiment_link(spec.tracking_uri, name, spec.tracking_uri)
        print(f"  {redact(link)}")
        return 0
    repoint_local_artifacts(spec.tracking_uri)  # a storage root that was moved keeps its artifacts
    host = "localhost" if a.host in ("0.0.0.0", "127.0.0.1", "::") else a.host
    link = experiment_link(spec.tracking_uri, name, f"http://{host}:{a.port}")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", spec.tracking_uri]
    cmd += ["--host", a.host, "--port", str(a.port)]
    print("starting:", " ".join(cmd), flush=True)
    print(f"open the study's runs (training view): {link}", flush=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return subprocess.call(cmd, env=env)
