"""A study refuses silent changes: a spec that would rerun stored trials differently is refused
(one line, exit 2, nothing overwritten); `--extend` adds trials; the plan prints as a table or JSON."""

from __future__ import annotations

import json

import pytest

from opt_study.cli.main import main
from opt_study.config import ConfigError
from opt_study.plan.fingerprint import config_hash, spec_changes
from opt_study.plan.planners import plan_trials
from opt_study.results.trials import write_trial_record
from opt_study.storage import layout
from opt_study.study.run import check_unchanged, write_spec
from opt_study.validate import load_study

GRID = {"name": "sgd", "params": {"lr": {"grid": [0.1, 0.3]}}}


def _finished_study(tmp_path, spec_factory):
    """A study as `opt-study run` leaves it: spec.yaml, plan.json and completed trial records."""
    f = spec_factory.write(tmp_path / "study.yaml", optimizers=[GRID])
    spec = load_study(f)
    write_spec(spec, f.read_text())
    for p in plan_trials(spec):
        write_trial_record(
            spec.study_dir,
            {**p.as_dict(), "status": "completed", "config_hash": config_hash(spec, p)},
        )
    return spec


def _stored(spec) -> tuple[bytes, bytes]:
    return layout.spec_path(spec.study_dir).read_bytes(), layout.plan_path(spec.study_dir).read_bytes()


def test_a_changed_grid_is_refused_and_nothing_is_overwritten(tmp_path, spec_factory, capsys):
    spec = _finished_study(tmp_path, spec_factory)
    before = _stored(spec)
    f = spec_factory.write(
        tmp_path / "edited.yaml", optimizers=[{"name": "sgd", "params": {"lr": {"grid": [0.1, 0.5]}}}]
    )
    assert main(["run", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: {f}: optimizers[sgd].params.lr: study t ")
    assert "1 stored trial(s) affected, e.g. sgd-001-s0" in err
    assert "new study.name" in err and "--extend" in err
    assert _stored(spec) == before
    # --extend does not help: a stored trial would change
    assert main(["run", "--extend", str(f)]) == 2
    assert _stored(spec) == before


def test_other_changed_fields_are_named(tmp_path, spec_factory):
    spec = _finished_study(tmp_path, spec_factory)
    edited = spec_factory(optimizers=[GRID], training={"steps": 6}, workload={"dim": 5})
    ch = spec_changes(spec, edited, _records(spec))
    assert set(ch.fields) == {"training.steps", "workload.dim"}
    assert ch.changed_trials == ("sgd-000-s0", "sgd-001-s0") and ch.added_trials == ()
    fewer_seeds = spec_factory(optimizers=[GRID], study={"seeds": [1]})
    assert spec_changes(spec, fewer_seeds, _records(spec)).fields == ("study.seeds",)


def _records(spec):
    from opt_study.results.trials import read_trial_records

    return read_trial_records(spec.study_dir)


def test_added_trials_need_extend(tmp_path, spec_factory, capsys):
    spec = _finished_study(tmp_path, spec_factory)
    before = _stored(spec)
    more = [{"name": "sgd", "params": {"lr": {"grid": [0.1, 0.3, 1.0]}}}]
    f = spec_factory.write(tmp_path / "more.yaml", optimizers=more)
    assert main(["run", str(f)]) == 2
    err = capsys.readouterr().err
    assert "adds 1 trial(s) (e.g. sgd-002-s0); run with --extend" in err
    assert _stored(spec) == before
    assert check_unchanged(load_study(f), extend=True) is True
    assert check_unchanged(spec) is False  # the stored spec itself: nothing changed
    with pytest.raises(ConfigError):
        check_unchanged(load_study(f))


def test_dry_run_json_lists_every_trial(tmp_path, spec_factory, capsys):
    f = spec_factory.write(
        tmp_path / "s.yaml",
        optimizers=[GRID, {"name": "adam", "params": {"lr": {"grid": [0.01, 0.001]}}}],
        study={"seeds": [0, 1]},
    )
    assert main(["run", "--dry-run", "--json", str(f)]) == 0
    doc = json.loads(capsys.readouterr().out)
    ids = [t["trial_id"] for t in doc["trials"]]
    assert ids == [p.trial_id for p in plan_trials(load_study(f))] and len(ids) == 8
    assert doc["trials"][1] == {
        "trial_id": "sgd-000-s1",
        "label": "sgd",
        "optimizer": "sgd",
        "hparams": {"lr": 0.1},
        "seed": 1,
        "index": 0,
        "phase": "",
        "budget": "",
        "target": None,
        "status": "planned",
    }
    assert doc["summary"]["trials"] == 8 and doc["imported"] == []
    assert not layout.spec_path(load_study(f).study_dir).exists()  # a dry run writes nothing
    assert main(["validate", str(f)]) == 0
    table = capsys.readouterr().out
    assert "adam-001-s1" in table and "lr=0.001" in table


def test_crowded_valley_plan_shows_the_reruns_as_an_upper_bound(tmp_path, spec_factory, capsys):
    f = spec_factory.write(
        tmp_path / "cv.yaml",
        optimizers=[{"name": "sgd"}],
        search={"protocol": "crowded_valley", "budgets": {"small": 1, "medium": 2, "large": None}, "rerun_seeds": [7]},
    )
    assert main(["validate", "--json", str(f)]) == 0
    rows = json.loads(capsys.readouterr().out)["trials"]
    phases = [r["phase"] for r in rows]
    assert phases.count("oneshot") == 1 and phases.count("search") == 2 and phases.count("oneshot_rerun") == 1
    reruns = [r for r in rows if r["phase"] == "rerun"]
    assert [(r["trial_id"], r["budget"], r["status"]) for r in reruns] == [
        ("sgd-rerun-<best small>-s7", "small", "upper bound"),
        ("sgd-rerun-<best medium>-s7", "medium", "upper bound"),
    ]
