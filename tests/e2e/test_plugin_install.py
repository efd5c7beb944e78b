"""An installed package registers names through entry points: `pip install` the example package
(examples/custom_workload, built here from a copy) into a folder of tmp_path, then the real CLI
finds `teacher_student`, `signum` and `edge_of_stability` by name and says where they came from.
The venv itself is not touched (pip --target), so no other test sees the names."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_entry_points_of_a_pip_installed_package(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "examples" / "custom_workload", src, ignore=shutil.ignore_patterns("results", "*.egg-info"))
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target)]
    subprocess.run([*pip, str(src)], check=True, capture_output=True, timeout=300)
    study = tmp_path / "ep.yaml"
    study.write_text(
        f"study: {{name: ep, seeds: [0], storage: '{tmp_path / 'results'}'}}\n"
        "workload: {type: teacher_student, dim: 8}\n"
        "scale: {workers: 2, zero_stage: 2}\n"
        "training: {steps: 10, eval_every: 5}\n"
        "optimizers: [{name: signum, params: {lr: {grid: [0.01, 0.1]}}}]\n"
        "measure: {every: 5, extra: [edge_of_stability]}\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(target)])}
    cmd = [sys.executable, "-m", "opt_study.cli", "validate", "--json", str(study)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["imported"] == [
        "teacher_student: entry point opt_study.workloads:teacher_student = byo_example.models:TeacherStudent "
        "(package byo-example 0.1.0)",
        "signum: entry point opt_study.optimizers:signum = byo_example.opt:signum (package byo-example 0.1.0)",
        "edge_of_stability: entry point opt_study.metrics:edge_of_stability = "
        "byo_example.metrics:edge_of_stability (package byo-example 0.1.0)",
    ]
    assert [t["trial_id"] for t in doc["trials"]] == ["signum-000-s0", "signum-001-s0"]
    # without the install, the same names are unknown: validate reports every one of them,
    # one line each naming the file and the field
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 3, proc.stderr
    assert lines[0].startswith(f"error: {study}: workload.type: unknown workload 'teacher_student'")
    assert lines[1].startswith(f"error: {study}: optimizers[0].name: unknown optimizer 'signum'")
    assert lines[2] == (
        f"error: {study}: measure.extra[0]: no entry point 'edge_of_stability' in group opt_study.metrics"
    )
