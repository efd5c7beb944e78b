"""storage.build_locks: a build lock left by a SIGKILLed holder is cleared; a live holder's is not.

Real processes and torch's own FileBaton (the lock torch.utils.cpp_extension.load takes)."""

from __future__ import annotations

import os
import signal
import time

import pytest
from holder import start_holder
from torch.utils.file_baton import FileBaton

from opt_study.storage import build_locks

HOLD = """
import sys, time
from torch.utils.file_baton import FileBaton
assert FileBaton(sys.argv[1]).try_acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_lock_of_a_killed_holder_is_cleared_and_the_baton_can_be_taken(tmp_path):
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    p = start_holder(HOLD, lock)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert lock.exists()  # what torch leaves behind: every later load would wait forever
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        cleared = build_locks.clear_stale_locks(tmp_path, now=time.time() + 5)
    assert cleared == [lock] and not lock.exists()
    assert FileBaton(str(lock)).try_acquire()  # the next loader takes it at once


def test_lock_of_a_live_holder_is_kept(tmp_path):
    lock = tmp_path / "py311_cpu" / "opt_study_fused_sums" / "lock"  # torch's default two levels
    lock.parent.mkdir(parents=True)
    p = start_holder(HOLD, lock)
    try:
        assert build_locks.clear_stale_locks(tmp_path, now=time.time() + 5) == []
        assert lock.exists()
    finally:
        p.kill()
        p.wait()
    with pytest.warns(RuntimeWarning):
        assert build_locks.clear_stale_locks(tmp_path, now=time.time() + 5) == [lock]


def test_young_or_visible_locks_stay_and_very_old_ones_go_whoever_holds_them(tmp_path):
    lock = tmp_path / "ext" / "lock"
    lock.parent.mkdir()
    lock.touch()  # no holder, but created just now: its creator may still be starting
    assert build_locks.clear_stale_locks(tmp_path) == []
    fd = os.open(lock, os.O_RDONLY)  # held by this very process
    try:
        assert build_locks.clear_stale_locks(tmp_path, now=time.time() + 60) == []
        # older than any build: a holder on another machine of a shared file system is dead
        with pytest.warns(RuntimeWarning):
            assert build_locks.clear_stale_locks(tmp_path, now=time.time() + build_locks.MAX_AGE_S + 1) == [lock]
    finally:
        os.close(fd)


def test_root_defaults_to_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert build_locks.extensions_root() == tmp_path
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert "torch_extensions" in str(build_locks.extensions_root())  # torch's own default root
