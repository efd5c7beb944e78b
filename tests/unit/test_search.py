"""Search methods (random, scrambled-Sobol quasirandom) and the fair-tuning protocols
(crowded_valley, algoperf_external): the planning logic, exactly, without running a trial."""

from __future__ import annotations

import math
import random

import pytest

from opt_study import optim
from opt_study.config import ConfigError
from opt_study.config.space import expand, expand_quasirandom, map_unit, parse_domain, quasirandom_points
from opt_study.plan import TrialPlan
from opt_study.plan.planners import plan_trials
from opt_study.plan.protocols import planned_trial_count
from opt_study.results.trials import write_trial_record

import specs


def make_spec(tmp_path, search: dict, optimizers=None, seeds=(0,)):
    optimizers = optimizers or [
        {"name": "sgd", "params": {"lr": {"loguniform": [1e-3, 1.0]}}},
        {"name": "adamw", "params": {"lr": {"loguniform": [1e-4, 1e-2]}, "weight_decay": 0.1}},
    ]
    return specs.make_spec(tmp_path, study={"name": "s", "seeds": list(seeds)}, search=search, optimizers=optimizers)


def bins_hit(values, lo, hi, n):
    return {min(int((math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo)) * n), n - 1) for v in values}


# ------------------------------------------------------------------------------ quasirandom
def test_sobol_loguniform_covers_every_log_bin_where_random_does_not():
    space = {"lr": parse_domain({"loguniform": [1e-5, 1e-1]}, "lr")}
    sobol_full = sum(
        len(bins_hit([c["lr"] for c in expand_quasirandom(space, 8, s)], 1e-5, 1e-1, 8)) == 8 for s in range(20)
    )
    random_full = sum(
        len(bins_hit([c["lr"] for c in expand(space, 8, random.Random(s))], 1e-5, 1e-1, 8)) == 8 for s in range(20)
    )
    assert sobol_full == 20  # a scrambled Sobol 8-point set is stratified: one point per 1/8
    assert random_full == 0  # 8 i.i.d. points hit all 8 bins with probability 8!/8^8 = 0.24%


def test_sobol_choice_is_balanced_and_uniform_in_range():
    space = {"c": parse_domain({"choice": ["a", "b", "c", "d"]}, "c"), "u": parse_domain({"uniform": [-2.0, 3.0]}, "u")}
    cfgs = expand_quasirandom(space, 16, seed=3)
    assert sorted(c["c"] for c in cfgs) == sorted(["a", "b", "c", "d"] * 4)
    us = sorted(c["u"] for c in cfgs)
    assert all(-2.0 <= u < 3.0 for u in us)
    # stratified in every 1-D projection: exactly one point in each of 16 equal bins
    assert sorted(int((u + 2.0) / 5.0 * 16) for u in us) == list(range(16))


def test_quasirandom_is_deterministic_and_prefix_stable():
    a, b = quasirandom_points(3, 16, seed=7), quasirandom_points(3, 16, seed=7)
    assert a == b
    assert quasirandom_points(3, 5, seed=7) == a[:5]  # the first k of n points are the k points
    assert quasirandom_points(3, 16, seed=8) != a
    assert map_unit(parse_domain({"loguniform": [1e-4, 1e-2]}, "x"), 0.5) == pytest.approx(1e-3)
    assert map_unit(parse_domain({"choice": [1, 2, 3]}, "x"), 0.999999) == 3


def test_plan_method_quasirandom_is_deterministic_and_differs_from_random(tmp_path):
    q1 = plan_trials(make_spec(tmp_path, {"samples": 8, "method": "quasirandom", "seed": 1}))
    q2 = plan_trials(make_spec(tmp_path, {"samples": 8, "method": "quasirandom", "seed": 1}))
    q3 = plan_trials(make_spec(tmp_path, {"samples": 8, "method": "quasirandom", "seed": 2}))
    r = plan_trials(make_spec(tmp_path, {"samples": 8, "seed": 1}))
    assert [p.as_dict() for p in q1] == [p.as_dict() for p in q2]
    assert [p.hparams for p in q1] != [p.hparams for p in q3]
    assert [p.trial_id for p in q1] == [p.trial_id for p in r]  # ids do not depend on the method
    assert [p.hparams for p in q1] != [p.hparams for p in r]
    sgd = [p.hparams["lr"] for p in q1 if p.label == "sgd"]
    assert len(bins_hit(sgd, 1e-3, 1.0, 8)) == 8


def test_protocol_none_random_plan_is_unchanged(tmp_path):
    """The default plan is exactly what it was before protocols existed (a resumed study
    planned by an older version keeps its trial ids and hyperparameters)."""
    spec = make_spec(tmp_path, {"samples": 3, "seed": 5}, seeds=(0, 1))
    plans = plan_trials(spec)
    want = []
    for opt in spec.optimizers:
        for i, hp in enumerate(expand(opt.space, 3, random.Random(f"5:{opt.label}"))):
            want += [(f"{opt.label}-{i:03d}-s{s}", hp, s, "", "") for s in (0, 1)]
    assert [(p.trial_id, p.hparams, p.seed, p.phase, p.budget) for p in plans] == want
    assert planned_trial_count(spec) == len(plans) == 12


# ---------------------------------------------------------------------------- crowded_valley
CV = {"protocol": "crowded_valley", "budgets": {"small": 2, "medium": 3, "large": 5}, "rerun_seeds": [7, 8, 9]}


def test_crowded_valley_phases_budgets_and_seed_counts(tmp_path):
    plans = plan_trials(make_spec(tmp_path, CV, seeds=(0, 1)))
    assert not [p for p in plans if p.phase == "rerun"]  # nothing has run yet
    assert [p.phase for p in plans] == sorted(
        (p.phase for p in plans),  # the order Tune runs them in
        key=["oneshot", "search", "oneshot_rerun"].index,
    )
    for label in ("sgd", "adamw"):
        mine = [p for p in plans if p.label == label]
        one = [p for p in mine if p.phase == "oneshot"]
        assert [p.trial_id for p in one] == [f"{label}-oneshot-s0", f"{label}-oneshot-s1"]
        # the one-shot configuration is also rerun with the rerun seeds, planned at once (it is
        # known before anything runs; the paper reports one-shot performance over seeds too)
        again = [p for p in mine if p.phase == "oneshot_rerun"]
        assert [(p.trial_id, p.seed, p.budget, p.index) for p in again] == [
            (f"{label}-oneshot-rerun-s{s}", s, "oneshot", 0) for s in (7, 8, 9)
        ]
        assert all(p.hparams == one[0].hparams for p in again)
        search = [p for p in mine if p.phase == "search"]
        assert len(search) == 5 * 2
        assert [(p.index, p.budget) for p in search if p.seed == 0] == [
            (0, "small"),
            (1, "small"),
            (2, "medium"),
            (3, "large"),
            (4, "large"),
        ]
        assert search[4].trial_id == f"{label}-search-medium-002-s0"
        assert len({p.trial_id for p in mine}) == len(mine)


def test_crowded_valley_oneshot_uses_registry_defaults(tmp_path):
    spec = make_spec(
        tmp_path,
        CV,
        optimizers=[
            {"name": "adamw", "params": {"lr": {"loguniform": [1e-4, 1e-2]}, "weight_decay": 0.1}},
            {"name": "adam"},
        ],
    )  # no params: the entry's default space
    plans = plan_trials(spec)
    one = {p.label: p.hparams for p in plans if p.phase == "oneshot"}
    assert one["adamw"] == {"lr": optim.optimizer_entry("adamw").defaults["lr"], "weight_decay": 0.1}
    adam = optim.optimizer_entry("adam")
    assert one["adam"] == {k: adam.defaults[k] for k in adam.space}
    adam_search = [p.hparams for p in plans if p.label == "adam" and p.phase == "search"]
    assert {tuple(sorted(h)) for h in adam_search} == {tuple(sorted(adam.space))}
    lo, hi = adam.space["lr"]["loguniform"]
    assert all(lo <= h["lr"] <= hi for h in adam_search)


def test_crowded_valley_budgets_are_nested(tmp_path):
    def search(budgets, method="random"):
        spec = make_spec(tmp_path, {**CV, "budgets": budgets, "method": method})
        return {(p.label, p.index): p.hparams for p in plan_trials(spec) if p.phase == "search"}

    for method in ("random", "quasirandom"):
        big = search({"small": 2, "medium": 3, "large": 5}, method)
        mid = search({"small": 2, "medium": 3, "large": None}, method)
        small = search({"small": 2, "medium": 2, "large": None}, method)
        assert len(big) == 10 and len(mid) == 6 and len(small) == 4
        assert all(big[k] == v for k, v in mid.items())
        assert all(mid[k] == v for k, v in small.items())


def test_crowded_valley_nesting_holds_per_grid_point(tmp_path):
    opts = [{"name": "momentum", "params": {"lr": {"loguniform": [1e-3, 0.1]}, "momentum": {"grid": [0.5, 0.9]}}}]
    big = [p for p in plan_trials(make_spec(tmp_path, CV, opts)) if p.phase == "search"]
    mid = [
        p
        for p in plan_trials(make_spec(tmp_path, {**CV, "budgets": {"small": 2, "medium": 3, "large": None}}, opts))
        if p.phase == "search"
    ]
    assert [(p.hparams["momentum"], p.budget) for p in big] == [
        (m, b) for m in (0.5, 0.9) for b in ("small", "small", "medium", "large", "large")
    ]
    assert [p.hparams for p in mid] == [p.hparams for p in big if p.budget != "large"]


def _record(tmp_path, plan, status, best):
    write_trial_record(
        tmp_path / "s", {"trial_id": plan.trial_id, "status": status, "summary": {"best_eval_loss": best}}
    )


def test_rerun_picks_the_best_of_each_budget_from_trial_records(tmp_path):
    spec = make_spec(tmp_path, CV, seeds=(0, 1))
    search = [p for p in plan_trials(spec) if p.phase == "search"]
    # per configuration index: mean over its two seeds decides (index 3 is best overall,
    # index 1 best among the small budget's 0-1, index 2 is better than both but diverged once)
    losses = {0: (5.0, 5.0), 1: (2.0, 4.0), 2: (0.5, math.nan), 3: (1.0, 1.5), 4: (9.0, 9.0)}
    for p in search[:-1]:
        _record(tmp_path, p, "completed", losses[p.index][p.seed])
    assert not [p for p in plan_trials(spec) if p.phase == "rerun"]  # one search trial missing
    _record(tmp_path, search[-1], "running", math.nan)
    assert not [p for p in plan_trials(spec) if p.phase == "rerun"]  # still running
    _record(tmp_path, search[-1], "completed", losses[search[-1].index][search[-1].seed])
    for p in search:
        if p.index == 2 and p.seed == 1:
            _record(tmp_path, p, "diverged", math.nan)
    reruns = [p for p in plan_trials(spec) if p.phase == "rerun"]
    sgd = [p for p in reruns if p.label == "sgd"]
    # index 2 has one finite completed trial (0.5) -> best of medium and large
    assert [(p.trial_id, p.budget) for p in sgd] == (
        [(f"sgd-rerun-001-s{s}", "small") for s in (7, 8, 9)]
        + [(f"sgd-rerun-002-s{s}", "medium,large") for s in (7, 8, 9)]
    )
    hp = {p.index: p.hparams for p in search if p.label == "sgd"}
    assert all(p.hparams == hp[p.index] for p in sgd)
    assert len(reruns) == 12  # two optimizers x two distinct bests x three seeds
    assert planned_trial_count(spec) >= len(plan_trials(spec)) == 2 * (2 + 10 + 3) + 12


def test_rerun_ignores_failed_and_stopped_trials_and_ties_pick_the_earlier_draw(tmp_path):
    spec = make_spec(
        tmp_path,
        {**CV, "budgets": {"small": 2, "medium": 3, "large": None}, "rerun_seeds": [1]},
        optimizers=[{"name": "sgd", "params": {"lr": {"loguniform": [1e-3, 1.0]}}}],
    )
    search = [p for p in plan_trials(spec) if p.phase == "search"]
    for p, (status, best) in zip(search, [("completed", 3.0), ("completed", 3.0), ("failed", math.nan)]):
        _record(tmp_path, p, status, best)
    reruns = [p for p in plan_trials(spec) if p.phase == "rerun"]
    assert [(p.trial_id, p.budget, p.seed) for p in reruns] == [("sgd-rerun-000-s1", "small,medium", 1)]
    _record(tmp_path, search[1], "stopped", 0.1)  # an ASHA-stopped trial is not a candidate
    _record(tmp_path, search[2], "completed", 2.0)
    reruns = [p for p in plan_trials(spec) if p.phase == "rerun"]
    assert [(p.trial_id, p.budget) for p in reruns] == [("sgd-rerun-000-s1", "small"), ("sgd-rerun-002-s1", "medium")]


# ------------------------------------------------------------------------- algoperf_external
AP = {
    "protocol": "algoperf_external",
    "samples": 4,
    "studies": 3,
    "seed": 2,
    "target": {"metric": "eval_loss", "value": 0.25},
}


def test_algoperf_studies_are_independent_quasirandom_and_carry_the_target(tmp_path):
    spec = make_spec(tmp_path, AP, seeds=(0, 1))
    plans = plan_trials(spec)
    assert len(plans) == planned_trial_count(spec) == 2 * 3 * 4 * 2
    sgd = [p for p in plans if p.label == "sgd" and p.seed == 0]
    assert [p.budget for p in sgd] == [f"study{k}" for k in range(3) for _ in range(4)]
    assert sgd[5].trial_id == "sgd-external-study1-001-s0" and sgd[5].phase == "external"
    studies = [[p.hparams["lr"] for p in sgd if p.budget == f"study{k}"] for k in range(3)]
    assert len({tuple(s) for s in studies}) == 3  # each study its own Sobol seed
    assert all(len(bins_hit(s, 1e-3, 1.0, 4)) == 4 for s in studies)  # each one stratified
    assert plans[0].as_dict()["target"] == {"metric": "eval_loss", "value": 0.25}
    assert [p.as_dict() for p in plan_trials(make_spec(tmp_path, AP, seeds=(0, 1)))] == [p.as_dict() for p in plans]


def test_trial_plan_round_trips_through_as_dict():
    p = TrialPlan(
        "a-rerun-001-s3",
        "a",
        "adamw",
        {"lr": 0.1},
        3,
        1,
        phase="rerun",
        budget="small,large",
        target={"metric": "loss", "value": 1.0},
    )
    assert TrialPlan(**p.as_dict()) == p
    assert TrialPlan(**{k: v for k, v in p.as_dict().items() if k not in ("phase", "budget", "target")}).phase == ""


# ------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "search,field",
    [
        ({"method": "sobol"}, "search.method"),
        ({"protocol": "optuna"}, "search.protocol"),
        ({"protocol": "crowded_valley", "budgets": {"small": 5, "medium": 3}}, "search.budgets.medium"),
        ({"protocol": "crowded_valley", "budgets": {"small": 2, "medium": 3, "large": 2}}, "search.budgets.large"),
        ({"protocol": "crowded_valley", "budgets": {"small": 0}}, "search.budgets.small"),
        ({"protocol": "crowded_valley", "rerun_seeds": []}, "search.rerun_seeds"),
        ({"protocol": "crowded_valley", "rerun_seeds": [1, 1]}, "search.rerun_seeds"),
        ({"protocol": "crowded_valley", "asha": {}}, "search.asha"),
        ({"protocol": "algoperf_external"}, "search.target"),
        ({**AP, "method": "random"}, "search.method"),
        ({**AP, "target": {"metric": "accuracy", "value": 1.0}}, "search.target.metric"),
        ({"studies": 2}, "search.studies"),
    ],
)
def test_search_config_errors_name_the_field(tmp_path, search, field):
    with pytest.raises(ConfigError) as e:
        make_spec(tmp_path, search)
    assert e.value.field == field


def test_an_integer_hyperparameter_is_searched_with_an_int_domain(tmp_path):
    la = lambda k: [{"name": "lookahead_momentum", "params": {"k": k}}]  # noqa: E731
    with pytest.raises(ConfigError) as e:
        make_spec(tmp_path, {"samples": 2}, la({"uniform": [2, 6]}))  # a draw of 3.7 would fail the trial
    assert e.value.field == "optimizers[0].params.k" and "{int: [lo, hi]}" in e.value.message
    ks = [p.hparams["k"] for p in plan_trials(make_spec(tmp_path, {"samples": 8}, la({"int": [2, 6]})))]
    assert all(type(k) is int and 2 <= k <= 6 for k in ks) and len(set(ks)) > 1


def test_shipped_crowded_valley_cpu_config_plans_as_documented():
    from pathlib import Path

    from opt_study.validate import load_study

    spec = load_study(Path(__file__).parents[2] / "configs" / "crowded_valley_cpu.yaml")
    plans = plan_trials(spec, records=[])
    assert spec.search.protocol == "crowded_valley" and spec.scale.resolved_launcher == "in_process"
    assert len(plans) == 4 * (1 + 3 + 2)  # oneshot, search, oneshot_rerun (2 rerun seeds)
    assert {p.phase for p in plans} == {"oneshot", "search", "oneshot_rerun"}
    assert planned_trial_count(spec) == 4 * (1 + 3 + 2 + 2 * 2)  # + at most 2 bests x 2 seeds
