"""`opt-study validate` / `run --dry-run` as a user runs them, in a subprocess with an empty
working directory: a bad file is one `error: <file>: <field>: ...` line on stderr, exit code 2,
no traceback, and nothing written or started (no results/, no mlflow.db, no Ray session).

A CLI start costs ~2 s (torch is imported by the optimizer registry), so the whole corpus goes
through `opt_study.cli.main` in ONE helper process, each file with its own captured stdout and
stderr; a handful of files also go through the real `python -m opt_study.cli` and console script.
Ray sessions are detected by pointing TMPDIR and RAY_TMPDIR at a private folder that must stay
empty but for torch's cache folder (comparing /tmp/ray before and after would race with other
test runs on the machine), and by asking the helper process whether Ray is initialised.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corpus import CORPUS, ROOT, expected_field, generated_bad_files

HELPER = r"""
import contextlib, io, json, sys, traceback
from opt_study.cli.main import main

out = []
for f in sys.argv[1:]:
    so, se, exc = io.StringIO(), io.StringIO(), None
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        try:
            rc = main(["validate", f])
        except SystemExit as e:
            rc = e.code
        except BaseException:
            rc, exc = None, traceback.format_exc()
    out.append({"file": f, "rc": rc, "stdout": so.getvalue(), "stderr": se.getvalue(), "exc": exc})
ray = sys.modules.get("ray")
print(json.dumps({"results": out, "ray_started": bool(ray and ray.is_initialized())}))
"""


@pytest.fixture
def sandbox(tmp_path):
    """(cwd, env): an empty working directory and an environment whose temp dirs are private."""
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    env = {
        **os.environ,
        "TMPDIR": str(tmp),
        "RAY_TMPDIR": str(tmp),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    yield cwd, env
    assert sorted(p.name for p in cwd.iterdir()) == [], "validate must not write anything"
    # Building a torch optimizer (the hyperparameter range check) imports torch._dynamo, which
    # creates its empty compile-cache folder `torchinductor_<user>`; anything else (Ray's
    # `ray/session_*`, a temp file) is a leak.
    leaked = [p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_")]
    assert leaked == [], "validate must not start Ray or write temp files"


def cli(args: list[str], cwd: Path, env: dict, exe: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (exe or [sys.executable, "-m", "opt_study.cli"]) + args
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def assert_one_error_line(stderr: str, path: str, field: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"error: {path}: {field or '<top>'}: "), lines[0]
    assert "Traceback" not in stderr


def test_every_bad_file_is_one_error_line_and_exit_2(sandbox, tmp_path):
    cwd, env = sandbox
    (tmp_path / "generated").mkdir()
    generated = generated_bad_files(tmp_path / "generated")
    files = [str(p) for p in CORPUS] + [str(p) for p in generated.values()]
    proc = subprocess.run(
        [sys.executable, "-c", HELPER, *files], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert not report["ray_started"]
    expected = {str(p): expected_field(p) for p in CORPUS} | {str(p): "" for p in generated.values()}
    assert [r["file"] for r in report["results"]] == files
    for r in report["results"]:
        assert r["exc"] is None, f"{r['file']} raised:\n{r['exc']}"
        assert (r["rc"], r["stdout"]) == (2, ""), r
        assert_one_error_line(r["stderr"], r["file"], expected[r["file"]])
    assert sorted(p.name for p in cwd.iterdir()) == []  # the unsafe tags wrote no `pwned`


@pytest.mark.parametrize("name", ["tag_python_object_apply", "alias_bomb_billion_laughs", "fp16_on_cpu"])
def test_real_cli_refuses_bad_file(name, sandbox):
    cwd, env = sandbox
    path = ROOT / "tests" / "bad_configs" / f"{name}.yaml"
    proc = cli(["validate", str(path)], cwd, env)
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr[-2000:]
    assert_one_error_line(proc.stderr, str(path), expected_field(path))


def test_run_dry_run_refuses_bad_file_with_a_relative_path(sandbox):
    cwd, env = sandbox
    rel = os.path.relpath(ROOT / "tests" / "bad_configs" / "in_process_two_workers.yaml", cwd)
    proc = cli(["run", rel, "--dry-run"], cwd, env)
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr[-2000:]
    assert_one_error_line(proc.stderr, rel, "scale.launcher")


def test_validate_quickstart_prints_the_plan(sandbox):
    cwd, env = sandbox
    path = str(ROOT / "configs" / "quickstart.yaml")
    proc = cli(["validate", "--json", path], cwd, env)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert [t["trial_id"] for t in doc["trials"]] == [
        f"{label}-{i:03d}-s0" for label in ("adamw", "momentum", "radam") for i in range(2)
    ]
    plan = doc["summary"]
    root = cwd.resolve() / "results"
    assert plan["study"] == "quickstart" and plan["trials"] == 6
    assert plan["per_optimizer"] == {"adamw": 2, "momentum": 2, "radam": 2}
    assert plan["study_dir"] == str(root / "quickstart")
    assert plan["mlflow"] == f"sqlite:///{root}/mlflow.db"
    assert plan["resources_per_trial"]["workers"] == 2 and plan["resources_per_trial"]["zero_stage"] == 2


def test_run_dry_run_of_quickstart_starts_nothing(sandbox):
    cwd, env = sandbox
    proc = cli(["run", str(ROOT / "configs" / "quickstart.yaml"), "--dry-run"], cwd, env)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr[-2000:]
    assert "trials:              6" in proc.stdout.splitlines()  # the summary, then the table of every trial
    assert sum(line.startswith(("adamw-", "momentum-", "radam-")) for line in proc.stdout.splitlines()) == 6


def test_console_script_refuses_bad_file(sandbox):
    script = Path(sys.executable).with_name("opt-study")
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable} (package not installed in this venv)")
    cwd, env = sandbox
    path = ROOT / "tests" / "bad_configs" / "zero_stage_4.yaml"
    proc = cli(["validate", str(path)], cwd, env, exe=[str(script)])
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr[-2000:]
    assert_one_error_line(proc.stderr, str(path), "scale.zero_stage")
    assert "must be one of 0, 1, 2, 3" in proc.stderr
