"""`opt-study` started as a child process the way the e2e tests watch it: `python -m opt_study.cli`
from the repository root, stdout and stderr merged into one text pipe (the test reads the tail
on failure), the Ray cluster named by ``ray_address``. Without one, RAY_ADDRESS is removed so the
command starts its own local Ray rather than joining whatever the test session left in the
environment.

    proc = start_cli(["run", str(study)], env=cluster.env, ray_address=cluster.address)
    proc = start_cli(["resume", str(folder)], new_session=True)   # a group the test can kill whole
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_cli(
    args: list[str],
    env: dict | None = None,
    ray_address: str | None = None,
    new_session: bool = False,
    separate_stderr: bool = False,
) -> subprocess.Popen:
    """``opt-study ARGS`` running (``env``: the whole environment, default this process's;
    ``separate_stderr``: stderr in its own pipe, for a test that reads what was said there)."""
    env = dict(os.environ if env is None else env)
    env.pop("RAY_ADDRESS", None)
    if ray_address is not None:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.Popen(
        [sys.executable, "-m", "opt_study.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if separate_stderr else subprocess.STDOUT,
        text=True,
        start_new_session=new_session,
    )
