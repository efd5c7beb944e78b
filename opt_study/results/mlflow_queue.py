"""A durable local queue in front of MLflow: an outage never stops training, loses a write, or
makes one twice.

Every MLflow write of the driver (``parent_run``, ``log_trial``, ``end_parent``,
``log_artifacts``) is first
committed as one JSON file ``<study>/mlflow_queue/<seq>-<kind>-<key>.json`` (temp file, fsync,
rename: see ``layout.atomic_write``), then delivered; a delivered entry's file is removed.
Entries are delivered strictly in ``seq`` order, so a trial's later state never overtakes an
earlier one and the parent is created before its children.

Failures:

- *transient* (server down, timeout, 5xx, 401/403/409/429, a locked SQLite file): the entry
  stays and delivery stops there; the call returns at once (``None``) and training goes on.
  Delivery is tried again before the next write (drain first, oldest first), at study end
  (``drain()``) and by ``opt-study sync-mlflow STUDY``. After a transient failure, automatic
  attempts pause for ``retry_interval_s`` so that a black-holed server costs one timeout per
  interval, not one per trial; explicit drains always try.
- *permanent* (the server refuses the request: 400/404; a param that would change value; an
  artifact folder that is gone): the
  entry moves to ``mlflow_queue/failed/`` with a ``.error.txt`` beside it, a warning is issued,
  and later entries go on. ``sync-mlflow --retry-failed`` puts them back in their place.

Re-delivery is always safe, because every operation of ``MlflowSink`` is idempotent: runs are
found by tags before one is created (and created with those tags in the same request), params
and curve points already present are skipped, a summary metric is re-logged only if its value
changed. So an entry whose request reached the server but whose response was lost, or whose
file outlived a crash right after delivery, is delivered again without duplicating anything.
A ``log_trial`` queued before the parent run existed carries the study name, and its parent is
looked up by tag when it is delivered.

Fast failure: MLflow's HTTP client retries a failed request with exponential backoff for
minutes by default (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``).
The queue is the retry mechanism here, so around its own MLflow calls it sets
``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT=request_timeout_s``
in this process (restored afterwards; mlflow reads them on every request).

One process delivers at a time (``flock`` on ``mlflow_queue/.lock``): a running study and a
``sync-mlflow`` started beside it never deliver the same entry concurrently.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from opt_study.results.mlflow_sink import MlflowSink, check_trial_args, downsample, flatten_params
from opt_study.storage import layout, uris

FAILED_DIR = "failed"
LOCK_FILE = ".lock"
ENTRY_FORMAT = 1
KINDS = ("parent_run", "log_trial", "end_parent", "log_artifacts")
_ENTRY_RE = re.compile(r"([0-9]{12})-(" + "|".join(KINDS) + r")-([A-Za-z0-9_.-]+)\.json")
_USERINFO_RE = re.compile(r"://[^/@\s]+@")  # credentials in a URL, redacted from stored errors


def pending_entries(study_dir) -> list[Path]:
    """Entries not yet delivered, in delivery (seq) order."""
    return _entries(layout.mlflow_queue_dir(study_dir))


def _entries(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _ENTRY_RE.fullmatch(p.name) and p.is_file())


@contextmanager
def fast_failing_http(timeout_s: int):
    """MLflow HTTP calls without MLflow's own retries and with a short timeout (see module doc).
    Not for concurrent use with other threads that rely on those variables."""
    want = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_s))}
    saved = {k: os.environ.get(k) for k in want}
    os.environ.update(want)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def is_transient(exc: BaseException) -> bool:
    """True if retrying later may succeed (server unreachable or busy, credentials missing);
    False if the server refused the request itself (retrying the same request cannot help)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        code = exc.get_http_status_code()
        return code in (401, 403, 408, 409, 429, 499) or (code >= 500 and code != 501)
    # Anything unknown is taken as transient: it keeps the queue's order (a later write of the
    # same run never overtakes it), and sync-mlflow shows it; refusing it would let it be
    # retried later, out of order.
    return not isinstance(exc, (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError))


class ParentNotFound(RuntimeError):
    """A queued write names a study whose parent run is not on the server (yet): transient."""


class QueuedSink:
    """``MlflowSink``'s write methods, made durable by the queue (see the module docstring);
    a ``sink.Sink``.

    ``study`` (or a first ``parent_run`` call) names the study whose parent run receives the
    writes given no run id. Nothing here contacts MLflow at construction. Invalid input (unsafe
    names, an unknown status, a metric both in summary and curves, a missing folder) raises at
    once, before anything is queued; delivery failures never raise.
    """

    def __init__(
        self,
        study_dir,
        tracking_uri: str,
        experiment_name: str,
        *,
        study: str | None = None,
        request_timeout_s: int = 10,
        retry_interval_s: float = 30.0,
        max_curve_points: int = 200,
    ):
        self.dir = layout.mlflow_queue_dir(study_dir)
        self.tracking_uri, self.experiment = tracking_uri, experiment_name
        self.request_timeout_s, self.retry_interval_s = request_timeout_s, retry_interval_s
        self.max_curve_points = max_curve_points
        # The study whose parent run a write with no run id goes to; parent_run sets it too.
        self.study = None if study is None else layout.check_name(study, "study name")
        self.last_error: str | None = None  # the latest transient failure, for reports
        self._sinks: dict[str, MlflowSink] = {}
        self._parents: dict[tuple[str, str], str] = {}  # (experiment, study) -> delivered parent id
        self._results: dict[str, str | None] = {}  # entry name -> what its delivery returned
        self._failed_at: float | None = None
        self._described: set[str] = set()  # parent runs given the study's description and files
        self._next_seq = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        # Ray Tune pickles its callbacks (the recorder holds this sink) into the experiment
        # state: leave out the lock and the live clients, rebuilt on demand after unpickling.
        return {**self.__dict__, "_lock": None, "_sinks": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------- MlflowSink's API
    def parent_run(self, study: str, params: dict, tags: dict) -> str | None:
        """Queue the study's parent run and deliver; its id, or None if not delivered yet."""
        self.study = layout.check_name(study, "study name")
        name = self._enqueue("parent_run", study, {"params": flatten_params(params), "tags": _str_dict(tags)})
        return self._results.get(name)

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
        """Queue a trial's child-run write and deliver; the child's id, or None if queued.
        ``parent_run_id`` None: the parent is resolved by study name at delivery."""
        check_trial_args(trial_id, status, summary, curves)
        self._need_parent(parent_run_id)
        args = {
            "parent_run_id": parent_run_id,
            "trial_id": trial_id,
            "params": flatten_params(params),
            "tags": _str_dict(tags),
            "summary": {str(k): float(v) for k, v in summary.items()},
            # downsampled here already: a long run's curves would make every entry megabytes
            "curves": {
                str(k): [[int(s), float(v)] for s, v in downsample(pts, self.max_curve_points)]
                for k, pts in curves.items()
            },
            "status": status,
        }
        return self._results.get(self._enqueue("log_trial", trial_id, args))

    def end_parent(self, parent_run_id: str | None, status: str = "FINISHED") -> None:
        """Queue marking the parent run terminated, and deliver."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status {status!r} not in ['FAILED', 'FINISHED', 'KILLED']")
        self._need_parent(parent_run_id)
        self._enqueue("end_parent", self.study or "parent", {"parent_run_id": parent_run_id, "status": status})

    def log_artifacts(self, run_id: str | None, folder) -> None:
        """Queue uploading every file under ``folder`` to run ``run_id`` (None: the study's
        parent), under the artifact path ``<folder's name>/``, and deliver. The files are
        read when the entry is delivered (re-uploading replaces files of the same name)."""
        folder = Path(folder).resolve()
        if not folder.is_dir():
            raise NotADirectoryError(f"not a folder: {folder}")
        self._need_parent(run_id)
        self._enqueue("log_artifacts", self.study or "run", {"run_id": run_id, "folder": str(folder)})

    # ---------------------------------------------------------------------------- the queue
    def pending(self) -> list[Path]:
        return _entries(self.dir)

    def failed(self) -> list[Path]:
        return _entries(self.dir / FAILED_DIR)

    def drain(self, force: bool = True) -> int:
        """Deliver queued entries in order until one fails transiently; return how many are
        left (pending + failed). ``force=False`` (the automatic attempt before each write)
        respects ``retry_interval_s`` and skips if another process is delivering."""
        if not force and self._failed_at is not None and time.monotonic() - self._failed_at < self.retry_interval_s:
            return len(self.pending()) + len(self.failed())
        with self._lock, self._flock(blocking=force) as held:
            if held:
                self._drain_locked()
        return len(self.pending()) + len(self.failed())

    def requeue_failed(self) -> int:
        """Move refused entries back into the queue (same names, so same order); their count."""
        with self._lock, self._flock(blocking=True):
            moved = self.failed()
            for path in moved:
                _move(path, self.dir / path.name)
                layout.remove_tree(path.with_name(path.name + ".error.txt"))
        return len(moved)

    def _enqueue(self, kind: str, key: str, args: dict) -> str:
        entry = {
            "format": ENTRY_FORMAT,
            "kind": kind,
            "experiment": self.experiment,
            "study": self.study,
            "created": time.time(),
            "args": args,
        }
        with self._lock:
            seq = max(
                [self._next_seq]
                + [int(_ENTRY_RE.fullmatch(p.name).group(1)) + 1 for p in self.pending() + self.failed()]
            )
            self._next_seq = seq + 1
            name = f"{seq:012d}-{kind}-{key}.json"
            # allow_nan: summaries of diverged trials are NaN; Python's json reads them back.
            layout.atomic_write_bytes(self.dir / name, json.dumps(entry, allow_nan=True).encode())
        self.drain(force=False)
        return name

    def _need_parent(self, parent_run_id: str | None) -> None:
        if parent_run_id is None and self.study is None:
            raise ValueError(
                "no run id and no study (give study= or call parent_run first): the parent run cannot be resolved"
            )

    @contextmanager
    def _flock(self, blocking: bool):
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _drain_locked(self) -> None:
        for path in self.pending():
            try:
                entry = json.loads(path.read_text())
                if entry.get("format") != ENTRY_FORMAT or entry.get("kind") not in KINDS:
                    raise ValueError(f"not a queue entry of format {ENTRY_FORMAT}")
                with fast_failing_http(self.request_timeout_s):
                    result = self._deliver(entry)
            except Exception as e:  # noqa: BLE001 - classified below; never stops training
                if is_transient(e):
                    self._failed_at = time.monotonic()
                    self.last_error = redact(f"{type(e).__name__}: {e}")
                    return
                self._refuse(path, e)
                continue
            layout.remove_tree(path)
            layout.fsync_dir(self.dir)
            self._results[path.name] = result
        self._failed_at = None

    def _refuse(self, path: Path, exc: Exception) -> None:
        failed = self.dir / FAILED_DIR
        failed.mkdir(exist_ok=True)
        msg = redact(f"{type(exc).__name__}: {exc}")
        layout.atomic_write_bytes(failed / (path.name + ".error.txt"), msg.encode())
        _move(path, failed / path.name)
        layout.fsync_dir(self.dir)
        warnings.warn(f"MLflow refused queued write {path.name} (kept in {failed}): {msg}", stacklevel=4)

    # ----------------------------------------------------------------------------- delivery
    def _sink(self, experiment: str) -> MlflowSink:
        if experiment not in self._sinks:  # creating one contacts the server: only when delivering
            self._sinks[experiment] = MlflowSink(self.tracking_uri, experiment, max_curve_points=self.max_curve_points)
        return self._sinks[experiment]

    def _deliver(self, entry: dict) -> str | None:
        sink, args, kind = self._sink(entry["experiment"]), entry["args"], entry["kind"]
        if kind == "parent_run":
            run_id = sink.parent_run(entry["study"], args["params"], args["tags"])
            self._parents[(entry["experiment"], entry["study"])] = run_id
            return run_id
        if kind == "log_artifacts":
            run_id = args["run_id"] or self._resolve_parent(sink, entry)
            sink.log_artifacts(run_id, args["folder"])
            return run_id
        parent = args["parent_run_id"] or self._resolve_parent(sink, entry)
        self._describe(sink, parent, entry["study"], force=kind == "end_parent")
        if kind == "end_parent":
            sink.end_parent(parent, status=args["status"])
            return parent
        curves = {k: [(s, v) for s, v in pts] for k, pts in args["curves"].items()}
        return sink.log_trial(
            parent, args["trial_id"], args["params"], args["tags"], args["summary"], curves, args["status"]
        )

    def _describe(self, sink: MlflowSink, parent: str, study: str | None, force: bool) -> None:
        """Once per parent and process (and again when the study ends): the study's description
        and its spec.yaml and plan.json on the parent run. Not at parent creation: a new study's
        spec.yaml is written after its parent run is queued."""
        if parent in self._described and not force:
            return
        study_dir = self.dir.parent
        files = [layout.spec_path(study_dir), layout.plan_path(study_dir)]
        sink.describe_parent(parent, study_description(study_dir, study), files)
        self._described.add(parent)

    def _resolve_parent(self, sink: MlflowSink, entry: dict) -> str:
        key = (entry["experiment"], entry["study"])
        if key not in self._parents:
            found = sink.find_parent_run(entry["study"]) if entry["study"] else None
            if found is None:
                raise ParentNotFound(
                    f"no parent run for study {entry['study']!r} in experiment {entry['experiment']!r}"
                )
            self._parents[key] = found
        return self._parents[key]


def study_description(study_dir: Path, study: str | None) -> str:
    """The parent run's description (Markdown): the spec's ``study.description`` and where the
    rest is."""
    import yaml

    try:
        doc = yaml.safe_load(layout.spec_path(study_dir).read_text()) or {}
        desc = str((doc.get("study") or {}).get("description") or "").strip()
        workload = str((doc.get("workload") or {}).get("type") or "?")
    except (OSError, yaml.YAMLError, AttributeError):
        desc, workload = "", "?"
    return (
        f"**opt_study study `{study}`** (workload `{workload}`). {desc}\n\n"
        "One child run per trial: metrics `train/`, `eval/`, `measure/` (measured steps), `summary/`, "
        "`hp/` (numeric hyperparameters). This run: `best/<label>/...`, artifacts `spec.yaml`, "
        "`plan.json`, `report/index.html` (after `opt-study report`). The Parquet dataset in "
        f"`{study_dir}` is the full record."
    )


def _move(src: Path, dst: Path) -> None:
    """Move a queue entry: the new name is committed before the old one goes, so a crash in
    between leaves the entry twice (delivery is idempotent), never zero times. Through layout,
    so an object-store root sees the same move."""
    layout.atomic_write_bytes(dst, src.read_bytes())
    layout.remove_tree(src)


def _str_dict(d: dict) -> dict[str, str]:
    return {str(k): str(v) for k, v in d.items()}


def redact(text: str) -> str:
    """``text`` without credentials in URLs: user-info, and secret-looking query values."""
    return uris.redact(_USERINFO_RE.sub("://***@", text))
