"""The CLI's output contracts (issue 17): `--version`, `status --json`, `validate` reporting every
error at once on the field that conflicts, and a real study's console (counts, rates, ETA, no
Ray or MLflow banners), through `opt_study.cli.main` in this process (a real local Ray, a real
in-process DeepSpeed trial, MLflow on SQLite)."""

from __future__ import annotations

import io
import json
import math

import pytest

from opt_study.cli.main import main
from opt_study.study import console


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"opt-study {version('opt_study')}\n"


def test_validate_reports_every_error_at_once(spec_factory, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    spec_factory.write(
        path,
        scale={"zero_stage": 4},
        training={"steps": -1},
        optimizers=[
            {"name": "adamw", "params": {"lr": 0.1}},
            {"name": "nosuch"},
            {"name": "sgd", "params": {"lrr": 1}},
        ],
        measure={"every": "often"},
    )
    assert main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    fields = [ln.removeprefix(f"error: {path}: ").split(":", 1)[0] for ln in lines]
    # one line per problem, each naming the file and the field (the optimizer names are checked
    # against the registry once the structure is sound: next case)
    assert fields == ["scale.zero_stage", "training.steps", "measure.every"], err
    assert all(ln.startswith(f"error: {path}: ") for ln in lines)
    # the structure is fine: the registry checks report each optimizer entry's problem
    spec_factory.write(
        path, optimizers=[{"name": "nosuch"}, {"name": "sgd", "params": {"lrr": 1}}], measure={"extra": ["nometric"]}
    )
    assert main(["validate", str(path)]) == 2
    fields = [ln.removeprefix(f"error: {path}: ").split(":", 1)[0] for ln in capsys.readouterr().err.splitlines()]
    assert fields == ["optimizers[0].name", "optimizers[1].params.lrr", "measure.extra[0]"]


def test_bf16_without_zero_names_the_scale(spec_factory, tmp_path, capsys):
    path = tmp_path / "bf16.yaml"
    spec_factory.write(path, scale={"zero_stage": 0, "precision": "bf16"})
    assert main(["validate", str(path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {path}: scale.precision: bf16 cannot run at zero_stage 0")
    assert "set scale.zero_stage to 1 or 2 or 3 to keep bf16, or scale.precision to fp32 or fp16" in line


def test_validate_prints_a_table_and_pipeable_json(spec_factory, tmp_path, capsys):
    path = tmp_path / "ok.yaml"
    spec_factory.write(path, optimizers=[{"name": "sgd", "params": {"lr": {"grid": [0.1, 0.2]}}}])
    assert main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == f"{path}: OK\n"  # stdout holds the plan only
    lines = out.splitlines()
    assert lines[0] == "study:               t" and lines[1] == "trials:              2"
    assert [ln.split()[0] for ln in lines if ln.startswith("sgd-")] == ["sgd-000-s0", "sgd-001-s0"]
    assert main(["validate", "--json", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and [t["hparams"]["lr"] for t in json.loads(out)["trials"]] == [0.1, 0.2]


def test_board_posts_reach_the_console(ray_cluster, spec_factory):
    """A trial's rank 0 posts to the board between evaluations; the driver's recorder reads it."""
    from opt_study.plan import TrialPlan
    from opt_study.results.sink import NullSink
    from opt_study.study.recorder import StudyRecorder

    spec = spec_factory(training={"steps": 100, "eval_every": 50})
    plan = TrialPlan("sgd-000-s0", "sgd", "sgd", {"lr": 0.1}, seed=0, index=0)
    board, out = console.progress_board(), io.StringIO()
    try:
        rec = StudyRecorder(spec, [plan], {}, NullSink(), None, out=out, board=board)
        rec.progress.start(plan.trial_id)
        post = console.board_poster(board, plan.trial_id)
        ray_cluster.get(post({"step": 10, "loss": 0.7, "units_per_s": 1000.0}))
        rec._poll_board()
        assert rec.progress.trials[plan.trial_id].steps_per_s is None  # a rate needs two posts
        ray_cluster.get(post({"step": 30, "loss": 0.5, "units_per_s": 1234.0}))
        rec._poll_board()
        t = rec.progress.trials[plan.trial_id]
        assert (t.done_steps, t.loss, t.units_per_s) == (30, 0.5, 1234.0) and t.steps_per_s > 0
        assert "    sgd-000-s0               step    29 ( 30%)" in "\n".join(rec.progress.block())
    finally:
        ray_cluster.kill(board)


def test_real_study_console_and_status_json(ray_cluster, spec_factory, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(console, "PLAIN_EVERY_S", 1.0)  # the trials are short: a status block every second
    path = tmp_path / "s.yaml"
    spec_factory.write(
        path,
        study={"name": "console"},
        scale={"launcher": "in_process", "workers": 1, "cpus_per_worker": 1},
        training={"steps": 20, "eval_every": 10},
        optimizers=[{"name": "sgd", "params": {"lr": {"grid": [0.01, 0.03]}}}],
        measure={"every": 0},
    )
    assert main(["run", str(path)]) == 0
    out, err = capsys.readouterr()
    for noise in (
        "Configuration for experiment",
        "TensorBoard",
        "INFO mlflow",
        "PYTHON worker processes",
        "NaN or Inf",
    ):
        assert noise not in out + err, noise
    lines = out.splitlines()
    assert any(" EVAL      step     9 ( 50%)" in ln for ln in lines)  # 10 steps done = Parquet step 9
    assert any(ln.endswith("COMPLETED loss " + ln.split("COMPLETED loss ")[-1]) for ln in lines)
    summaries = [ln for ln in lines if " running  " in ln and " pending  " in ln]
    assert summaries and all("steps/s" in ln and "units/s" in ln and " ETA " in ln for ln in summaries)
    assert summaries[-1].split("] ", 1)[1].startswith("0 running  0 pending  2 done")
    # status --json: every trial record, NaN as null, parseable by any JSON reader
    assert main(["status", "--json", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["study"] == "console" and doc["counts"] == {"completed": 2}
    assert [t["trial_id"] for t in doc["trials"]] == ["sgd-000-s0", "sgd-001-s0"]
    assert all(t["summary"]["steps_done"] == 20.0 and math.isfinite(t["summary"]["final_loss"]) for t in doc["trials"])
    # the table form agrees
    assert main(["status", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "completed: 2"
