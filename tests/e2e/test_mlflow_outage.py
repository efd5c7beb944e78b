"""An MLflow outage, for real: a `mlflow server` process on loopback (SQLite backend) is stopped
while a study logs, restarted on the same port and store, and the durable queue is delivered
(`sync-mlflow`, and the drain before the next write). A loopback proxy that forwards a request to
the server but drops the response checks that a write which reached the server is re-delivered
without duplicating runs, params or metric points."""

from __future__ import annotations

import http.client
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import redirect_stdout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from mlflow.tracking import MlflowClient

from opt_study.cli.main import main as cli_main
from opt_study.results import mlflow_queue
from opt_study.results.mlflow_queue import QueuedSink
from opt_study.results.query import experiment_name

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`python -m mlflow server` as its own process group (it runs uvicorn as a child)."""

    def __init__(self, store, port: int):
        self.store, self.port, self.proc = store, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self, timeout_s: float = 120) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_ENABLE_TELEMETRY": "false"}
        self.log = open(self.store / "server.log", "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                f"sqlite:///{self.store / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.store / "artifacts"),
                "--workers",
                "1",
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.store / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"mlflow server not ready in {timeout_s} s")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)  # the uvicorn child too
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.log.close()
        with pytest.raises(OSError):  # really down: nothing listens on the port any more
            urllib.request.urlopen(f"{self.uri}/health", timeout=2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server"), _free_port())
    srv.start()
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


def _client(server):
    return MlflowClient(tracking_uri=server.uri)


def _runs(server, study):
    """(parents, children by trial id) of a study, read directly from the server."""
    c = _client(server)
    exp = c.get_experiment_by_name(experiment_name(study))
    runs = c.search_runs([exp.experiment_id]) if exp else []
    parents = [r for r in runs if r.data.tags.get("opt_study.role") == "parent"]
    children: dict[str, list] = {}
    for r in runs:
        if "opt_study.trial_id" in r.data.tags:
            children.setdefault(r.data.tags["opt_study.trial_id"], []).append(r)
    return parents, children


def _log(sink, parent, tid, i):
    t0 = time.monotonic()
    out = sink.log_trial(
        parent,
        tid,
        params={"optimizer": "sgd", "hp": {"lr": 10.0**-i}, "seed": i},
        tags={"opt_study.optimizer": "sgd"},
        summary={"final_loss": 1.0 / (i + 1)},
        curves={"loss": [(s, 2.0 - s / 10) for s in range(7)]},
        status="completed",
    )
    return out, time.monotonic() - t0


def _check_study(server, study, n_trials):
    """Exactly one parent, one child per trial, every param and metric point once."""
    parents, children = _runs(server, study)
    assert len(parents) == 1
    pid = parents[0].info.run_id
    assert sorted(children) == [f"t{i}" for i in range(n_trials)]
    c = _client(server)
    for i in range(n_trials):
        [run] = children[f"t{i}"]  # one run per trial, not two
        assert run.data.tags["mlflow.parentRunId"] == pid and run.info.status == "FINISHED"
        assert run.data.params == {"optimizer": "sgd", "hp.lr": str(10.0**-i), "seed": str(i)}
        loss = c.get_metric_history(run.info.run_id, "loss")
        assert sorted((m.step, m.value) for m in loss) == [(s, 2.0 - s / 10) for s in range(7)]
        assert [m.value for m in c.get_metric_history(run.info.run_id, "final_loss")] == [1.0 / (i + 1)]
    return parents[0]


def _write_spec(study_dir, server):
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "spec.yaml").write_text(
        f"study: {{name: {study_dir.name}, storage: {study_dir.parent}, mlflow_uri: '{server.uri}'}}\n"
        "workload: {type: quadratic, dim: 4, cols: 2}\n"
        "optimizers: [{name: sgd, params: {lr: 0.1}}]\n"
    )


def _sync_cli(study_dir, *flags) -> tuple[int, str]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli_main(["sync-mlflow", str(study_dir), *flags])
    return rc, buf.getvalue()


def test_outage_mid_study_and_at_study_start(server, tmp_path):
    store = tmp_path / "store"
    a_dir, b_dir = store / "outA", store / "outB"
    _write_spec(a_dir, server)
    a = QueuedSink(a_dir, server.uri, experiment_name("outA"), request_timeout_s=3, retry_interval_s=0)
    parent = a.parent_run("outA", params={"workload": "quadratic", "trials": 5}, tags={"k": "v"})
    assert parent is not None
    for i in range(2):
        child, _ = _log(a, parent, f"t{i}", i)
        assert child is not None
    assert a.pending() == []

    server.stop()
    for i in range(2, 5):  # training goes on: each write is queued and the call returns promptly
        child, took = _log(a, parent, f"t{i}", i)
        assert child is None and took < 3.0
    report = tmp_path / "report"
    report.mkdir()
    (report / "index.html").write_text("<p>study report</p>")
    a.log_artifacts(None, report)  # None: the study's parent run
    a.end_parent(parent)
    assert [p.name.split("-", 1)[1] for p in a.pending()] == [
        "log_trial-t2.json",
        "log_trial-t3.json",
        "log_trial-t4.json",
        "log_artifacts-outA.json",
        "end_parent-outA.json",
    ]
    assert "Connection refused" in a.last_error
    rc, out = _sync_cli(a_dir)  # still down: nothing delivered, exit 1, what is left is listed
    assert rc == 1 and out.count("pending  ") == 5

    # A second study whose server is down from its start: the parent itself is queued.
    b = QueuedSink(b_dir, server.uri, experiment_name("outB"), request_timeout_s=3, retry_interval_s=0)
    assert b.parent_run("outB", params={"workload": "quadratic"}, tags={}) is None
    for i in range(2):
        assert _log(b, None, f"t{i}", i)[0] is None
    assert len(b.pending()) == 3

    server.start()
    rc, out = _sync_cli(a_dir)
    assert rc == 0 and "delivered 5 of 5" in out, out
    assert a.pending() == [] and a.failed() == []
    assert _check_study(server, "outA", 5).info.status == "FINISHED"
    assert _client(server).get_run(parent).data.params == {"workload": "quadratic", "trials": "5"}
    assert [f.path for f in _client(server).list_artifacts(parent, "report")] == ["report/index.html"]

    # B: the next write drains the older entries first, in order (parent, t0, t1), then itself.
    child, _ = _log(b, None, "t2", 2)
    assert child is not None and b.pending() == []
    b.end_parent(None)
    assert b.pending() == [] and b.failed() == []
    assert _check_study(server, "outB", 3).info.status == "FINISHED"
    assert not (b_dir / "mlflow_queue" / "failed").exists()


def test_a_refused_write_is_kept_aside_and_the_rest_goes_on(server, tmp_path):
    if server.proc.poll() is not None:
        server.start()
    d = tmp_path / "store" / "refused"
    _write_spec(d, server)
    s = QueuedSink(d, server.uri, experiment_name("refused"), request_timeout_s=3, retry_interval_s=0)
    assert s.parent_run("refused", {"trials": 1}, {}) is not None
    with pytest.warns(UserWarning, match="refused queued write"):  # MLflow params are immutable
        assert s.parent_run("refused", {"trials": 2}, {}) is None
    [failed] = s.failed()
    assert failed.name.endswith("-parent_run-refused.json") and s.pending() == []
    assert "'trials'" in failed.with_name(failed.name + ".error.txt").read_text()
    # Later writes go on; a fresh sink (a restarted driver) resolves the parent by the study tag.
    fresh = QueuedSink(d, server.uri, experiment_name("refused"), study="refused", retry_interval_s=0)
    assert _log(fresh, None, "t0", 0)[0] is not None
    _check_study(server, "refused", 1)
    rc, out = _sync_cli(d)
    assert rc == 1 and f"refused  {failed.name}" in out
    with pytest.warns(UserWarning):  # retried in its place, refused again, kept again
        rc, out = _sync_cli(d, "--retry-failed")
    assert rc == 1 and [p.name for p in fresh.failed()] == [failed.name] and fresh.pending() == []


class _LossyProxy(ThreadingHTTPServer):
    """Forwards every request to the server; for an armed (path, body) pattern, the request
    reaches the server but its response is dropped (the connection is closed instead)."""

    daemon_threads = True

    def __init__(self, upstream_port: int):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream, self.armed, self.dropped = upstream_port, [], []
        self.uri = f"http://127.0.0.1:{self.server_address[1]}"

    def take(self, path: str, body: bytes) -> bool:
        for i, (p, needle) in enumerate(self.armed):
            if p in path and needle in body:
                self.dropped.append(self.armed.pop(i))
                return True
        return False


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        up = http.client.HTTPConnection("127.0.0.1", self.server.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        up.request(self.command, self.path, body=body or None, headers=headers)
        resp = up.getresponse()
        data = resp.read()
        up.close()
        if self.server.take(self.path, body):
            self.close_connection = True  # done on the server, never answered
            return
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_DELETE = _forward

    def log_message(self, *args):
        pass


def test_lost_responses_are_redelivered_without_duplicates(server, tmp_path):
    if server.proc.poll() is not None:
        server.start()
    proxy = _LossyProxy(server.port)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        sink = QueuedSink(
            tmp_path / "lost", proxy.uri, experiment_name("lost"), request_timeout_s=3, retry_interval_s=0
        )
        proxy.armed.append(("/runs/create", b"opt_study.role"))  # the parent's creation
        assert sink.parent_run("lost", params={"workload": "quadratic"}, tags={}) is None
        assert len(_runs(server, "lost")[0]) == 1 and len(sink.pending()) == 1  # created, unanswered
        assert sink.drain() == 0
        [parent] = _runs(server, "lost")[0]

        proxy.armed.append(("/runs/create", b"opt_study.trial_id"))  # a child's creation
        assert _log(sink, None, "t0", 0)[0] is None and len(sink.pending()) == 1
        assert sink.drain() == 0
        proxy.armed.append(("/runs/log-batch", b'"metrics"'))  # a child's metric points
        assert _log(sink, parent.info.run_id, "t1", 1)[0] is None
        assert [p.name[13:] for p in sink.pending()] == ["log_trial-t1.json"]
        # The next write first re-delivers t1 (retry_interval_s=0), then its own is lost.
        proxy.armed.append(("/runs/update", parent.info.run_id.encode()))  # the parent's end
        sink.end_parent(parent.info.run_id)
        assert [p.name[13:] for p in sink.pending()] == ["end_parent-lost.json"]
        assert len(proxy.dropped) == 4 and proxy.armed == []
        assert sink.drain() == 0 and sink.pending() == [] and sink.failed() == []
        assert _check_study(server, "lost", 2).info.status == "FINISHED"
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_a_real_study_runs_while_the_server_is_down(server, ray_cluster, tmp_path):
    """`run_study` with the tracking server down from the start: the trials train and finish,
    the MLflow writes wait in the queue, and `opt-study sync-mlflow` (the real CLI) delivers them."""
    from opt_study.plan.planners import plan_trials
    from opt_study.study.run import run_study
    from opt_study.validate import load_study

    if server.proc.poll() is None:
        server.stop()
    spec_file = tmp_path / "down.yaml"
    spec_file.write_text(
        f"study: {{name: down, storage: '{tmp_path / 'store'}', seeds: [0], mlflow_uri: '{server.uri}'}}\n"
        "workload: {type: quadratic, dim: 8, cols: 4, noise: 0.1}\n"
        "scale: {workers: 1, cpus_per_worker: 1, zero_stage: 0, micro_batch_size: 4}\n"
        "training: {steps: 5, eval_every: 5}\n"
        "optimizers: [{name: sgd, params: {lr: {grid: [0.01, 0.1]}}}]\n"
    )
    spec = load_study(spec_file)
    out = io.StringIO()
    res = run_study(spec, source_text=spec_file.read_text(), out=out)
    assert res["ran"] == 2 and res["parent_run_id"] is None
    assert out.getvalue().count("COMPLETED") == 2 and "opt-study sync-mlflow" in out.getvalue()
    queued = sorted(p.name.split("-", 1)[1] for p in mlflow_queue.pending_entries(spec.study_dir))
    tids = sorted(p.trial_id for p in plan_trials(spec))
    trial_writes = [f"log_trial-{t}.json" for t in tids for _ in ("start", "end")]  # at trial start and end
    assert queued == sorted(["parent_run-down.json", "end_parent-down.json"] + trial_writes)

    server.start()
    cli = subprocess.run(
        [sys.executable, "-m", "opt_study.cli", "sync-mlflow", str(spec.study_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert mlflow_queue.pending_entries(spec.study_dir) == []
    parents, children = _runs(server, "down")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(children) == tids and all(len(v) == 1 for v in children.values())
    for [run] in children.values():
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.info.status == "FINISHED" and run.data.params["optimizer"] == "sgd"
        assert len(_client(server).get_metric_history(run.info.run_id, "train/loss")) == 5
