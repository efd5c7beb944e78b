"""`opt-study run / resume / status / validate / ui`: short entry points over opt_study.study.

Exit codes: 0 success, 1 a study ran but some trials failed, 2 bad input (a config error names
the file and the field; nothing is started or written).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from opt_study.config import ConfigError, Spec

from opt_study.validate import load_study

EXIT_BAD_INPUT = 2


def _spec_for(target: str) -> Spec:
    """A study YAML, or a study directory (which keeps the spec.yaml it was started from)."""
    p = Path(target)
    if p.is_dir():
        if not (p / "spec.yaml").is_file():
            raise ConfigError(str(p), "", "not a study directory (no spec.yaml); give the study's folder "
                                          "under the storage root, or its YAML file")
        spec = load_study(p / "spec.yaml")
        if spec.study_dir != p.resolve():
            # The study folder was moved: read and write where it is now.
            from dataclasses import replace
            spec = replace(spec, study=replace(spec.study, storage=str(p.resolve().parent)))
        return spec
    return load_study(p)


def cmd_validate(a) -> int:
    from opt_study.study.run import describe

    spec = load_study(a.file)
    print(f"{a.file}: OK")
    print(json.dumps(describe(spec), indent=2))
    return 0


def cmd_run(a) -> int:
    from opt_study.study.run import describe, run_study

    spec = load_study(a.file)
    if a.dry_run:
        print(json.dumps(describe(spec), indent=2))
        return 0
    run_study(spec, source_text=Path(a.file).read_text())
    return _finish(spec)


def cmd_resume(a) -> int:
    from opt_study.study.run import run_study

    spec = _spec_for(a.study)
    run_study(spec, source_text=None)
    return _finish(spec)


def _finish(spec: Spec) -> int:
    rc = cmd_status_spec(spec)
    remote = f" (working copy of {spec.study.storage})" if "://" in spec.study.storage else ""
    print(f"\nresults: {spec.study_dir}{remote}\n"
          f"  steps (Parquet): {spec.study_dir / 'steps'}\n"
          f"  trials table:    {spec.study_dir / 'trials.parquet'}\n"
          f"  MLflow:          {spec.tracking_uri}\n"
          f"open the MLflow UI: opt-study ui {spec.study_dir}\n"
          f"query with DuckDB: SELECT * FROM read_parquet('{spec.study_dir}/steps/**/*.parquet', hive_partitioning=true)")
    return rc


def cmd_status(a) -> int:
    from opt_study.storage import objectstore

    spec = _spec_for(a.study)
    objectstore.refresh_study(spec.study_dir, "status")
    return cmd_status_spec(spec)


def cmd_status_spec(spec: Spec) -> int:
    from opt_study.results.trials import read_trial_records

    recs = sorted(read_trial_records(spec.study_dir), key=lambda r: r["trial_id"])
    counts: dict[str, int] = {}
    # The paper's per-trial summary (arXiv:2407.01825): how often each convexity inequality
    # holds / is violated / is indeterminate (within the noise floor) on measured steps, and the
    # median local smoothness ‖g⁺−g‖/‖Δ‖.
    print(f"{'trial':<20}{'status':<10}{'final loss':>11}{'best eval':>10}"
          f"{'fwd h/v/i':>16}{'bwd h/v/i':>16}{'L med':>9}  hyperparameters")
    for r in recs:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        s = r.get("summary") or {}
        hp = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(r.get("hparams", {}).items()))
        print(f"{r['trial_id']:<20}{r['status']:<10}{_fmt(s.get('final_loss')):>11}{_fmt(s.get('best_eval_loss')):>10}"
              f"{_fracs(s, 'fwd'):>16}{_fracs(s, 'bwd'):>16}{_fmt(s.get('smoothness_local_median')):>9}  {hp}")
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


def cmd_ui(a) -> int:
    spec = _spec_for(a.study)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", spec.tracking_uri,
           "--host", a.host, "--port", str(a.port)]
    print("starting:", " ".join(cmd), flush=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return subprocess.call(cmd, env=env)


def cmd_compact(a) -> int:
    """Compact every trial's chunks (one file per attempt): for studies written before trials
    were compacted as they finished. Safe on a running study and rerunnable."""
    from opt_study.storage import objectstore
    from opt_study.results.compact import compact_study

    spec = _spec_for(a.study)
    objectstore.refresh_study(spec.study_dir, "compact")
    done = compact_study(spec.study_dir)
    print(f"{spec.study.name}: {len(done)} trial(s), "
          f"{sum(len(files) for files in done.values())} file(s) after compaction")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opt-study", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a study from its YAML file (continues an existing one)")
    r.add_argument("file")
    r.add_argument("--dry-run", action="store_true", help="print trials, resources and storage; start nothing")
    r.set_defaults(fn=cmd_run)
    r = sub.add_parser("resume", help="finish the unfinished trials of a study folder or YAML")
    r.add_argument("study")
    r.set_defaults(fn=cmd_resume)
    r = sub.add_parser("status", help="one line per trial: status, losses, hyperparameters")
    r.add_argument("study")
    r.set_defaults(fn=cmd_status)
    r = sub.add_parser("validate", help="check a study YAML without starting anything")
    r.add_argument("file")
    r.set_defaults(fn=cmd_validate)
    r = sub.add_parser("compact", help="merge each trial's Parquet chunks into one file per attempt")
    r.add_argument("study")
    r.set_defaults(fn=cmd_compact)
    r = sub.add_parser("ui", help="the MLflow UI on the study's tracking store")
    r.add_argument("study")
    r.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    r.add_argument("--port", type=int, default=5000)
    r.set_defaults(fn=cmd_ui)
    # Commands of other concerns register themselves (their heavy imports stay lazy).
    from opt_study.replay.job import register as register_replay
    from opt_study.report.commands import register as register_report

    register_replay(sub)
    from opt_study.results.mlflow_queue import register as register_sync_mlflow

    register_sync_mlflow(sub)
    register_report(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        return a.fn(a)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
