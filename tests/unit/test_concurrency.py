"""How many trials Tune may run at once (issue 16): the user's cap, else the autoscaler's maximum
cluster, else no bound (Tune queues every ready trial, so an autoscaler sees them pending)."""

from __future__ import annotations

from opt_study.study.resources import max_concurrent


def test_no_cap_and_no_autoscaler_leaves_tune_unbounded(spec_factory):
    assert max_concurrent(spec_factory(), None) is None
    assert max_concurrent(spec_factory(), {}) is None


def test_the_users_cap_wins(spec_factory):
    spec = spec_factory(search={"max_concurrent_trials": 3})
    assert max_concurrent(spec, None) == 3
    assert max_concurrent(spec, {"CPU": 1000.0, "GPU": 0.0}) == 3


def test_an_autoscalers_maximum_bounds_by_the_scarcer_resource(spec_factory):
    spec = spec_factory(scale={"workers": 2, "cpus_per_worker": 4, "gpus_per_worker": 1})
    assert max_concurrent(spec, {"CPU": 64.0, "GPU": 8.0}) == 4  # GPUs: 8 / 2; CPUs would allow 8
    assert max_concurrent(spec, {"CPU": 64.0, "GPU": 0.0}) == 1  # never 0: check_fits says why


def test_an_autoscalers_maximum_for_cpu_trials(spec_factory):
    spec = spec_factory(scale={"launcher": "in_process", "workers": 1, "cpus_per_worker": 2})
    assert max_concurrent(spec, {"CPU": 16.0, "GPU": 0.0}) == 8
