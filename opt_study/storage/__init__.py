"""The bottom layer: where a study's files live and how they are written.

- `names`: the one rule for names that become path components.
- `layout`: every path of a study folder, the symlink-safe `study_dir`, atomic writes.
- `objectstore`: object-store roots (s3://, gs://) served through a local working copy.

Nothing here imports another opt_study package, torch, Ray or MLflow.
"""
