"""Results of a study: Parquet (the source of truth) and MLflow (the index).

Only this package writes Parquet, talks to MLflow or touches an object store. The submodules are imported explicitly
(``from opt_study.results.parquet import StepWriter``) so that importing one of them does not
pull in the others' heavy dependencies (MLflow is imported lazily even by ``mlflow_sink``).

- ``layout``: the directory layout of a study and the rules for names used in paths.
- ``schema``: the versioned per-step schema.
- ``parquet``: the exactly-once chunked step writer and the "last attempt wins" reader.
- ``trials``: one JSON record per trial and the ``trials.parquet`` snapshot.
- ``mlflow_sink``: parent and child runs, summaries and downsampled curves.
- ``compact``: one file per attempt once a trial has finished.
- ``storage``: object-store roots (s3://, gs://) served through a local working copy.
"""
