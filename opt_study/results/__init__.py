"""Results of a study: Parquet (the source of truth) and MLflow (the index).

Only this package writes Parquet or talks to MLflow (paths and atomic writes come from
``opt_study.storage``). The submodules are imported explicitly
(``from opt_study.results.parquet import StepWriter``) so that importing one of them does not
pull in the others' heavy dependencies (MLflow is imported lazily even by ``mlflow_sink``).

- ``schema``: the versioned per-step schema; ``step_cells``: per-chunk validation of its cells.
- ``parquet``: the exactly-once chunked step writer and the "last attempt wins" reader.
- ``scan``: the one place that decides which chunks and steps survive ("last attempt wins"),
  used by ``parquet``, ``query`` and ``compact``.
- ``compact``: one file per attempt once a trial has finished.
- ``query``: DuckDB views over a study folder, and trial selection through MLflow.
- ``trials``: one JSON record per trial and the ``trials.parquet`` snapshot.
- ``replay_store``: checkpoint-replay rows.
- ``sink``: the ``Sink`` protocol the driver writes MLflow through, and ``NullSink``;
  ``mlflow_sink``: parent and child runs, summaries and downsampled curves;
  ``mlflow_queue``: a durable queue in front of it.
"""
