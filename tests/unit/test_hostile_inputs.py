"""Inputs that cannot work are refused before anything runs (issue 12, part B): URIs parsed
strictly and never carrying a secret, storage roots that cannot hold a study, non-regular study
files, trial ids derived from legal labels, trials that no node of the cluster can place, and
the permissions of the files that hold a study's configuration. The corpus in tests/bad_configs/
covers the same classes as whole files (tests/unit/test_config.py, tests/e2e/test_cli_validate.py)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from opt_study.config import ConfigError, FieldError, StudyConfig
from opt_study.config.load import load_spec
from opt_study.plan.planners import check_trial_ids
from opt_study.storage import layout, objectstore, roots, uris
from opt_study.study.resources import fit_problem
from opt_study.study.run import write_spec
from opt_study.validate import check_runnable, parse_study

ROOT = Path(__file__).resolve().parents[2]


def study(tmp_path, optimizers=None, **slices) -> dict:
    return {
        "study": {"name": "t", "storage": str(tmp_path / "store")},
        "workload": {"type": "quadratic", "dim": 4, "cols": 2},
        "optimizers": optimizers or [{"name": "sgd", "params": {"lr": 0.1}}],
        **slices,
    }


# ------------------------------------------------------------------------------------------ URIs
@pytest.mark.parametrize(
    "uri",
    [
        "http://127.0.0.1:5000",
        "https://mlflow.example.com/base",
        "sqlite:////abs/mlflow.db",
        "postgresql+psycopg2://mlflow@db:5432/mlflow",  # a user name alone: the password is PGPASSWORD's
        "file:///tmp/mlruns",
        "databricks",
        "relative/mlruns",
    ],
)
def test_tracking_uris_that_work_are_accepted(uri):
    assert uris.tracking_uri_problem(uri) is None
    assert StudyConfig(name="t", mlflow_uri=uri).mlflow_uri == uri


@pytest.mark.parametrize(
    "uri,secret,expect",
    [
        ("http://alice:PW-123@h:5000", "PW-123", "MLFLOW_TRACKING_PASSWORD"),
        ("https://TOKEN-123@h", "TOKEN-123", "MLFLOW_TRACKING_TOKEN"),
        ("https://h/?api_key=TOKEN-123&x=1", "TOKEN-123", "query"),
        ("mysql://root:PW-123@db/m", "PW-123", "credentials"),
    ],
)
def test_a_secret_in_the_tracking_uri_is_refused_and_never_repeated(uri, secret, expect):
    with pytest.raises(FieldError) as ei:
        StudyConfig(name="t", mlflow_uri=uri)
    assert ei.value.field == "mlflow_uri" and expect in ei.value.message
    assert secret not in str(ei.value)
    assert secret not in uris.redact(f"error: {uri} failed")


@pytest.mark.parametrize(
    "storage,problem",
    [
        ("s3:/bucket/prefix", "two slashes"),
        ("gs:bucket", "two slashes"),
        ("s3:///prefix", "no bucket"),
        ("hdfs://nn/x", "not supported"),
        ("s3://b/p?secret_key=S", "secret"),
        ("s3://key@b/p", "credentials"),
        ("s3://b/p\x00", "character"),
    ],
)
def test_storage_uris_are_parsed_strictly(storage, problem):
    assert objectstore.is_uri(storage)
    assert problem in objectstore.check_uri(storage)


def test_a_plain_path_with_a_colon_later_is_no_uri():
    assert not objectstore.is_uri("./s3:/bucket") and not objectstore.is_uri("/data/run:1")
    assert objectstore.check_uri("s3://b/p?endpoint_override=10.0.0.5:9000&scheme=http") is None


# ------------------------------------------------------------------------------- storage roots
def test_a_writable_root_need_not_exist_yet(tmp_path):
    assert roots.storage_root_problem(tmp_path / "a" / "b") is None
    (tmp_path / "f").write_text("x")
    assert roots.storage_root_problem(tmp_path / "f") == "is not a directory"
    assert "which is not a directory" in roots.storage_root_problem(tmp_path / "f" / "sub")


def test_proc_and_long_names_are_refused(tmp_path):
    assert "proc" in roots.storage_root_problem(Path("/proc/self/x"))
    assert "255" in roots.storage_root_problem(tmp_path / ("x" * 256))
    assert roots.storage_root_problem(tmp_path / ("x" * 255)) is None


def test_a_read_only_file_system_is_refused(tmp_path, monkeypatch):
    """No unprivileged way to mount one here: statvfs answers as it does on a ro mount."""
    real = os.statvfs

    class ReadOnly:
        def __init__(self, st):
            self.st = st

        def __getattr__(self, k):
            return getattr(self.st, k)

        f_flag = os.ST_RDONLY

    monkeypatch.setattr(roots.os, "statvfs", lambda p: ReadOnly(real(p)) if Path(p) == tmp_path else real(p))
    assert "read-only file system" in roots.storage_root_problem(tmp_path / "store")
    spec = parse_study(study(tmp_path), "s.yaml")  # reading commands work on a read-only copy
    with pytest.raises(ConfigError) as ei:
        check_runnable(spec)  # running one does not
    assert ei.value.field == "study.storage" and "read-only" in ei.value.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only mode directory")
def test_a_directory_without_write_permission_is_refused(tmp_path):
    d = tmp_path / "ro"
    d.mkdir(mode=0o555)
    assert "not writable" in roots.storage_root_problem(d / "store")


# ------------------------------------------------------------------------- non-regular files
@pytest.mark.timeout(60)
def test_a_fifo_as_the_study_file_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "study.yaml"
    os.mkfifo(fifo)
    done = {}

    def load():
        try:
            load_spec(fifo)
        except ConfigError as e:
            done["error"] = e

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # unblock the reader so that the test ends, then fail
        with open(fifo, "w"):
            pass
        pytest.fail("load_spec waited for a writer on a FIFO")
    assert done["error"].field == "" and "not a regular file" in done["error"].message


@pytest.mark.timeout(120)
def test_validate_refuses_a_fifo_in_one_line(tmp_path):
    fifo = tmp_path / "study.yaml"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "opt_study.cli", "validate", str(fifo)],
        capture_output=True,
        text=True,
        timeout=100,
        env=env,
        cwd=tmp_path,
    )
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.splitlines() == [
        f"error: {fifo}: <top>: cannot read: not a regular file (a FIFO, device or socket); give the study's YAML file"
    ]


# ---------------------------------------------------------------------------------- trial ids
def test_the_longest_label_whose_trial_ids_fit_is_accepted(tmp_path):
    # grid ids are <label>-<index:03d>-s<seed>: 7 more characters with seed 0
    ok = parse_study(study(tmp_path, [{"name": "sgd", "label": "a" * 121, "params": {"lr": 0.1}}]), "s.yaml")
    check_trial_ids(ok)
    long = parse_study(study(tmp_path, [{"name": "sgd", "label": "a" * 122, "params": {"lr": 0.1}}]), "s.yaml")
    with pytest.raises(ConfigError) as ei:
        check_trial_ids(long)
    assert ei.value.field == "optimizers[0].label"
    assert "129 characters" in ei.value.message and "at most 121 characters" in ei.value.message


def test_trial_ids_count_the_widest_seed(tmp_path):
    data = study(tmp_path, [{"name": "sgd", "label": "a" * 115, "params": {"lr": 0.1}}])
    data["study"]["seeds"] = [0, 2147483647]
    with pytest.raises(ConfigError) as ei:
        check_trial_ids(parse_study(data, "s.yaml"))
    assert "at most 112 characters" in ei.value.message


@pytest.mark.parametrize("name", ["part-000000000001-000000000002.parquet\n", "part-1-2.parquet.tmp"])
def test_names_read_back_from_storage_are_matched_whole(name):
    assert layout.parse_chunk_name(name) is None
    assert layout.parse_chunk_name("part-000000000001-000000000002.parquet") == (1, 2)
    assert layout.parse_attempt_dir("attempt=3\n") is None and layout.parse_attempt_dir("attempt=\u0663") is None
    assert layout.parse_snapshot_step_dir("step-5\n") is None and layout.parse_snapshot_step_dir("step-5") == 5


# ------------------------------------------------------------------ resources the cluster has
CPU_ONLY = ({"CPU": 2.0, "GPU": 0.0}, {"CPU": 2.0, "GPU": 0.0})


@pytest.mark.parametrize(
    "scale,cluster,field",
    [
        ({"workers": 8}, CPU_ONLY, "scale.workers"),
        ({"workers": 1, "gpus_per_worker": 1}, CPU_ONLY, "scale.gpus_per_worker"),
        ({"cpus_per_worker": 64}, ({"CPU": 64.0, "GPU": 0.0}, {"CPU": 16.0, "GPU": 0.0}), "scale.cpus_per_worker"),
        ({"workers": 4, "gpus_per_worker": 1}, ({"CPU": 64.0, "GPU": 2.0}, {"CPU": 32.0, "GPU": 1.0}), "scale.workers"),
    ],
)
def test_a_trial_that_can_never_be_placed_is_named(tmp_path, scale, cluster, field):
    spec = parse_study(study(tmp_path, scale=scale), "s.yaml")
    got = fit_problem(spec, *cluster)
    assert got is not None and got[0] == field, got


def test_a_trial_that_fits_exactly_is_accepted(tmp_path):
    spec = parse_study(study(tmp_path, scale={"workers": 2, "cpus_per_worker": 1}), "s.yaml")
    assert fit_problem(spec, *CPU_ONLY) is None


# ---------------------------------------------------------------------------------- permissions
def test_the_study_configuration_is_readable_by_its_owner_only(tmp_path):
    spec = parse_study(study(tmp_path), "s.yaml")
    write_spec(spec, "study: {name: t}\n")
    d = spec.study_dir
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in (d, layout.ray_dir(d))}
    modes |= {p: stat.S_IMODE(p.stat().st_mode) for p in (layout.spec_path(d), layout.plan_path(d))}
    assert modes == {
        d: 0o700,
        layout.ray_dir(d): 0o700,
        layout.spec_path(d): 0o600,
        layout.plan_path(d): 0o600,
    }
