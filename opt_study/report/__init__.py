"""The paper's tables and figures from a stored study, and the one-page HTML report.

Reads a study only through ``opt_study.results`` (DuckDB views over the Parquet record, the
trial records, MLflow for the parent run) and reuses ``opt_study.measure.metrics``' classes and
aggregate rules (docs/METRICS.md §Aggregates). Modules, one concern each:

- ``data``: ``load(study_dir) -> StudyData``: per-trial statistics in SQL, best configurations;
- ``stats``: confidence intervals, the (L0, L1) envelope fit, budgets, performance profiles;
- ``series``: the step series behind the figures;
- ``tables``: one function per table (row dicts);
- ``figures``: one function per figure (``matplotlib.figure.Figure``, no pyplot);
- ``render``, ``build``: the HTML page; ``build.write_report(study_dir)``;
- ``text``: plain-text tables (``opt-study query``, the analysis recipes).

``from opt_study.report import write_report`` works; the heavy modules load on first use.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "write_report":
        from opt_study.report.build import write_report

        return write_report
    raise AttributeError(f"module 'opt_study.report' has no attribute {name!r}")
