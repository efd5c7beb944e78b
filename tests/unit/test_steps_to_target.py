"""The steps-to-target protocol: its planner (tune, then confirm from records), its statistics
(checked against scipy.stats on fixed numbers), its validation refusals, and its report table on
a synthetic study whose every number is known by construction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy import stats as sps

from opt_study.config import ConfigError
from opt_study.config.spec import ScheduleConfig
from opt_study.plan.planners import plan_trials
from opt_study.plan.protocols import planned_trial_count
from opt_study.report import significance as sig
from opt_study.report import steps_to_target as stt
from opt_study.report.data import load
from opt_study.results.parquet import StepWriter
from opt_study.results.trials import write_trial_record

import specs

ST = {"protocol": "steps_to_target", "samples": 3, "rerun_seeds": [1, 2, 3], "target": {"value": 1.0}}
OPTS = [
    {"name": "sgd", "params": {"lr": {"loguniform": [1e-3, 1.0]}}},
    {"name": "adamw", "params": {"lr": {"loguniform": [1e-4, 1e-2]}, "weight_decay": 0.1}},
]


def make_spec(tmp_path, search=ST, optimizers=OPTS, **kw):
    return specs.make_spec(tmp_path, study={"name": "s", "seeds": [0]}, search=search, optimizers=optimizers, **kw)


def _record(tmp_path, plan, status, final):
    write_trial_record(
        tmp_path / "s", {"trial_id": plan.trial_id, "status": status, "summary": {"final_eval_loss": final}}
    )


# ------------------------------------------------------------------------------------ planner
def test_tune_phase_then_confirm_phase_planned_from_records(tmp_path):
    spec = make_spec(tmp_path)
    tune = plan_trials(spec)
    assert [p.trial_id for p in tune if p.label == "sgd"] == [f"sgd-tune-{i:03d}-s0" for i in range(3)]
    assert {p.phase for p in tune} == {"tune"} and len(tune) == 6
    assert [p.as_dict() for p in plan_trials(make_spec(tmp_path))] == [p.as_dict() for p in tune]  # stable
    sgd = [p for p in tune if p.label == "sgd"]
    # the final (not the best) validation loss decides: index 1 ends lowest
    for p, (status, final) in zip(sgd, [("completed", 2.0), ("completed", 1.5), ("running", math.nan)]):
        _record(tmp_path, p, status, final)
    assert [p.phase for p in plan_trials(spec)] == ["tune"] * 6  # a tune trial still running
    _record(tmp_path, sgd[2], "diverged", math.nan)
    plans = plan_trials(spec)
    confirm = [p for p in plans if p.phase == "confirm"]
    assert [(p.trial_id, p.index, p.seed) for p in confirm] == [(f"sgd-confirm-s{s}", 1, s) for s in (1, 2, 3)]
    assert all(p.hparams == sgd[1].hparams for p in confirm)
    assert [p.trial_id for p in plans[:6]] == [p.trial_id for p in tune]  # earlier ids unchanged
    assert planned_trial_count(spec) == 6 + 6


def test_ties_pick_the_earlier_draw_and_no_result_plans_no_confirmation(tmp_path):
    spec = make_spec(tmp_path, optimizers=OPTS[:1])
    tune = plan_trials(spec)
    for p in tune:
        _record(tmp_path, p, "failed", math.nan)
    assert not [p for p in plan_trials(spec) if p.phase == "confirm"]  # nothing to confirm
    for p, final in zip(tune, [1.0, 0.5, 0.5]):
        _record(tmp_path, p, "completed", final)
    assert {p.index for p in plan_trials(spec) if p.phase == "confirm"} == {1}


def test_plan_listing_shows_confirm_upper_bounds_until_planned(tmp_path):
    from opt_study.study.run import plan_table

    spec = make_spec(tmp_path)
    rows = plan_table(spec)
    bounds = [r for r in rows if r["status"] == "upper bound"]
    assert [r["trial_id"] for r in bounds] == [f"{o}-confirm-s{s}" for o in ("sgd", "adamw") for s in (1, 2, 3)]
    for p in plan_trials(spec):
        if p.label == "sgd":
            _record(tmp_path, p, "completed", 1.0 + p.index)
    rows = plan_table(spec)
    assert [r["trial_id"] for r in rows if r["phase"] == "confirm" and r["status"] == "planned"] == [
        f"sgd-confirm-s{s}" for s in (1, 2, 3)
    ]
    assert [r["trial_id"] for r in rows if r["status"] == "upper bound"] == [f"adamw-confirm-s{s}" for s in (1, 2, 3)]


# ---------------------------------------------------------------------------------- validation
def test_a_label_too_long_for_its_later_confirm_ids_is_refused_up_front(tmp_path):
    from opt_study.plan.planners import check_trial_ids

    opts = [{"name": "sgd", "label": "a" * 112, "params": {"lr": 0.1}}]
    check_trial_ids(make_spec(tmp_path, {**ST, "rerun_seeds": [1, 2]}, opts))  # tune and confirm ids fit
    with pytest.raises(ConfigError) as e:  # "-tune-000-s0" fits, "-confirm-s2147483647" does not
        check_trial_ids(make_spec(tmp_path, {**ST, "rerun_seeds": [1, 2**31 - 1]}, opts))
    assert e.value.field == "optimizers[0].label" and "of 132 characters" in e.value.message  # 112 + 20


@pytest.mark.parametrize(
    "search,field",
    [
        ({k: v for k, v in ST.items() if k != "target"}, "search.target"),
        ({**ST, "asha": {}}, "search.asha"),  # no early stopping under this protocol
        ({**ST, "target": {"metric": "loss", "value": 1.0}}, "search.target.metric"),
        ({**ST, "rerun_seeds": [1]}, "search.rerun_seeds"),
        ({**ST, "alpha": 0.7}, "search.alpha"),
        ({**ST, "method": "tpe"}, "search.method"),
        ({"alpha": 0.05}, "search.alpha"),
    ],
)
def test_config_errors_name_the_field(tmp_path, search, field):
    with pytest.raises(ConfigError) as e:
        make_spec(tmp_path, search)
    assert e.value.field == field


def test_shipped_cpu_config_plans_every_contender_at_zero0_fp32():
    from opt_study.validate import load_study

    spec = load_study(Path(__file__).resolve().parents[2] / "configs" / "optimizers_2026_cpu.yaml")
    assert spec.search.protocol == "steps_to_target" and spec.search.asha is None
    assert (spec.scale.zero_stage, spec.scale.precision, spec.scale.workers) == (0, "fp32", 1)
    labels = {o.label for o in spec.optimizers}
    assert {"adamw", "muon", "ademamix", "adopt", "mars", "psgd_kron", "normuon", "scion", "splus"} <= labels
    assert planned_trial_count(spec) == len(labels) * (3 + 3)


# ---------------------------------------------------------------------------------- statistics
LOSSES = [2.61, 2.64, 2.59, 2.66, 2.62]


@pytest.mark.parametrize("target", [2.63, 2.66, 2.68, 2.70])
def test_reaches_is_the_one_sided_t_test(target):
    p = sps.ttest_1samp(LOSSES, target, alternative="less").pvalue
    assert sig.reaches(LOSSES, target) == (p < 0.01)
    assert sig.reaches(LOSSES, target, alpha=0.2) == (sps.ttest_1samp(LOSSES, target, alternative="less").pvalue < 0.2)


def test_reach_margin_matches_the_t_quantile():
    sd = 0.0273861278752583  # statistics.stdev(LOSSES)
    assert sig.reach_margin(5, sd) == pytest.approx(3.746947387 * sd / math.sqrt(5), rel=1e-8)
    assert math.isnan(sig.reach_margin(1, sd))
    assert not sig.reaches([2.0], 3.0) and not sig.reaches([2.0, math.inf], 3.0)  # σ not measured / a diverged seed


@pytest.mark.parametrize(
    "a,b",
    [
        ([100, 110, 105], [130, 120, 140]),
        ([100, 110, 105], [112, 108, 118]),
        ([100, 101, 99, 100], [150, 90, 200]),
        ([140, 150], [100, 110, 105]),
    ],
)
def test_beats_is_welchs_one_sided_test(a, b):
    p = sps.ttest_ind(a, b, equal_var=False, alternative="less").pvalue
    assert sig.beats(a, b) == (p < 0.01)
    assert sig.beats(a, b, 0.1) == (sps.ttest_ind(a, b, equal_var=False, alternative="less").pvalue < 0.1)


def test_beats_without_spread_and_with_a_seed_that_never_reached():
    assert sig.beats([100, 100, 100], [110, 110, 110]) and not sig.beats([110, 110], [110, 110])
    assert sig.welch_margin([1, 1], [2, 2]) == 0.0
    assert not sig.beats([100, math.inf, 100], [200, 200, 200])


def test_decay_end_and_steps_counted_after_it():
    assert sig.decay_end(ScheduleConfig(type="constant", warmup_steps=10), 200) == 10
    for kind in ("cosine", "linear", "wsd"):
        assert sig.decay_end(ScheduleConfig(type=kind, warmup_steps=10), 200) == 200
    evals = [(9, 0.5), (19, 0.9), (29, 1.2), (39, 0.8)]  # (step index, eval loss)
    assert sig.steps_to_target(evals, 1.0, 0) == 10.0  # steps done = index + 1
    assert sig.steps_to_target(evals, 1.0, 15) == 20.0  # the evaluation at 10 steps is in warm-up
    assert sig.steps_to_target(evals, 1.0, 40) == 40.0  # a decaying schedule: the final one only
    assert sig.steps_to_target(evals, 0.7, 15) == math.inf


# ------------------------------------------------------------------------------- report table
SYNTH = {  # label -> per confirm seed: evaluations at steps 9, 19, 29, 39 (indices)
    "fast": [(3.0, 1.5, 0.9, 0.8), (3.0, 1.8, 0.95, 0.82), (3.0, 1.2, 0.92, 0.78)],
    "slow": [(3.0, 2.0, 1.5, 0.9), (3.0, 2.0, 1.4, 0.95), (3.0, 2.0, 1.6, 0.99)],
}


def _synth_study(tmp_path) -> Path:
    slices = dict(
        study={"name": "synth", "seeds": [0]},
        search={**ST, "samples": 1},
        optimizers=[{"name": "sgd", "label": k, "params": {"lr": 0.1}} for k in SYNTH],
        training={"steps": 40, "eval_every": 10, "schedule": {"type": "constant", "warmup_steps": 5}},
    )
    study = specs.make_spec(tmp_path, **slices).study_dir
    study.mkdir(parents=True, exist_ok=True)
    specs.write_spec(study / "spec.yaml", tmp_path, **slices)
    for label, seeds in SYNTH.items():
        for seed, evals in zip((1, 2, 3), seeds):
            tid = f"{label}-confirm-s{seed}"
            with StepWriter(study, tid, 0, 0, rows_per_chunk=100) as w:
                for step in range(40):
                    row = {"step": step, "loss": 1.0, "lr": 0.1, "time_unix": 1e9 + step}
                    if step % 10 == 9:
                        row["eval_loss"] = evals[step // 10]
                    w.append(row)
            rec = {"trial_id": tid, "label": label, "optimizer": "sgd", "seed": seed, "index": 0}
            write_trial_record(study, {**rec, "phase": "confirm", "status": "completed", "hparams": {"lr": 0.1}})
    return study


def test_result_table_from_a_synthetic_study(tmp_path):
    study = _synth_study(tmp_path)
    data = load(study, threads=1)
    try:
        spec = stt._spec(study)
        rows, values = stt.result_table(data, spec)
        pairs = stt.pairwise_table(values, 0.01)
        parts = stt.section(data)
    finally:
        data.db.close()
    by = {r["label"]: r for r in rows}
    assert values["fast"]["steps"] == [30.0, 30.0, 30.0] and values["slow"]["steps"] == [40.0, 40.0, 40.0]
    assert (by["fast"]["steps"], by["fast"]["reached"], by["fast"]["seeds"]) == (30.0, "3/3", 3)
    finals = [0.8, 0.82, 0.78]
    assert by["fast"]["final_eval_loss"] == pytest.approx(sum(finals) / 3)
    ci = sps.t.ppf(0.975, 2) * sps.tstd(finals) / math.sqrt(3)
    assert by["fast"]["final_eval_loss_ci"] == pytest.approx(ci)
    assert sps.ttest_1samp(finals, 1.0, alternative="less").pvalue < 0.01 and by["fast"]["verdict"] == "reaches"
    slow = [0.9, 0.95, 0.99]
    assert sps.ttest_1samp(slow, 1.0, alternative="less").pvalue > 0.01 and by["slow"]["verdict"] == "not shown"
    assert {(r["A"], r["B"]) for r in pairs} == {("fast", "slow")} and pairs[0]["fewer_steps"]
    assert any("Steps" in p or "steps" in p for p in parts)


def test_query_gives_the_protocol_tables_as_views(tmp_path, capsys):
    """`opt-study query` sees the report's two tables as views steps_to_target(_pairs), with the
    report's numbers; a study under another protocol gets a one-line error and exit code 2."""
    from opt_study.cli.main import main

    study = _synth_study(tmp_path)
    sql = "SELECT label, steps, reached, verdict, final_eval_loss FROM steps_to_target ORDER BY label"
    assert main(["query", str(study), sql, "--format", "json"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["label"], r["steps"], r["reached"], r["verdict"]) for r in got] == [
        ("fast", 30.0, "3/3", "reaches"),
        ("slow", 40.0, "3/3", "not shown"),
    ]
    assert got[0]["final_eval_loss"] == pytest.approx(0.8)
    assert main(["query", str(study), "SELECT * FROM steps_to_target_pairs", "--format", "json"]) == 0
    pairs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert pairs == [{"A": "fast", "B": "slow", "fewer_steps": True, "lower_final_loss": True}]

    other = specs.make_spec(tmp_path / "o", study={"name": "plain"}).study_dir
    other.mkdir(parents=True)
    specs.write_spec(other / "spec.yaml", tmp_path / "o", study={"name": "plain"})
    assert main(["query", str(other), "SELECT * FROM steps_to_target"]) == 2
    assert "is not a steps_to_target study (search.protocol)" in capsys.readouterr().err
