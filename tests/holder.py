"""A child process that takes a lock and holds it until killed, for the lock tests: ``script``
(Python source run with ``sys.argv[1] = arg``) prints "held" once it holds the lock."""

from __future__ import annotations

import subprocess
import sys


def start_holder(script: str, arg) -> subprocess.Popen:
    """Start ``script`` and return once it has said "held" (the lock is taken)."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(arg)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc
