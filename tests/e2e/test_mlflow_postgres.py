"""MLflow on PostgreSQL, for real: a private PostgreSQL (the system's server programs) and
`mlflow server` on loopback, as `opt-study mlflow-server` runs them on a cluster.

- A study (quadratic, in-process trials, one at a time) logs to the server; the database is
  stopped mid-study the way a crash stops it (SIGQUIT: no checkpoint, recovery from the WAL at
  the next start) while trials go on finishing, then started again. Every trial's MLflow writes
  must arrive exactly once: one parent, one child run per trial, each curve point once and equal
  to the study's Parquet rows, nothing left queued or refused.
- the SLURM script's own lines, then `opt-study mlflow-server STUDY` (what every launcher starts): initialises the
  database, serves the study's `mlflow_uri`, stops both servers on SIGTERM, and a second start
  finds the runs kept; a database that dies under it is started again.

Skipped only where no PostgreSQL server programs exist (`apt-get install postgresql`); anywhere
else a failure to start them fails the test. As root (CI), the database runs as an unprivileged
account (mlflow_server.Postgres)."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from opt_study.results import mlflow_queue
from opt_study.results.mlflow_queue import fast_failing_http
from opt_study.results.mlflow_server import MlflowServer, Postgres, find_pg_bin, free_port
from opt_study.results.parquet import read_steps
from opt_study.results.query import experiment_name

CLUSTER_SLURM = Path(__file__).resolve().parents[2] / "cluster" / "slurm"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        find_pg_bin() is None,
        reason="no PostgreSQL server programs (initdb, postgres) on PATH, in $OPT_STUDY_PG_BIN or under "
        "/usr/lib/postgresql/*/bin: apt-get install postgresql",
    ),
]


@pytest.fixture
def home():
    """The servers' state folder. Not pytest's tmp_path: as root that sits under a mode-700
    folder, which the database's unprivileged account cannot enter."""
    path = Path(tempfile.mkdtemp(prefix="opt_study_pg_"))
    path.chmod(0o755)  # the database's account must pass through it to a state folder inside
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def servers(home):
    pg = Postgres(home, free_port())
    pg.init()
    pg.start()
    ml = MlflowServer(pg.uri, str(home / "artifacts"), port=free_port(), workers=1, env=pg.env(), log=home / "ml.log")
    ml.start()
    yield pg, ml
    ml.stop()
    pg.stop("fast")


def _runs(uri: str, study: str):
    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(experiment_name(study))
    runs = c.search_runs([exp.experiment_id], max_results=1000) if exp else []
    parents = [r for r in runs if r.data.tags.get("opt_study.role") == "parent"]
    children: dict[str, list] = {}
    for r in runs:
        if r.data.tags.get("opt_study.role") == "trial":
            children.setdefault(r.data.tags["opt_study.trial_id"], []).append(r)
    return parents, children


class Outage(threading.Thread):
    """Stops the database once the server holds a finished trial, keeps it down until writes
    wait in the study's queue and two more trials have finished meanwhile (or the study ended),
    then starts it again."""

    def __init__(self, pg: Postgres, uri: str, spec, done: threading.Event):
        super().__init__(daemon=True)
        self.pg, self.uri, self.spec, self.done = pg, uri, spec, done
        self.queued_max, self.finished_during, self.error = 0, 0, None
        self.stopped_at = self.restarted_at = None

    def _finished(self) -> int:
        folder = self.spec.study_dir / "trials"
        if not folder.is_dir():
            return 0
        return sum('"status": "completed"' in p.read_text() for p in folder.glob("*.json"))

    def run(self):
        try:
            while not self.done.is_set():
                with fast_failing_http(3):
                    try:
                        _, children = _runs(self.uri, self.spec.study.name)
                    except Exception:  # noqa: BLE001 - the experiment may not exist yet
                        children = {}
                if any(r.info.status == "FINISHED" for runs in children.values() for r in runs):
                    break
                time.sleep(0.2)
            before = self._finished()
            self.pg.stop("immediate")
            self.stopped_at = time.monotonic()
            while not self.done.is_set() or self.queued_max == 0:
                queued = len(mlflow_queue.pending_entries(self.spec.study_dir))
                self.queued_max = max(self.queued_max, queued)
                self.finished_during = self._finished() - before
                if queued and self.finished_during >= 2:
                    break
                if self.done.is_set():
                    break
                time.sleep(0.2)
            self.pg.start()
            self.restarted_at = time.monotonic()
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e
            if not self.pg.running():
                self.pg.start()


def test_study_survives_a_database_crash_and_every_write_arrives_once(servers, ray_cluster, spec_factory):
    from opt_study.cli.main import main as cli_main
    from opt_study.study.run import run_study
    from opt_study.validate import load_study

    pg, ml = servers
    n_trials, steps = 8, 30
    spec_file = spec_factory.write(
        Path(spec_factory.storage) / "pgcrash.yaml",
        study={"name": "pgcrash", "mlflow_uri": ml.url},
        workload={"type": "quadratic", "dim": 8, "cols": 4, "noise": 0.1},
        scale={"launcher": "in_process"},
        training={"steps": steps, "eval_every": 10},
        optimizers=[{"name": "sgd", "params": {"lr": {"grid": [0.001 * 2**i for i in range(n_trials)]}}}],
        search={"max_concurrent_trials": 1},
    )
    spec = load_study(spec_file)
    done = threading.Event()
    outage = Outage(pg, ml.url, spec, done)
    outage.start()
    try:
        t0 = time.monotonic()
        res = run_study(spec, source_text=spec_file.read_text(), out=io.StringIO())
        print(f"study {time.monotonic() - t0:.1f} s")
    finally:
        done.set()
        outage.join(120)
    assert outage.error is None, outage.error
    assert outage.stopped_at is not None and outage.restarted_at is not None
    assert outage.queued_max >= 1, "the outage queued no write: it did not happen mid-study"
    assert outage.finished_during >= 1, "no trial finished while the database was down"
    assert res["ran"] == n_trials
    # Whatever the study's own drain left (the database may have come back after its end):
    # the real command delivers it.
    out = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(out):
        rc = cli_main(["sync-mlflow", str(spec.study_dir)])
    assert rc == 0, out.getvalue()
    print(  # shown with -s: how big the outage was, and who delivered its writes
        f"outage {outage.restarted_at - outage.stopped_at:.1f} s, up to {outage.queued_max} writes queued, "
        f"{outage.finished_during} trial(s) finished meanwhile; after the study: {out.getvalue().strip()}"
    )
    assert mlflow_queue.pending_entries(spec.study_dir) == []
    assert not (spec.study_dir / "mlflow_queue" / "failed").exists()

    parents, children = _runs(ml.url, "pgcrash")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    rows = read_steps(spec.study_dir)
    tids = sorted(set(rows["trial_id"].to_pylist()))
    assert len(tids) == n_trials and sorted(children) == tids
    client = MlflowClient(tracking_uri=ml.url)
    by_trial: dict[str, list] = {}
    for r in rows.to_pylist():
        by_trial.setdefault(r["trial_id"], []).append(r)
    for tid in tids:
        [run] = children[tid]  # exactly one child run per trial
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        for metric, col in (("train/loss", "loss"), ("eval/loss", "eval_loss")):
            history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric)]
            want = sorted((r["step"], r[col]) for r in by_trial[tid] if r.get(col) is not None)
            assert sorted(history) == want, (tid, metric)  # every point, each once
        for key in run.data.metrics:
            if key.startswith(("summary/", "hp/")):
                assert len(client.get_metric_history(run.info.run_id, key)) == 1, (tid, key)


def test_the_slurm_lines_and_the_cli_serve_a_studys_uri_and_keep_runs(home):
    port = free_port()
    study = home / "study.yaml"
    study.write_text(
        f"study: {{name: clisrv, storage: '{home / 'store'}', mlflow_uri: 'http://127.0.0.1:{port}'}}\n"
        "workload: {type: quadratic, dim: 4, cols: 2}\n"
        "optimizers: [{name: sgd, params: {lr: 0.1}}]\n"
    )
    # home/store is the storage root: the CLI puts the server's state in <storage>/mlflow_server
    (home / "store").mkdir()
    state = home / "store" / "mlflow_server"
    env = {**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false"}

    def start():
        return subprocess.Popen(
            [sys.executable, "-m", "opt_study.cli", "mlflow-server", str(study), "--workers", "1"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def wait_ready(proc):
        # `--wait` (what the cluster scripts call), a few seconds at a time, so that a server
        # that failed to start fails the test at once with its output
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[0]
            done = subprocess.run(
                [sys.executable, "-m", "opt_study.cli", "mlflow-server", str(study), "--wait", "5"],
                capture_output=True,
                text=True,
                env=env,
            )
            if done.returncode == 0:
                assert f"MLflow answers at {uri}" in done.stdout
                return
        raise AssertionError("opt-study mlflow-server not ready in 180 s")

    def stop(proc):
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        return out

    uri = f"http://127.0.0.1:{port}"
    # First start: the SLURM script's own lines (ray_cluster.sbatch: the server in the background,
    # `--wait`, the liveness check, the EXIT trap that stops it), with a "study" that logs a run.
    script = (CLUSTER_SLURM / "ray_cluster.sbatch").read_text()
    start_block = script[script.index('opt-study mlflow-server "$STUDY" &') : script.index("\n", script.index("trap "))]
    at = script.index('opt-study mlflow-server "$STUDY" --wait')
    wait_block = script[at : script.index("\nfi\n", at) + 3]
    assert "--wait" in wait_block and "kill -0" in wait_block
    log_run = (
        "from mlflow.tracking import MlflowClient; import sys; c = MlflowClient(tracking_uri=sys.argv[1]); "
        "r = c.create_run(c.create_experiment('kept'), tags={'k': 'v'}); c.log_metric(r.info.run_id, 'm', 1.5); "
        "c.log_artifact(r.info.run_id, sys.argv[2]); open(sys.argv[3], 'w').write(r.info.run_id)"
    )
    job = subprocess.run(
        [
            "bash",
            "-c",
            f'set -euo pipefail\n{start_block}\n{wait_block}\n"$PY" -c "$LOG_RUN" {uri} "$STUDY" {home}/run_id',
        ],
        env={
            **env,
            "STUDY": str(study),
            "PY": sys.executable,
            "LOG_RUN": log_run,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        },
        capture_output=True,
        text=True,
        timeout=400,
    )
    out = job.stdout + job.stderr
    assert job.returncode == 0, out
    run_id = (home / "run_id").read_text()
    for said in ("initialised PostgreSQL data folder", f"MLflow: {uri}", f"MLflow answers at {uri}"):
        assert said in out, (said, out)
    assert (state / "pgdata" / "PG_VERSION").is_file()
    # the trap stopped both servers with the job: PostgreSQL cleanly (its pid file removed)
    assert not (state / "pgdata" / "postmaster.pid").exists()
    assert (home / "store" / "mlartifacts").is_dir()  # artifacts beside the studies, not in the database
    with pytest.raises(OSError):
        import urllib.request

        urllib.request.urlopen(f"{uri}/health", timeout=2)

    # Second start: the command itself, on the same state folder. Its database then dies (SIGQUIT
    # to the postmaster, as a crash): the command starts it again and the server goes on.
    proc = start()
    try:
        wait_ready(proc)
        pid_file = state / "pgdata" / "postmaster.pid"
        first = int(pid_file.read_text().split()[0])
        os.kill(first, signal.SIGQUIT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if int(pid_file.read_text().split()[0]) != first:
                    break
            except (OSError, ValueError, IndexError):  # gone or half-written between the two
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("PostgreSQL was not started again")
        got = MlflowClient(tracking_uri=uri).get_run(run_id)  # MLflow's pool reconnects (pre-ping)
        assert got.data.tags["k"] == "v" and got.data.metrics == {"m": 1.5}
        assert [f.path for f in MlflowClient(tracking_uri=uri).list_artifacts(run_id)] == ["study.yaml"]
    finally:
        out = stop(proc)
    assert "initialised" not in out  # the second start reused the data folder
    assert "PostgreSQL exited" in out and "starting it again" in out
