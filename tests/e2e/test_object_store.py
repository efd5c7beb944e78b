"""An object-store storage root (s3://) against a real S3-compatible server on loopback (moto's
server mode): the mirror's own operations, then a study whose driver is SIGKILLed mid-trial,
whose local working copy is then deleted (a fresh machine), and which `opt-study resume`
finishes from what the store holds: Parquet rows exactly once, the interrupted trial restarted
from its checkpoint in the store, Ray's experiment state in the store, checkpoints cleaned up.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from opt_study.cli.resolve import READS
from opt_study.storage import layout, objectstore

import specs
from cli_process import start_cli

pytestmark = pytest.mark.slow
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """A moto S3 server on a free loopback port, with a bucket `bkt`; yields 'host:port'."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **CREDS},
    )
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("moto server did not start")
            time.sleep(0.3)
    saved = {k: os.environ.get(k) for k in CREDS}
    os.environ.update(CREDS)
    from pyarrow import fs as pafs

    pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1", allow_bucket_creation=True
    ).create_dir("bkt")
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _uri(endpoint: str, prefix: str) -> str:
    return f"s3://bkt/{prefix}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


def _objects(endpoint: str, prefix: str) -> dict[str, int]:
    """{key under bkt/prefix: size} straight from the server, not through any working copy."""
    from pyarrow import fs as pafs

    fs, base = objectstore.filesystem(_uri(endpoint, prefix))
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return {}
    return {
        i.path[len(base) + 1 :]: i.size
        for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
        if i.type == pafs.FileType.File
    }


def _read(endpoint: str, key: str) -> bytes:
    fs, _ = objectstore.filesystem(_uri(endpoint, ""))
    with fs.open_input_stream(f"bkt/{key}") as f:
        return f.read()


# ------------------------------------------------------------------------ the mirror itself
def test_writes_and_deletes_reach_the_store_and_pull_restores(s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv(objectstore.CACHE_ENV, str(tmp_path / "cache-a"))
    uri = _uri(s3_endpoint, "unit")
    root = objectstore.attach(uri)
    assert root.is_relative_to(tmp_path / "cache-a")
    layout.atomic_write_bytes(root / "s" / "trials" / "t1.json", b'{"a": 1}')
    layout.atomic_write_bytes(root / "s" / "steps" / "x" / "part.parquet", b"P" * 1000)
    assert _objects(s3_endpoint, "unit") == {"s/trials/t1.json": 8, "s/steps/x/part.parquet": 1000}
    layout.remove_tree(root / "s" / "steps")
    assert _objects(s3_endpoint, "unit") == {"s/trials/t1.json": 8}

    # another machine: an empty working copy fills from the store; `exact` drops stale files
    monkeypatch.setenv(objectstore.CACHE_ENV, str(tmp_path / "cache-b"))
    root_b = objectstore.attach(uri)
    assert root_b != root
    (root_b / "s" / "stale.txt").parent.mkdir(parents=True)
    (root_b / "s" / "stale.txt").write_text("not in the store")
    assert objectstore.pull(root_b / "s") == 1
    assert (root_b / "s" / "trials" / "t1.json").read_bytes() == b'{"a": 1}'
    assert not (root_b / "s" / "stale.txt").exists()
    big = root / "s" / "steps" / "y" / "part.parquet"
    layout.atomic_write_bytes(big, b"Q" * 5000)
    n = objectstore.pull(root_b / "s")
    # the new chunk, and the small record (always)
    assert n == 2, (n, _objects(s3_endpoint, "unit"), sorted(str(p) for p in (root_b / "s").rglob("*")))
    assert objectstore.pull(root_b / "s") == 1  # an unchanged chunk is not fetched again
    assert big.stat().st_mtime_ns == (root_b / "s" / "steps" / "y" / "part.parquet").stat().st_mtime_ns
    # a newer version of the same size is fetched (compared by time too)
    time.sleep(1.1)
    layout.atomic_write_bytes(root / "s" / "trials" / "t1.json", b'{"a": 2}')
    assert objectstore.pull(root_b / "s") == 1
    assert (root_b / "s" / "trials" / "t1.json").read_bytes() == b'{"a": 2}'
    # a refresh (not exact) never replaces a file committed here after the stored copy
    (root_b / "s" / "trials" / "t1.json").write_bytes(b'{"a": 3}')
    objectstore.refresh_study(root_b / "s")
    assert (root_b / "s" / "trials" / "t1.json").read_bytes() == b'{"a": 3}'
    # a signal written elsewhere is seen through the store
    assert not objectstore.exists(root_b / "s" / "control" / "t.stop", poll=False)
    layout.atomic_write_bytes(root / "s" / "control" / "t.stop", b"")
    assert objectstore.exists(root_b / "s" / "control" / "t.stop", poll=False)


def test_an_interrupted_upload_never_lands_under_its_name(s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv(objectstore.CACHE_ENV, str(tmp_path / "cache"))
    root = objectstore.attach(_uri(s3_endpoint, "cut"))
    f = root / "s" / "part.parquet"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"R" * 100_000)

    class Cut:  # the local read fails half way (a disk error, a signal)
        def __init__(self, *a):
            self.n = 0

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self, size):
            self.n += 1
            if self.n > 1:
                raise OSError("read cut short")
            return b"R" * 1000

    monkeypatch.setattr(objectstore, "open", Cut, raising=False)
    with pytest.raises(OSError, match="cut short"):
        objectstore.push(f)
    monkeypatch.undo()
    assert _objects(s3_endpoint, "cut") == {}  # neither the real name nor a leftover temp


def test_a_marker_outside_the_cache_is_ignored(s3_endpoint, tmp_path):
    """A `.opt_study_remote.json` planted in some ancestor folder must not redirect a local
    study's writes to a bucket."""
    (tmp_path / objectstore.MARKER).write_text(json.dumps({"uri": _uri(s3_endpoint, "planted")}))
    layout.atomic_write_bytes(tmp_path / "study" / "trials" / "t.json", b"{}")
    assert objectstore.mirror_for(tmp_path / "study") is None
    assert _objects(s3_endpoint, "planted") == {}


def test_a_reading_command_pulls_only_what_it_reads(s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv(objectstore.CACHE_ENV, str(tmp_path / "writer"))
    uri = _uri(s3_endpoint, "parts")
    root = objectstore.attach(uri)
    for rel in ("s/trials/t.json", "s/steps/trial_id=t/attempt=0/part.parquet", "s/snapshots/t/x.pt"):
        layout.atomic_write_bytes(root / rel, b"z" * 300)
    monkeypatch.setenv(objectstore.CACHE_ENV, str(tmp_path / "reader"))
    reader = objectstore.attach(uri)
    assert objectstore.refresh_study(reader / "s", READS["status"]) == 1
    assert [
        p.relative_to(reader).as_posix() for p in reader.rglob("*") if p.is_file() and not p.name.startswith(".")
    ] == ["s/trials/t.json"]
    assert objectstore.refresh_study(reader / "s", READS["query"]) == 1  # now the steps, not the snapshots
    assert not (reader / "s" / "snapshots").exists()


def test_a_local_root_never_touches_a_store(tmp_path):
    layout.atomic_write_bytes(tmp_path / "study" / "trials" / "t.json", b"{}")
    assert objectstore.mirror_for(tmp_path / "study" / "trials") is None
    assert objectstore.ray_storage(tmp_path / "study" / "ray") == {"storage_path": str(tmp_path / "study" / "ray")}
    assert objectstore.pull(tmp_path / "study") == 0


# --------------------------------------------------------------- a study, killed and resumed
def _write_study(tmp_path: Path, endpoint: str) -> Path:
    return specs.write_spec(
        tmp_path / "s3study.yaml",
        _uri(endpoint, "studies"),
        study={"name": "s3study", "mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        workload={"dim": 32, "cols": 8},
        # two ranks in a Ray Train worker group: each rank uploads its own ZeRO partition files
        scale={"workers": 2, "cpus_per_worker": 1, "zero_stage": 2, "micro_batch_size": 8},
        training={"steps": 400, "eval_every": 100},
        measure={"every": 50},
        optimizers=[{"name": "sgd", "params": {"lr": {"grid": [0.002, 0.004]}}}],
        search={"max_concurrent_trials": 1},
    )


def _cli(args, cache: Path, ray_tmp: Path) -> subprocess.Popen:
    env = {**os.environ, **CREDS, objectstore.CACHE_ENV: str(cache), "RAY_TMPDIR": str(ray_tmp)}
    return start_cli(args, env=env, new_session=True)


def test_study_on_s3_survives_driver_kill_and_a_fresh_machine(s3_endpoint, tmp_path):
    f = _write_study(tmp_path, s3_endpoint)
    ray_tmp = Path(f"/tmp/os3-{os.getpid()}")
    proc = _cli(["run", str(f)], tmp_path / "cache-a", ray_tmp)
    t0 = time.time()
    ckpt = None
    while time.time() - t0 < 300:  # kill once a trial has a checkpoint in the store
        ckpt = next(
            (
                k
                for k in _objects(s3_endpoint, "studies")
                if k.startswith("s3study/checkpoints/") and k.endswith("/COMMITTED")
            ),
            None,
        )
        if ckpt or proc.poll() is not None:
            break
        time.sleep(0.2)
    assert ckpt, f"no checkpoint reached the store: {proc.communicate()[0][-3000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    os.killpg(proc.pid, signal.SIGKILL)
    tid = ckpt.split("/")[2]
    # Ray's workers outlive the driver briefly and may commit newer checkpoints (pruning older ones):
    # wait until the store stops changing, then check the newest committed checkpoint
    keys, t0 = _objects(s3_endpoint, "studies"), time.time()
    while time.time() - t0 < 120:
        time.sleep(3)
        again = _objects(s3_endpoint, "studies")
        if again == keys:
            break
        keys = again
    prefix = f"s3study/checkpoints/{tid}/"
    committed = [k.split("/")[3] for k in keys if k.startswith(prefix) and k.endswith("/COMMITTED")]
    assert committed, keys
    ckpt_step = max(int(t.split("-")[1]) for t in committed)
    tag = f"step-{ckpt_step}"
    # the commit marker goes up only after every rank's files: both ranks' ZeRO partitions are there
    files = [k.rsplit("/", 1)[-1] for k in keys if k.startswith(f"{prefix}{tag}/")]
    assert any("zero_pp_rank_0_" in n for n in files) and any("zero_pp_rank_1_" in n for n in files), files
    shutil.rmtree(tmp_path / "cache-a")  # a fresh machine: only the store remains

    res = _cli(["resume", str(f)], tmp_path / "cache-b", ray_tmp)
    out, _ = res.communicate(timeout=600)
    assert res.returncode == 0, out[-3000:]
    shutil.rmtree(ray_tmp, ignore_errors=True)

    keys = _objects(s3_endpoint, "studies")
    # every trial's rows are in the store: read them through a third, empty working copy
    q = _cli(
        [
            "query",
            str(f),
            "SELECT trial_id, count(*) AS n, count(DISTINCT step) AS d, "
            "min(step) AS lo, max(step) AS hi FROM steps GROUP BY 1 ORDER BY 1",
        ],
        tmp_path / "cache-c",
        ray_tmp,
    )
    qout, _ = q.communicate(timeout=300)
    assert q.returncode == 0, qout
    lines = [ln.split() for ln in qout.splitlines() if ln.startswith("sgd-")]
    assert lines == [["sgd-000-s0", "400", "400", "0", "399"], ["sgd-001-s0", "400", "400", "0", "399"]], qout
    # the interrupted trial restarted from the checkpoint the store held, as a new attempt
    starts = {
        k: json.loads(_read(s3_endpoint, f"studies/{k}"))["start_step"]
        for k in keys
        if k.startswith(f"s3study/steps/trial_id={tid}/") and k.endswith("_START")
    }
    assert sorted(starts.values()) == [0, ckpt_step], starts
    recs = [json.loads(_read(s3_endpoint, f"studies/{k}")) for k in keys if k.startswith("s3study/trials/")]
    assert sorted(r["status"] for r in recs) == ["completed", "completed"]
    assert not [k for k in keys if k.startswith("s3study/checkpoints/")]  # removed when done
    assert any(k.startswith("s3study/ray/run-0/") for k in keys)  # Ray's own state, in the store
    assert any(k.startswith("s3study/ray/run-1/") for k in keys)
    assert "s3study/spec.yaml" in keys and "s3study/trials.parquet" in keys
