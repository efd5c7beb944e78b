"""`opt-study ui`: the deep link into the MLflow UI's training view, and a study tracked by a
server (nothing to start there: the command says where to open it, even when it is down)."""

from __future__ import annotations

import socket
import time

from opt_study.cli.main import main
from opt_study.results.mlflow_sink import MlflowSink, experiment_link


def test_experiment_link_opens_the_training_view(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sink = MlflowSink(uri, "opt_study/linked")
    link = experiment_link(uri, "opt_study/linked", "http://localhost:5000/")
    assert link == f"http://localhost:5000/#/experiments/{sink.experiment_id}/runs?workflowType=machine_learning"
    assert experiment_link(uri, "opt_study/absent", "http://localhost:5000") == "http://localhost:5000/"


def test_ui_on_a_server_uri_prints_where_to_open_it(spec_factory, tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on: the server is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    f = spec_factory.write(tmp_path / "served.yaml", study={"name": "served", "mlflow_uri": f"http://127.0.0.1:{port}"})
    t0 = time.monotonic()
    assert main(["ui", str(f)]) == 0
    out = capsys.readouterr().out
    assert f"tracked by the MLflow server http://127.0.0.1:{port}; open:" in out
    assert f"  http://127.0.0.1:{port}/\n" in out and "Traceback" not in out
    assert time.monotonic() - t0 < 60  # no minutes of HTTP retries against a server that is down
