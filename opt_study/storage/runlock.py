"""One `opt-study run` (or `resume`) of a study at a time: an exclusive `fcntl` lock on the study's
`.run.lock`, which also records its holder (host, pid, start time) for the refusal message.

Two runs of one study would both train every unfinished trial (exactly-once storage keeps the
data right; the compute is wasted). The kernel releases the lock when its holder dies, however it
dies, so a lock file left by a dead run (its pid gone) is taken over without asking. The lock is
per machine: on a local root shared over NFS it holds where the file system honours `flock`; the
working copies of an object-store root are per machine and are not locked against each other.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from opt_study.storage import layout


class StudyBusy(RuntimeError):
    """Another live process runs this study."""


class RunLock:
    """Held while a study runs: ``with RunLock(study_dir): ...``; raises StudyBusy naming the holder."""

    def __init__(self, study_dir: Path):
        self.path = layout.run_lock_path(study_dir)
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise StudyBusy(
                f"study {self.path.parent.name} is already being run by {holder} (lock {self.path}); "
                "wait for that run to end or stop it, then run again"
            ) from None
        self.fd = fd
        _write(fd, {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()})
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # no holder any more (the file stays: unlinking races a waiter)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _read(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(fd: int, holder: dict) -> None:
    data = json.dumps(holder).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (it has not written its name yet)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} since {started}"
