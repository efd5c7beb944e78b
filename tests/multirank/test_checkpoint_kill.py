"""A rank SIGKILLed while it writes its checkpoint partition, after rank 0 has written its part
(tests/dist/ckpt_kill_harness.py, two torchrun jobs at world 2, ZeRO-2): the torn checkpoint never
counts, the restart resumes from the previous complete one, and every step is stored exactly
once with the losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opt_study.trial import checkpoint

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _torchrun(storage: Path, name: str, mode: str, out: Path) -> subprocess.CompletedProcess:
    from opt_study.distributed import free_port

    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(ROOT / "tests" / "dist" / "ckpt_kill_harness.py"),
        str(storage),
        name,
        mode,
        str(out),
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_rank_killed_mid_partition_resumes_from_previous_complete_checkpoint(tmp_path):
    clean = _torchrun(tmp_path, "clean", "run", tmp_path / "clean.json")
    assert clean.returncode == 0, clean.stderr[-3000:]

    killed = _torchrun(tmp_path, "killed", "kill", tmp_path / "never.json")
    assert killed.returncode != 0 and not (tmp_path / "never.json").exists()
    study, d = tmp_path / "killed", tmp_path / "killed" / "checkpoints" / "t"
    part = d / "step-4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert part.is_file() and (d / "step-4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    # rank 1's partition is there, cut short, but step-4 has no commit marker: only step-2 counts
    assert checkpoint.complete_steps(study, "t") == [2]
    assert not (d / "latest").exists()

    again = _torchrun(tmp_path, "killed", "run", tmp_path / "again.json")
    assert again.returncode == 0, again.stderr[-3000:]
    res, ref = json.loads((tmp_path / "again.json").read_text()), json.loads((tmp_path / "clean.json").read_text())
    assert res["final"]["status"] == "completed" and res["final"]["step"] == 8
    rows = res["rows"]
    assert [r["step"] for r in rows] == list(range(8))  # every step exactly once
    assert [r["attempt"] for r in rows] == [0, 0, 1, 1, 1, 1, 1, 1]  # resumed at step 2
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref["rows"]]  # the uninterrupted run
    assert checkpoint.complete_steps(study, "t") == [6, 4]  # step-4 rewritten whole
