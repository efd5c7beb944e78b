"""A small real study (Ray Tune, in-process DeepSpeed trials, Parquet, a SQLite MLflow store), its
report, and what a user sees of both:

- the MLflow store: one child run per trial whose duration is the trial's (start and end from
  the trial records), metric names grouped by prefix, numeric hyperparameters as ``hp/``
  metrics that a filter can compare, and a parent run with description, ``spec.yaml``,
  ``plan.json``, the report and per-optimizer bests;
- the report page in a real headless Chromium (Debian's ``chromium``, driven by Playwright),
  opened from disk and as MLflow's artifact viewer shows it (fetched from a real ``mlflow
  server`` and opened from a ``blob:`` URL, where relative links cannot resolve): every figure
  renders and the console has no error.

``OPT_STUDY_SCREENSHOTS=<folder>`` keeps the two screenshots there (docs/img/ has them).
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from opt_study.report import build
from opt_study.results import trials as trials_tbl
from opt_study.study.run import run_study
from opt_study.validate import load_study

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"  # Debian's package; `make install` installs it when missing
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LRS = (0.003, 0.03)
SPEC = """study: {{name: browse, storage: '{storage}', seeds: [0, 1], description: 'Two optimizers on a quadratic.'}}
workload: {{type: quadratic, dim: 8, cols: 4, noise: 0.1}}
scale: {{workers: 1, cpus_per_worker: 1, zero_stage: 0, micro_batch_size: 4}}
training: {{steps: 12, eval_every: 6}}
measure: {{every: 2}}
optimizers:
  - {{name: sgd, params: {{lr: {{grid: [{lr0}, {lr1}]}}}}}}
  - {{name: adamw, params: {{lr: 0.01}}}}
"""


@pytest.fixture(scope="module")
def study(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("browse")
    f = root / "browse.yaml"
    f.write_text(SPEC.format(storage=root / "store", lr0=LRS[0], lr1=LRS[1]))
    spec = load_study(f)
    assert run_study(spec, source_text=f.read_text(), out=io.StringIO())["ran"] == 6
    build.write_report(spec.study_dir)
    return spec


def _client(spec):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(spec.tracking_uri)
    exp = client.get_experiment_by_name(f"opt_study/{spec.study.name}")
    return client, exp.experiment_id


def test_mlflow_runs_match_the_trial_records(study):
    client, exp = _client(study)
    runs = client.search_runs([exp], max_results=100)
    [parent] = [r for r in runs if r.data.tags.get("opt_study.role") == "parent"]
    children = {r.data.tags["opt_study.trial_id"]: r for r in runs if r.data.tags.get("opt_study.role") == "trial"}
    records = {r["trial_id"]: r for r in trials_tbl.read_trial_records(study.study_dir)}
    assert sorted(children) == sorted(records) and len(runs) == 7  # a role tag on every run
    for tid, run in children.items():
        rec = records[tid]
        # the child run lasts as long as the trial: its times are the record's (ms resolution)
        assert run.info.start_time == int(rec["started"] * 1000) and run.info.end_time == int(rec["ended"] * 1000)
        assert run.info.end_time - run.info.start_time > 500  # a trial takes seconds, not 33 ms
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
        names = set(run.data.metrics)
        assert {"train/loss", "train/lr", "eval/loss", "summary/best_eval_loss", "hp/lr"} <= names
        assert {"measure/convexity_gap_fwd", "measure/smoothness_local", "measure/noise_floor"} <= names
        assert all(n.split("/")[0] in ("train", "eval", "measure", "summary", "hp") for n in names), names
        assert run.data.metrics["hp/lr"] == rec["hparams"]["lr"]
        # measured-step curves at their steps: measured every 2 steps (and at the evaluations)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "measure/smoothness_local")]
        assert len(steps) >= 5 and steps == sorted(steps)
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 12
        assert run.data.metrics["summary/best_eval_loss"] == pytest.approx(rec["summary"]["best_eval_loss"])
    # params are strings, hp/ metrics are numbers: a numeric filter selects by learning rate
    small = client.search_runs([exp], filter_string="metrics.`hp/lr` < 0.01", max_results=100)
    assert sorted(r.data.tags["opt_study.trial_id"] for r in small) == sorted(
        t for t, r in records.items() if r["hparams"]["lr"] < 0.01
    )
    assert len(small) == 2  # sgd at lr 0.003, seeds 0 and 1
    # the parent: description, the study's own files, the report, the best result per optimizer
    assert "Two optimizers on a quadratic." in parent.data.tags["mlflow.note.content"]
    logged = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"spec.yaml", "plan.json", "report"} <= logged
    assert [f.path for f in client.list_artifacts(parent.info.run_id, "report")] == ["report/index.html"]
    for label in ("sgd", "adamw"):
        best = min(r["summary"]["best_eval_loss"] for r in records.values() if r["label"] == label)
        assert parent.data.metrics[f"best/{label}/eval_loss"] == pytest.approx(best)
        holder = parent.data.tags[f"opt_study.best.{label}"]
        assert records[holder]["summary"]["best_eval_loss"] == pytest.approx(best)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(study):
    """`mlflow server` on the study's own store (what `opt-study ui` starts)."""
    port = _free_port()
    db = study.tracking_uri
    log = open(study.storage_root / "server.log", "ab")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_ENABLE_TELEMETRY": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd + ["--backend-store-uri", db, "--workers", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (study.storage_root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "mlflow server not ready in 120 s"
                time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # uvicorn's workers too
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} missing: `make install` installs Debian's chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


def _open(browser, goto, origin: str | None = None) -> tuple[list, list[str], object]:
    """A fresh page (first at ``origin``, if given: the server's, where the page's own requests,
    e.g. for /favicon.ico, are not the report's), then ``goto(page)``; the images' (complete,
    natural width, alt) and the console errors of the report."""
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    if origin:
        page.goto(origin)
        page.wait_for_load_state("networkidle")
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    goto(page)
    page.wait_for_load_state("load")
    images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
    return images, errors, page


def _check(images, errors, page, shot: str | None, full_page: bool = True) -> None:
    assert len(images) == 6, images  # trajectories, distributions, sensitivity, smoothness, valley, loss
    assert all(done and width > 0 for done, width, _ in images), images
    assert errors == []
    keep = os.environ.get("OPT_STUDY_SCREENSHOTS")
    if keep and shot:
        Path(keep).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(keep) / shot), full_page=full_page, type="jpeg", quality=55)
    page.close()


def test_report_renders_from_disk(study, browser):
    path = study.study_dir / "report" / "index.html"
    images, errors, page = _open(browser, lambda p: p.goto(path.as_uri()))
    assert page.title() == "opt_study report: browse"
    _check(images, errors, page, "report_from_disk.jpg")


def test_report_renders_as_mlflow_serves_it(study, browser, mlflow_server):
    """As the MLflow UI's artifact viewer does it: fetch the artifact from the server, then show
    it from a ``blob:`` URL. A page that links its figures as files beside it shows them broken
    here (checked with a copy of the page whose first figure is a relative link)."""
    client, exp = _client(study)
    [parent] = client.search_runs([exp], filter_string="tags.`opt_study.role` = 'parent'", max_results=1)
    src = f"/get-artifact?path=report/index.html&run_uuid={parent.info.run_id}"

    def as_blob(page, html_override: str | None = None):
        blob = page.evaluate(
            """async ([src, override]) => {
                 const text = override ?? await (await fetch(src)).text();
                 return URL.createObjectURL(new Blob([text], {type: "text/html"}));
               }""",
            [src, html_override],
        )
        assert blob.startswith("blob:")
        page.goto(blob)

    with urllib.request.urlopen(mlflow_server + src, timeout=30) as r:
        served = r.read().decode()
    assert served == (study.study_dir / "report" / "index.html").read_text()
    images, errors, page = _open(browser, as_blob, origin=f"{mlflow_server}/health")
    _check(images, errors, page, None)
    # the check is real: a relative link (what the report used to write) does not render here
    relative = served.replace('src="data:image/png;base64,', 'src="trajectories.png" data-x="', 1)
    images, _, page = _open(browser, lambda p: as_blob(p, relative), origin=f"{mlflow_server}/health")
    assert [w for _, w, _ in images].count(0) == 1
    page.close()


def test_report_renders_in_the_mlflow_ui(study, browser, mlflow_server):
    """The real thing: the MLflow UI's artifact viewer on the parent run's report/index.html. It
    shows the page in an iframe from a ``blob:`` URL; every figure there renders, and the page
    logs no console error (the UI's own messages are not the report's)."""
    client, exp = _client(study)
    [parent] = client.search_runs([exp], filter_string="tags.`opt_study.role` = 'parent'", max_results=1)
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    errors: list[str] = []

    def on_console(m) -> None:  # the UI's own requests (e.g. a 404 on an optional endpoint) are not the report's
        if m.type == "error" and not m.location.get("url", "").startswith(mlflow_server + "/"):
            errors.append(f"{m.text} ({m.location.get('url')})")

    page.on("console", on_console)
    page.goto(f"{mlflow_server}/#/experiments/{exp}/runs/{parent.info.run_id}/artifacts/report/index.html")
    deadline = time.monotonic() + 90
    while not (frames := [f for f in page.frames if f.url.startswith("blob:")]):
        assert time.monotonic() < deadline, [f.url for f in page.frames]
        page.wait_for_timeout(250)
    [frame] = frames
    frame.wait_for_load_state("load")
    assert frame.title() == "opt_study report: browse"
    images = frame.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
    frame.evaluate("document.getElementById('trajectories').scrollIntoView()")  # figures in the screenshot
    page.wait_for_timeout(300)
    _check(images, errors, page, "report_in_mlflow.jpg", full_page=False)
