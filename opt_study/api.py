"""The Python API behind ``import opt_study``: load, run and read a study.

A thin layer over the CLI's own functions (``validate.resolve_study``, ``study.run.run_study``,
``results.parquet.read_steps``, ``results.query``), so a script and ``opt-study`` see the same
study: the same checks, the same refusal of a changed spec, the same last-attempt-wins rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from opt_study.config import Spec
from opt_study.validate import resolve_study

if TYPE_CHECKING:  # tables come from opt_study.results; pyarrow is imported there only
    import pyarrow as pa


def load_study(path: str | Path) -> Spec:
    """The validated spec of a study YAML file or of a study folder (its spec.yaml).

    Raises ``opt_study.config.ConfigError`` naming the file and the field."""
    return resolve_study(path)


def run_study(spec: Spec | str | Path, extend: bool = False) -> dict:
    """Run (or continue) a study given as a validated ``Spec`` or a YAML path; returns
    ``{"ran": n, "parent_run_id": ...}``. A study that already holds trials refuses a changed
    spec (ConfigError) unless ``extend`` and the spec only adds trials."""
    from opt_study.study.run import run_study as _run

    text = None
    if not isinstance(spec, Spec):
        path = Path(spec)
        spec = resolve_study(path)
        text = path.read_text() if path.is_file() else None
    return _run(spec, source_text=text, extend=extend)


@dataclass(frozen=True)
class Results:
    """Read access to one study folder (what ``opt-study query`` reads)."""

    study_dir: Path

    def steps(self, trial_ids: list[str] | None = None) -> pa.Table:
        """Every stored step row, exactly once per (trial, step): last attempt wins."""
        from opt_study.results.parquet import read_steps

        return read_steps(self.study_dir, trial_ids)

    def trials(self) -> pa.Table:
        """One row per trial record: hyperparameters (``hp.*``), status, summary, resources."""
        from opt_study.results.trials import read_trial_records, trials_table

        return trials_table(read_trial_records(self.study_dir))

    def replay(self, trial_id: str | None = None) -> pa.Table:
        """Checkpoint-replay rows (``opt-study replay``)."""
        from opt_study.results.replay_store import read_replay

        return read_replay(self.study_dir, trial_id)

    def query(self, sql: str) -> pa.Table:
        """One SQL statement over the views ``steps``, ``trials``, ``steps_hp``, ``groups``, ``replay``."""
        from opt_study.results.query import query

        return query(self.study_dir, sql)


def open_results(study: str | Path) -> Results:
    """A ``Results`` accessor for a study folder, or for a study YAML (its folder under storage)."""
    p = Path(study)
    return Results(p.resolve() if p.is_dir() else resolve_study(p).study_dir)
