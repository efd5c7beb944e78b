"""Hyperparameter domains: parsing and its errors, sampling ranges, and the deterministic
expansion of a space into grid x samples configurations."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from opt_study.config.space import (
    MAX_VALUES,
    Domain,
    budget,
    dedupe,
    expand,
    expand_quasirandom,
    map_unit,
    parse_domain,
)


# ------------------------------------------------------------------------------ parse_domain
@pytest.mark.parametrize(
    "raw,kind,values",
    [
        (0.1, "fixed", (0.1,)),
        (3, "fixed", (3,)),
        (True, "fixed", (True,)),
        ("cosine", "fixed", ("cosine",)),
        ({"choice": [0.0, 0.1, True, "x"]}, "choice", (0.0, 0.1, True, "x")),
        ({"grid": [0.03, 0.1]}, "grid", (0.03, 0.1)),
        ({"grid": [1, 1.5, True]}, "grid", (1, 1.5, True)),  # 1 and True are distinct grid points
        ({"uniform": [0, 1]}, "uniform", (0.0, 1.0)),
        ({"uniform": [-2.5, -1]}, "uniform", (-2.5, -1.0)),
        ({"loguniform": [1e-4, 1e-2]}, "loguniform", (1e-4, 1e-2)),
        ({"int": [2, 8]}, "int", (2, 8)),
        ({"int": [-3, -1]}, "int", (-3, -1)),
    ],
)
def test_parse_domain_kinds(raw, kind, values):
    d = parse_domain(raw, "p.lr")
    assert d == Domain(kind, values)
    if kind in ("uniform", "loguniform"):
        assert all(type(v) is float for v in d.values)


@pytest.mark.parametrize(
    "raw,prefix",
    [
        ([0.1, 0.2], "p.lr: a hyperparameter is a scalar"),
        (None, "p.lr: a hyperparameter is a scalar"),
        ({}, "p.lr: a hyperparameter is a scalar"),
        ({"grid": [1], "choice": [2]}, "p.lr: a hyperparameter is a scalar"),
        ({"normal": [0, 1]}, "p.lr: unknown domain 'normal'"),
        (float("nan"), "p.lr: must be a finite number"),
        (float("-inf"), "p.lr: must be a finite number"),
        (10**400, "p.lr: must be a finite number"),
        ({"choice": []}, "p.lr.choice: must be a non-empty list of scalars"),
        ({"choice": 0.1}, "p.lr.choice: must be a non-empty list of scalars"),
        ({"choice": [[0.1]]}, "p.lr.choice: must be a non-empty list of scalars"),
        ({"choice": [0.1, None]}, "p.lr.choice: must be a non-empty list of scalars"),
        ({"choice": [0.1, float("inf")]}, "p.lr.choice: must be a finite number"),
        ({"grid": [0.1, 0.1]}, "p.lr.grid: grid values must be distinct"),
        ({"grid": list(range(MAX_VALUES + 1))}, f"p.lr.grid: at most {MAX_VALUES} values"),
        ({"uniform": [1, 1]}, "p.lr.uniform: must be [lo, hi] with finite numbers lo < hi"),
        ({"uniform": [2, 1]}, "p.lr.uniform: must be [lo, hi]"),
        ({"uniform": [0, 1, 2]}, "p.lr.uniform: must be [lo, hi]"),
        ({"uniform": [0, float("inf")]}, "p.lr.uniform: must be [lo, hi]"),
        ({"uniform": [0, 10**400]}, "p.lr.uniform: must be [lo, hi]"),
        ({"uniform": [False, True]}, "p.lr.uniform: must be [lo, hi]"),
        ({"uniform": ["a", "b"]}, "p.lr.uniform: must be [lo, hi]"),
        ({"loguniform": [0, 1]}, "p.lr.loguniform: lo must be > 0"),
        ({"loguniform": [-1, 1]}, "p.lr.loguniform: lo must be > 0"),
        ({"int": [1.0, 4]}, "p.lr.int: must be [lo, hi] with integers lo < hi"),
        ({"int": [False, 4]}, "p.lr.int: must be [lo, hi] with integers lo < hi"),
        ({"int": [4, 4]}, "p.lr.int: must be [lo, hi] with integers lo < hi"),
        ({"int": [1, 2, 3]}, "p.lr.int: must be [lo, hi] with integers lo < hi"),
        ({"int": [0, 10**400]}, "p.lr.int: must be [lo, hi] with integers lo < hi"),
    ],
)
def test_parse_domain_errors_name_the_field(raw, prefix):
    with pytest.raises(ValueError) as ei:
        parse_domain(raw, "p.lr")
    assert str(ei.value).startswith(prefix), str(ei.value)


def test_describe():
    assert parse_domain(0.1, "x").describe() == "0.1"
    assert parse_domain({"grid": [1, 2]}, "x").describe() == "grid[1, 2]"


# ------------------------------------------------------------------------------ sampling
def test_samples_stay_in_their_domain_and_loguniform_is_uniform_in_log():
    rng = random.Random(0)
    u, lu, ch = Domain("uniform", (-1.0, 3.0)), Domain("loguniform", (1e-4, 1e-2)), Domain("choice", ("a", "b"))
    us = [u.sample(rng) for _ in range(2000)]
    lus = [lu.sample(rng) for _ in range(2000)]
    assert all(-1.0 <= x <= 3.0 for x in us) and abs(statistics.mean(us) - 1.0) < 0.1
    assert all(1e-4 <= x <= 1e-2 for x in lus)
    # the median of a log-uniform draw is the geometric mean of the ends: 1e-3 (the plain mean of
    # the ends, 5e-3, would be the median of a uniform draw)
    assert abs(math.log10(statistics.median(lus)) + 3) < 0.1
    assert {ch.sample(rng) for _ in range(200)} == {"a", "b"}
    assert Domain("fixed", (0.9,)).sample(rng) == 0.9
    ints = [Domain("int", (2, 5)).sample(rng) for _ in range(400)]
    assert set(ints) == {2, 3, 4, 5} and all(type(k) is int for k in ints)  # both ends included


def test_int_domain_maps_the_unit_interval_to_equal_bins():
    d = parse_domain({"int": [2, 5]}, "k")
    assert [map_unit(d, u) for u in (0.0, 0.2499, 0.25, 0.5, 0.75, 0.999999)] == [2, 2, 3, 4, 5, 5]
    qs = [c["k"] for c in expand_quasirandom({"k": d}, 8, seed=1)]
    assert sorted(qs) == [2, 2, 3, 3, 4, 4, 5, 5]  # a Sobol prefix of 8: two points per bin


# ------------------------------------------------------------------------------ expand / budget
SPACE = {
    "lr": Domain("grid", (0.1, 0.01, 0.001)),
    "momentum": Domain("fixed", (0.9,)),
    "wd": Domain("loguniform", (1e-5, 1e-2)),
    "nesterov": Domain("grid", (True, False)),
    "beta": Domain("choice", (0.9, 0.95, 0.99)),
}


def test_expand_is_grid_times_samples():
    configs = expand(SPACE, 4, random.Random("0:adamw"))
    assert len(configs) == 3 * 2 * 4 == budget(SPACE, 4)
    assert all(list(c) == sorted(SPACE) for c in configs)  # every config has every key, sorted
    points = [(c["lr"], c["nesterov"]) for c in configs]
    assert {p: points.count(p) for p in set(points)} == {(lr, n): 4 for lr in (0.1, 0.01, 0.001) for n in (True, False)}
    assert all(c["momentum"] == 0.9 and 1e-5 <= c["wd"] <= 1e-2 and c["beta"] in (0.9, 0.95, 0.99) for c in configs)
    assert dedupe(configs)  # 24 distinct continuous draws of wd


def test_expand_is_deterministic_for_a_seed():
    a = expand(SPACE, 3, random.Random("7:x"))
    assert a == expand(SPACE, 3, random.Random("7:x"))
    assert a != expand(SPACE, 3, random.Random("8:x"))
    # the order keys are given in does not matter: draws follow sorted key order
    assert a == expand(dict(reversed(list(SPACE.items()))), 3, random.Random("7:x"))


def test_expand_without_grid_or_samples_dimensions():
    assert expand({}, 2, random.Random(0)) == [{}, {}]
    fixed = {"lr": Domain("fixed", (0.1,))}
    assert expand(fixed, 1, random.Random(0)) == [{"lr": 0.1}]
    assert budget(fixed, 5) == 5 and budget({}, 1) == 1
    assert not dedupe(expand(fixed, 2, random.Random(0)))  # two identical configurations


def test_budget_multiplies_grids_only():
    assert budget(SPACE, 1) == 6
    assert (
        budget(
            {
                "a": Domain("grid", tuple(range(10))),
                "b": Domain("grid", tuple(range(7))),
                "c": Domain("choice", tuple(range(100))),
            },
            3,
        )
        == 210
    )
