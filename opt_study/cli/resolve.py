"""The one way a command turns its STUDY argument (a study YAML or a study folder) into a study.

What each reading command needs of a study folder (top-level names), so that on an object-store
root it pulls only those parts (opt_study.storage.objectstore.refresh_study).
"""

from __future__ import annotations

from pathlib import Path

from opt_study.config import ConfigError, Spec
from opt_study.storage import layout, objectstore
from opt_study.validate import load_study, resolve_study

L = layout
META = (L.SPEC_FILE, L.PLAN_FILE, L.TRIALS_DIR, L.TRIALS_TABLE)
READS = {
    "status": META,
    "query": META + (L.STEPS_DIR, L.REPLAY_DIR),
    "report": META + (L.STEPS_DIR, L.REPLAY_DIR),
    "replay": META + (L.SNAPSHOTS_DIR, L.REPLAY_DIR),
    "sync-mlflow": (L.SPEC_FILE, L.MLFLOW_QUEUE_DIR),
    "compact": META + (L.STEPS_DIR,),
}


def study_spec(target: str, command: str | None = None) -> Spec:
    """The validated spec of a study YAML or a study folder (which may have been moved); with
    ``command``, the folder is first refreshed from the object store with what it reads."""
    spec = resolve_study(target)
    if command is not None:
        objectstore.refresh_study(spec.study_dir, READS[command])
    return spec


def study_folder(target: str, command: str) -> Path:
    """The study folder named by ``target`` (a folder, or the study's YAML file), refreshed
    from the object store. A folder needs only its results (steps/ or trials/): `query` and
    `report` read a copied results folder without its spec. ConfigError otherwise."""
    p = Path(target)
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        p = load_study(p).study_dir
    p = p.resolve()
    objectstore.refresh_study(p, READS[command])
    if not p.is_dir() or not any((p / n).exists() for n in (L.STEPS_DIR, L.TRIALS_DIR, L.SPEC_FILE)):
        raise ConfigError(str(target), "", "not a study folder (no steps/, trials/ or spec.yaml)")
    return p
