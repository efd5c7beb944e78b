"""What the study driver writes to MLflow through: the ``Sink`` protocol, and ``NullSink``.

Three implementations: ``mlflow_sink.MlflowSink`` writes at once; ``mlflow_queue.QueuedSink``
puts a durable queue in front of it (what ``opt-study run`` uses, so an MLflow outage never
stops training); ``NullSink`` writes nothing (tests, and studies run without MLflow). The
driver (``opt_study.study.run``, ``opt_study.study.recorder``) is typed against ``Sink`` only.

A run id may be None where a sink has not created the run yet (a ``QueuedSink`` whose server
is unreachable, or ``NullSink``): the same sink resolves it later, so a caller passes back
whatever ``parent_run`` returned.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Sink(Protocol):
    def parent_run(self, study: str, params: dict, tags: dict) -> str | None:
        """The study's parent run, created on first use, with missing params and ``tags``."""

    def log_trial(
        self,
        parent_run_id: str | None,
        trial_id: str,
        params: dict,
        tags: dict,
        summary: dict[str, float],
        curves: dict[str, list[tuple[int, float]]],
        status: str,
    ) -> str | None:
        """The trial's child run under the parent, with what it lacks (idempotent)."""

    def end_parent(self, parent_run_id: str | None, status: str = "FINISHED") -> None:
        """Mark the parent run terminated."""

    def log_artifacts(self, run_id: str | None, folder) -> None:
        """Upload the files under ``folder`` to the run, under ``<folder's name>/``."""

    def drain(self, force: bool = True) -> int:
        """Deliver what waits; return how many writes are still not delivered."""


class NullSink:
    """A ``Sink`` that writes nothing: every run id is None, nothing is ever pending."""

    def parent_run(self, study: str, params: dict, tags: dict) -> str | None:
        return None

    def log_trial(
        self,
        parent_run_id: str | None,
        trial_id: str,
        params: dict,
        tags: dict,
        summary: dict[str, float],
        curves: dict[str, list[tuple[int, float]]],
        status: str,
    ) -> str | None:
        return None

    def end_parent(self, parent_run_id: str | None, status: str = "FINISHED") -> None:
        return None

    def log_artifacts(self, run_id: str | None, folder) -> None:
        return None

    def drain(self, force: bool = True) -> int:
        return 0
