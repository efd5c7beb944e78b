"""`opt-study run` under an unlucky operator, for real: a second run of a running study, Ctrl-C,
and a disk that fills up mid-study. Each ends in one clear line, with nothing committed lost,
and `resume` finishes the study with every step stored exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from opt_study.results.parquet import read_steps
from opt_study.results.trials import read_trial_records
from opt_study.validate import load_study

import specs
from cli_process import start_cli

pytestmark = pytest.mark.slow
STEPS = 300


def _write_study(path: Path, storage: Path, name: str) -> Path:
    return specs.write_spec(
        path,
        storage,
        study={"name": name},
        workload={"dim": 32, "cols": 8},
        scale={"workers": 1, "cpus_per_worker": 1, "zero_stage": 0, "micro_batch_size": 8},
        training={"steps": STEPS, "eval_every": 50},
        optimizers=[{"name": "sgd", "params": {"lr": {"grid": [0.001, 0.002, 0.003]}}}],
        search={"max_concurrent_trials": 1},
    )


def _cli(args) -> subprocess.Popen:
    return start_cli(args, new_session=True, separate_stderr=True)  # its own local Ray


def _statuses(spec) -> list[str]:
    return [r["status"] for r in read_trial_records(spec.study_dir)] if (spec.study_dir / "trials").exists() else []


def _wait_for(cond, what: str, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        time.sleep(0.2)
    pytest.fail(f"never reached: {what}")


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # what it left behind (its local Ray)
        except ProcessLookupError:
            pass
    return proc.returncode, out, err


def _assert_resume_finishes_exactly_once(spec, n_trials: int) -> None:
    rc, out, err = _finish(_cli(["resume", str(spec.study_dir)]))
    assert rc == 0, (out + err)[-3000:]
    recs = read_trial_records(spec.study_dir)
    assert len(recs) == n_trials and {r["status"] for r in recs} == {"completed"}
    rows = read_steps(spec.study_dir).to_pylist()
    for tid in {r["trial_id"] for r in recs}:
        assert sorted(r["step"] for r in rows if r["trial_id"] == tid) == list(range(STEPS)), tid


def test_second_run_refused_naming_the_holder_and_ctrl_c_exits_non_zero(tmp_path):
    f = _write_study(tmp_path / "guards.yaml", tmp_path / "store", "guards")
    spec = load_study(f)
    first = _cli(["run", str(f)])
    _wait_for(lambda: "running" in _statuses(spec), "a running trial")

    rc, out, err = _finish(_cli(["run", str(f)]), timeout=120)
    assert rc == 1, (out + err)[-2000:]
    assert err.strip().splitlines() == [err.strip()]  # one line
    assert f"study guards is already being run by pid {first.pid}" in err and "Traceback" not in err

    first.send_signal(signal.SIGINT)  # Ctrl-C: Tune stops its trials and returns
    rc, out, err = _finish(first)
    assert rc == 130, (out + err)[-3000:]
    assert "interrupted: study guards interrupted with" in err and f"opt-study resume {spec.study_dir}" in err
    _assert_resume_finishes_exactly_once(spec, 3)


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("needs to mount a tmpfs (root)")


def test_disk_full_mid_study_is_one_line_and_resume_finishes(tmp_path):
    store = tmp_path / "store"
    _tmpfs(store, "96m")
    try:
        f = _write_study(tmp_path / "full.yaml", store, "full")
        spec = load_study(f)
        run = _cli(["run", str(f)])
        _wait_for(lambda: "completed" in _statuses(spec) and "running" in _statuses(spec), "a finished trial")
        ballast = store / "ballast"
        with open(ballast, "wb") as fh:  # fill the file system to its last byte
            try:
                while True:
                    fh.write(b"\0" * (1 << 20))
                    fh.flush()
            except OSError:
                pass
        rc, out, err = _finish(run)
        assert rc == 1, (out + err)[-3000:]
        assert "no space left on device" in err and "opt-study resume" in err, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        # beside MLflow's INFO lines as it creates its store: the one line
        assert [ln for ln in err.splitlines() if " INFO " not in ln] == [
            "error: no space left on device writing the study; everything committed is kept: "
            "free space, then continue with `opt-study resume STUDY`"
        ]
        ballast.unlink()
        _assert_resume_finishes_exactly_once(spec, 3)
    finally:
        subprocess.run(["umount", "-l", str(store)], timeout=30)
