"""Clear the lock files that a killed compiler process leaves in $TORCH_EXTENSIONS_DIR.

torch.utils.cpp_extension.load guards every build directory with a FileBaton: the loading process
creates `<dir>/lock` with O_CREAT|O_EXCL, keeps it open while ninja runs (a no-op when the library
is up to date) and deletes it afterwards; every other process polls until the file is gone, with
no timeout and no notion of a dead holder. Every trial rank loads DeepSpeed's `deepspeed_shm_comm`
and opt_study's fused sums this way at start-up, so a rank SIGKILLed in that window (a fault test,
Ray's memory monitor, a cancelled job) leaves a lock behind and every later trial on the machine
waits on it forever, silently (seen here: a benchmark and a pool-launcher fault test hung before
step 0 on a lock left by a process killed minutes earlier).

A lock is stale when no process on this machine holds it open (the baton's holder keeps its file
descriptor open from the atomic create to the delete, so an unheld lock has a dead holder) and,
because a holder on another machine (a shared file system) is invisible here, it is also older
than MAX_AGE_S, far longer than any of these builds takes (about 60 s). Where the open files of
some process cannot be read (another user's), only the age decides.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

MAX_AGE_S = 600.0  # a build that held the baton this long is dead (builds here take ~60 s)
LOCAL_GRACE_S = 2.0  # never clear a lock this young: its creator may be between create and read


def extensions_root() -> Path:
    """Where torch builds extensions: $TORCH_EXTENSIONS_DIR, else torch's own default root."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def clear_stale_locks(root: Path | None = None, now: float | None = None) -> list[Path]:
    """Delete every stale `lock` one or two levels under `root` (torch's default root adds a
    `py311_cpu`-style level); warn once per lock and return the deleted paths."""
    root = extensions_root() if root is None else Path(root)
    locks = [*root.glob("*/lock"), *root.glob("*/*/lock")]
    if not locks:
        return []
    now = time.time() if now is None else now
    held, complete = _open_files()
    cleared = []
    for lock in locks:
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:  # released meanwhile
            continue
        unheld = complete and os.path.realpath(lock) not in held
        if (unheld and age > LOCAL_GRACE_S) or age > MAX_AGE_S:
            if _stale_unlink(lock):
                warnings.warn(
                    f"opt_study: removed a stale build lock {lock} ({age:.0f} s old, no live holder); "
                    "a process building a torch extension there was killed",
                    RuntimeWarning,
                    stacklevel=2,
                )
                cleared.append(lock)
    return cleared


def _open_files() -> tuple[set[str], bool]:
    """The real paths of every file open in a process on this machine, and whether the scan saw
    every process (False without /proc, or where some process's descriptors were unreadable)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return set(), False
    paths, complete = set(), True
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(proc / pid / "fd")
        except FileNotFoundError:  # exited during the scan
            continue
        except PermissionError:
            complete = False
            continue
        for fd in fds:
            try:
                paths.add(os.readlink(proc / pid / "fd" / fd))
            except OSError:
                continue
    return paths, complete


def _stale_unlink(lock: Path) -> bool:
    try:
        lock.unlink()
        return True
    except FileNotFoundError:
        return False
