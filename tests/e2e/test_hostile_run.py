"""`opt-study run` with inputs that cannot work, as a user runs it (issue 12, part B): a password
in the tracking URI is refused without being printed or written anywhere, and a trial that the
Ray cluster can never place ends the run with one line and exit code 2 instead of a hang."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

HELPER = r"""
import contextlib, io, json, sys
from opt_study.cli.main import main

out = []
for argv in json.loads(sys.argv[1]):
    so, se = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        rc = main(argv)
    out.append({"argv": argv, "rc": rc, "stdout": so.getvalue(), "stderr": se.getvalue()})
print(json.dumps(out))
"""


def _env(tmp: Path) -> dict:
    env = {
        **os.environ,
        "TMPDIR": str(tmp),
        "RAY_TMPDIR": str(tmp),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.timeout(300)
def test_a_password_in_the_tracking_uri_reaches_no_output_and_no_file(tmp_path):
    password = f"pw-{secrets.token_hex(8)}"
    cwd, tmp, store = tmp_path / "cwd", tmp_path / "tmp", tmp_path / "store"
    cwd.mkdir()
    tmp.mkdir()
    spec = tmp_path / "s.yaml"
    spec.write_text(
        f"study: {{name: sec, storage: '{store}', mlflow_uri: 'http://alice:{password}@127.0.0.1:5000'}}\n"
        "workload: {type: quadratic}\noptimizers: [{name: sgd, params: {lr: 0.1}}]\n"
    )
    commands = [["validate", str(spec)], ["run", str(spec), "--dry-run"], ["run", str(spec)]]
    proc = subprocess.run(
        [sys.executable, "-c", HELPER, json.dumps(commands)],
        cwd=cwd,
        env=_env(tmp),
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert password not in proc.stdout + proc.stderr
    for r in json.loads(proc.stdout):
        assert (r["rc"], r["stdout"]) == (2, ""), r
        (line,) = r["stderr"].splitlines()
        assert line.startswith(f"error: {spec}: study.mlflow_uri: 'http://***@127.0.0.1:5000' must not carry")
        assert "MLFLOW_TRACKING_PASSWORD" in line
    assert not store.exists() and list(cwd.iterdir()) == []
    leaked = [p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_")]
    assert leaked == []  # no Ray session was started


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_run_refuses_a_trial_the_cluster_can_never_place(tmp_path):
    """4096 one-CPU workers on this machine: Tune would wait for them forever."""
    store = tmp_path / "store"
    spec = tmp_path / "big.yaml"
    spec.write_text(
        f"study: {{name: big, storage: '{store}'}}\n"
        "workload: {type: quadratic}\nscale: {workers: 4096, cpus_per_worker: 1}\n"
        "optimizers: [{name: sgd, params: {lr: 0.1}}]\n"
    )
    ray_tmp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "opt_study.cli", "run", str(spec)],
            cwd=tmp_path,
            env=_env(ray_tmp),
            capture_output=True,
            text=True,
            timeout=540,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert line.startswith(f"error: {spec}: scale.workers: one trial needs 4096 workers x 1 CPU = 4096; ")
    assert line.endswith("the trial could never start") and "Traceback" not in proc.stderr
    assert not (store / "big" / "trials").exists()  # no trial was recorded as pending


@pytest.mark.timeout(400)
def test_a_failing_trial_records_its_real_error_and_the_run_exits_1(tmp_path):
    """A user's model that raises mid-trial, under real Ray: the trial record carries the
    exception's type and message and where the traceback is; the other trial completes; exit 1."""
    store = tmp_path / "store"
    spec = tmp_path / "boom.yaml"
    spec.write_text(
        f"study: {{name: boom, storage: '{store}'}}\n"
        "workload: {type: dataset, dataset: 'user_code:make_digits', model: 'user_code:make_exploding_mlp',"
        " model_args: {after: 4}, eval_size: 64}\n"
        "scale: {workers: 1, micro_batch_size: 16}\n"
        "training: {steps: 6, eval_every: 3, max_failures: 0}\n"
        "optimizers: [{name: sgd, params: {lr: 0.1}}, {name: adamw, params: {lr: 0.001}}]\n"
    )
    ray_tmp = Path(tempfile.mkdtemp(prefix="rf", dir="/tmp"))
    env = _env(ray_tmp)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env["PYTHONPATH"]])
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "opt_study.cli", "run", str(spec)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=360,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    recs = [json.loads(p.read_text()) for p in sorted((store / "boom" / "trials").glob("*.json"))]
    assert sorted(r["status"] for r in recs) == ["failed", "failed"], recs
    for r in recs:
        what, _, where = r["error"].partition(" (traceback: ")
        assert what.endswith("RuntimeError: exploded at training forward 4"), r["error"]
        kept = store / "boom" / "trials" / f"{r['trial_id']}.error.txt"  # kept with the study, not in Ray's tmp
        assert where == f"{kept})" and 'raise RuntimeError(f"exploded' in kept.read_text(), r["error"]
        assert kept.stat().st_mode & 0o777 == 0o600
    assert "exploded at training forward 4" in proc.stdout + proc.stderr
