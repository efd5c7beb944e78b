"""TPE search (opt_study.plan.tpe): the domain -> Optuna mapping, the searcher's contract (ids, seeds,
equal budgets, the objective, resume from the trials table) driven directly, and the config rules.
One tiny real TPE study end to end through Ray Tune is tests/e2e/test_tpe_study.py."""

from __future__ import annotations

import json
import math

import pytest

from opt_study.config import ConfigError
from opt_study.config.space import Domain, parse_domain, seed_of
from opt_study.plan.planners import pending_plans, plan_trials
from opt_study.plan.protocols import planned_trial_count
from opt_study.plan.tpe import trial_id, trial_value
from opt_study.results.trials import read_trial_records, write_trial_record
from opt_study.study.run import describe
from opt_study.study.tpe_search import StudyTPE, optuna_distribution

import specs

LR = (1e-3, 1.0)


def make_spec(tmp_path, search=None, optimizers=None, seeds=(0,), **over):
    """A TPE study (spec "t"); `over` replaces or deep-merges top-level slices (tests/specs.py)."""
    optimizers = optimizers or [
        {"name": "sgd", "params": {"lr": {"loguniform": list(LR)}}},
        {
            "name": "lookahead_momentum",
            "params": {
                "lr": {"loguniform": list(LR)},
                "k": {"int": [2, 6]},
                "alpha": {"choice": [0.3, 0.5, 0.8]},
                "momentum": 0.9,
            },
        },
    ]
    return specs.make_spec(
        tmp_path,
        file="t.yaml",
        study={"name": "t", "seeds": list(seeds)},
        optimizers=optimizers,
        search={"method": "tpe", "samples": 6, "tpe_startup_trials": 2, "seed": 3, **(search or {})},
        **over,
    )


def drive(searcher: StudyTPE, objective, status=lambda plan: "completed") -> list[dict]:
    """Run the searcher to the end as Tune does with one trial at a time; `objective(plan)` is a
    trial's best eval loss, `status(plan)` how it ended. Returns the plans in the order handed out."""
    plans = []
    while True:
        cfg = searcher.suggest(f"tune{len(plans)}")
        if cfg == "FINISHED":
            return plans
        p = cfg["trial"]
        plans.append(p)
        st = status(p)
        result = None if st == "failed" else {"status": st, "best_eval_loss": objective(p)}
        searcher.on_trial_complete(f"tune{len(plans) - 1}", result, error=st == "failed")


def near(opt_lr):
    """A loss lowest at lr = opt_lr (seed s adds 0.01 s)."""
    return lambda p: (math.log(p["hparams"]["lr"]) - math.log(opt_lr)) ** 2 + 0.01 * p["seed"]


# --------------------------------------------------------------------------------- domains
def test_domains_map_to_optuna_distributions():
    from optuna import distributions as od

    assert optuna_distribution(parse_domain({"uniform": [0.5, 0.99]}, "m")) == od.FloatDistribution(0.5, 0.99)
    assert optuna_distribution(parse_domain({"loguniform": [1e-4, 1e-1]}, "lr")) == od.FloatDistribution(
        1e-4, 1e-1, log=True
    )
    assert optuna_distribution(parse_domain({"int": [2, 6]}, "k")) == od.IntDistribution(2, 6)
    assert optuna_distribution(parse_domain({"choice": [0.0, "x", True]}, "c")) == od.CategoricalDistribution(
        (0.0, "x", True)
    )
    for d in (Domain("fixed", (0.1,)), Domain("grid", (0.1, 0.2))):
        with pytest.raises(ValueError, match="not a TPE dimension"):
            optuna_distribution(d)


def test_trial_value_is_the_best_eval_loss_with_divergence_worst():
    assert trial_value("completed", 0.25) == 0.25
    assert trial_value("stopped", 0.5) == 0.5  # ASHA-stopped: its best so far
    assert trial_value("diverged", 0.1) == math.inf  # a low loss before blowing up does not count
    assert trial_value("completed", math.nan) == math.inf
    assert trial_value("failed", 0.2) is None and trial_value("pending", None) is None


# ------------------------------------------------------------------------------- the searcher
def test_every_label_gets_samples_configurations_each_run_once_per_seed(tmp_path):
    spec = make_spec(tmp_path, seeds=(0, 1))
    plans = drive(StudyTPE(spec, []), near(0.03))
    assert len(plans) == 2 * 6 * 2
    for label in ("sgd", "lookahead_momentum"):
        mine = [p for p in plans if p["label"] == label]
        assert [p["trial_id"] for p in mine] == [trial_id(label, i, s) for i in range(6) for s in (0, 1)]
        configs = [p["hparams"] for p in mine[::2]]
        assert [p["hparams"] for p in mine[1::2]] == configs  # one configuration, both seeds
        assert len({json.dumps(c, sort_keys=True) for c in configs}) == 6  # distinct proposals
        assert all(LR[0] <= c["lr"] <= LR[1] for c in configs)
        assert all(p["phase"] == "tpe" and p["index"] == int(p["trial_id"].split("-")[-2]) for p in mine)
    la = [p["hparams"] for p in plans if p["label"] == "lookahead_momentum"]
    assert all(
        h["momentum"] == 0.9
        and isinstance(h["k"], int)
        and 2 <= h["k"] <= 6
        and h["alpha"] in (0.3, 0.5, 0.8)
        and list(h) == sorted(h)
        for h in la
    )
    # labels take turns: configuration i of every label is handed out before i + 1 of any
    assert [p["label"] for p in plans[:8]] == ["sgd"] * 2 + ["lookahead_momentum"] * 2 + ["sgd"] * 2 + [
        "lookahead_momentum"
    ] * 2


def test_later_proposals_depend_on_earlier_results(tmp_path):
    """The first tpe_startup_trials proposals are TPE's random start-up, whatever the results;
    after that the proposals follow the results: fed a loss that is lowest at lr = 1e-3 they
    concentrate near 1e-3, fed one lowest at 1.0 near 1.0."""
    spec = make_spec(
        tmp_path,
        {"samples": 16, "tpe_startup_trials": 4},
        optimizers=[{"name": "sgd", "params": {"lr": {"loguniform": list(LR)}}}],
    )
    low = [p["hparams"]["lr"] for p in drive(StudyTPE(spec, []), near(1e-3))]
    high = [p["hparams"]["lr"] for p in drive(StudyTPE(spec, []), near(1.0))]
    assert low[:4] == high[:4]
    assert low[4:] != high[4:]
    mean_log = lambda xs: sum(math.log10(x) for x in xs) / len(xs)  # noqa: E731
    # log10 lr is uniform on [-3, 0] under random search (mean -1.5); measured -2.16 and -0.84
    assert mean_log(low[4:]) < -2.0 and mean_log(high[4:]) > -1.0
    again = [p["hparams"]["lr"] for p in drive(StudyTPE(spec, []), near(1e-3))]
    assert again == low  # seeded: the same results give the same proposals


def test_objective_is_the_mean_over_seeds_diverged_inf_failed_ignored(tmp_path):
    spec = make_spec(
        tmp_path, {"samples": 3}, seeds=(0, 1), optimizers=[{"name": "sgd", "params": {"lr": {"loguniform": list(LR)}}}]
    )
    s = StudyTPE(spec, [])
    ends = {(1, 1): "diverged", (2, 0): "failed"}  # (configuration, seed) -> status; else completed
    plans = drive(s, lambda p: 1.0 + p["seed"], status=lambda p: ends.get((p["index"], p["seed"]), "completed"))
    assert len(plans) == 6
    assert [v for _, v in s.told["sgd"]] == [1.5, math.inf, None]
    study = s._tpe["sgd"]._ot_study  # what Optuna itself holds
    assert [(t.state.name, t.value) for t in study.trials] == [
        ("COMPLETE", 1.5),
        ("COMPLETE", math.inf),
        ("FAIL", None),
    ]


def _rec(tmp_path, tid, label, hp, status, best, seed=0):
    write_trial_record(
        tmp_path / "t",
        {
            "trial_id": tid,
            "label": label,
            "optimizer": "sgd",
            "seed": seed,
            "hparams": hp,
            "status": status,
            "phase": "tpe",
            "summary": {"best_eval_loss": best},
        },
    )


def test_resume_feeds_finished_configurations_back_and_reruns_only_unfinished_seeds(tmp_path):
    spec = make_spec(
        tmp_path, {"samples": 6}, seeds=(0, 1), optimizers=[{"name": "sgd", "params": {"lr": {"loguniform": list(LR)}}}]
    )
    f = near(0.03)
    first = drive(StudyTPE(spec, []), f)
    for p in first[:7]:  # configurations 0-2 finished (1 diverged on a seed); 3 seed 0 finished
        status = "diverged" if (p["index"], p["seed"]) == (1, 0) else "completed"
        _rec(tmp_path, p["trial_id"], "sgd", p["hparams"], status, f(p), p["seed"])
    _rec(tmp_path, "sgd-tpe-003-s1", "sgd", first[7]["hparams"], "failed", None, 1)  # 4-5: never proposed
    records = read_trial_records(spec.study_dir)
    assert [p.trial_id for p in pending_plans(spec)] == [
        "sgd-tpe-003-s1",
        "sgd-tpe-004-s0",
        "sgd-tpe-004-s1",
        "sgd-tpe-005-s0",
        "sgd-tpe-005-s1",
    ]
    assert len(plan_trials(spec)) == 8  # proposed so far: configurations 0-3, both seeds
    assert describe(spec)["trials"] == planned_trial_count(spec) == 12
    s = StudyTPE(spec, records)
    mean = lambda i: (f(first[2 * i]) + f(first[2 * i + 1])) / 2  # noqa: E731
    assert s.told["sgd"] == [
        ({"lr": first[0]["hparams"]["lr"]}, mean(0)),
        ({"lr": first[2]["hparams"]["lr"]}, math.inf),
        ({"lr": first[4]["hparams"]["lr"]}, mean(2)),
    ]
    rest = drive(s, f)
    assert [p["trial_id"] for p in rest] == [
        "sgd-tpe-003-s1",
        "sgd-tpe-004-s0",
        "sgd-tpe-004-s1",
        "sgd-tpe-005-s0",
        "sgd-tpe-005-s1",
    ]
    assert rest[0]["hparams"] == first[7]["hparams"]  # the unfinished seed keeps its configuration
    assert len(s.told["sgd"]) == 6 and s.told["sgd"][3] == ({"lr": first[6]["hparams"]["lr"]}, pytest.approx(mean(3)))
    assert [p["hparams"] for p in rest[1:]] != [p["hparams"] for p in first[8:]]  # 4-5 saw another history


# ---------------------------------------------------------------------------------- the rules
@pytest.mark.parametrize(
    "search,optimizers,field",
    [
        ({"protocol": "crowded_valley"}, None, "search.method"),
        ({"samples": 4, "tpe_startup_trials": 4}, None, "search.tpe_startup_trials"),
        ({"tpe_startup_trials": 0}, None, "search.tpe_startup_trials"),
        ({}, [{"name": "sgd", "params": {"lr": {"grid": [0.1, 0.2]}}}], "optimizers[0].params.lr"),
        ({}, [{"name": "sgd", "params": {"lr": 0.1}}], "optimizers[0].params"),
        ({}, [{"name": "sgd"}], "optimizers[0].params"),
    ],
)
def test_tpe_config_errors_name_the_field(tmp_path, search, optimizers, field):
    with pytest.raises(ConfigError) as e:
        make_spec(tmp_path, search, optimizers)
    assert e.value.field == field


def test_tpe_seed_is_stable_per_label(tmp_path):
    """Each label's TPE has its own seed from search.seed and the label: adding an optimizer
    leaves the others' proposals as they were."""
    one = make_spec(tmp_path, optimizers=[{"name": "sgd", "params": {"lr": {"loguniform": list(LR)}}}])
    two = make_spec(tmp_path)
    a = [p["hparams"] for p in drive(StudyTPE(one, []), near(0.03))]
    b = [p["hparams"] for p in drive(StudyTPE(two, []), near(0.03)) if p["label"] == "sgd"]
    assert a == b and seed_of(3, "sgd", "tpe") != seed_of(3, "lookahead_momentum", "tpe")
