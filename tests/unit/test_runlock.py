"""One run of a study at a time: a second `run_study` of a study that a live process runs is
refused in one line naming the holder; the lock of a dead holder is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest
from holder import start_holder

from opt_study.storage import layout
from opt_study.storage.runlock import RunLock, StudyBusy
from opt_study.study.run import run_study

HOLD = """
import sys, time
from pathlib import Path
from opt_study.storage.runlock import RunLock
with RunLock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def test_second_run_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(spec_factory):
    spec = spec_factory(study={"name": "locked"})
    proc = start_holder(HOLD, spec.study_dir)
    try:
        with pytest.raises(StudyBusy) as e:
            run_study(spec)  # refused before Ray, MLflow or any write
        msg = str(e.value)
        assert f"pid {proc.pid} on {socket.gethostname()}" in msg and "study locked is already being run" in msg
        assert "\n" not in msg
        assert not (spec.study_dir / "trials").exists() and not (spec.study_dir / "spec.yaml").exists()
    finally:
        proc.send_signal(signal.SIGKILL)  # dies holding it: a stale lock
        proc.wait(timeout=30)
    assert json.loads(layout.run_lock_path(spec.study_dir).read_text())["pid"] == proc.pid  # left behind
    with RunLock(spec.study_dir):  # taken over
        assert json.loads(layout.run_lock_path(spec.study_dir).read_text())["pid"] == os.getpid()
    assert layout.run_lock_path(spec.study_dir).read_text() == ""  # released: no holder named
