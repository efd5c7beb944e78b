"""The `pool` launcher (opt_study.study.pool) reuses a slot's rank processes from one trial to the
next and leaves nothing behind: a trial run on a reused slot stores the same Parquet rows, bit for
bit, as the same trial run on fresh processes (a new study, a new slot)."""

from __future__ import annotations

import io
import json

import pytest

from opt_study.results.parquet import read_steps
from opt_study.results.trials import read_trial_records
from opt_study.study.run import run_study

pytestmark = pytest.mark.slow
# what differs between two runs of one trial on any launcher: wall-clock columns and ids
TIMING = {"trial_id", "attempt", "time_unix", "step_time_s", "units_per_s"}


def _spec(spec_factory, name: str, lrs: list[float]):
    return spec_factory(
        study={"name": name},
        # dropout on: every step draws from the global RNG, so a leaked RNG state would show
        workload={"type": "tiny_lm", "layers": 1, "heads": 2, "width": 32, "context": 16, "dropout": 0.1},
        scale={"workers": 2, "cpus_per_worker": 0.5, "zero_stage": 2, "micro_batch_size": 4, "launcher": "pool"},
        training={"steps": 12, "eval_every": 6, "checkpoint_every": 6},
        optimizers=[{"name": "adamw", "params": {"lr": {"grid": lrs}}}],
        measure={"every": 3},
        search={"max_concurrent_trials": 1},  # one slot, lent to each trial in turn
    )


def _rows(spec, lr: float) -> list[str]:
    (tid,) = [r["trial_id"] for r in read_trial_records(spec.study_dir) if r["hparams"]["lr"] == lr]
    rows = read_steps(spec.study_dir, trial_ids=[tid]).to_pylist()
    return [json.dumps({k: v for k, v in r.items() if k not in TIMING}, sort_keys=True, default=str) for r in rows]


def _pool_ranks_made(ray) -> int:
    """Rank actors this Ray ever started, dead ones included (the GCS's actor table: the public
    state API needs the dashboard, which the test cluster does not run)."""
    from ray._private import state

    return sum(a["ActorClassName"].endswith("PoolRank") for a in state.actors().values())


def test_trial_on_a_reused_slot_stores_the_rows_of_fresh_processes(ray_cluster, spec_factory):
    before = _pool_ranks_made(ray_cluster)
    reused = _spec(spec_factory, "poolreuse", [0.003, 0.01])
    run_study(reused, out=io.StringIO())
    # two trials, one after the other, on one slot of two rank actors: the second reused them
    assert _pool_ranks_made(ray_cluster) - before == 2
    fresh = _spec(spec_factory, "poolfresh", [0.01])
    run_study(fresh, out=io.StringIO())
    assert _pool_ranks_made(ray_cluster) - before == 4
    assert {r["status"] for r in read_trial_records(reused.study_dir)} == {"completed"}
    got, want = _rows(reused, 0.01), _rows(fresh, 0.01)
    assert len(want) == 12 and got == want


def test_a_trainable_tune_ends_stops_its_ranks(ray_cluster, spec_factory, monkeypatch):
    """Tune ending a pool trainable (tune.report raises SystemExit in a stopped one) stops its
    ranks at their next step and lends the slot again; a trainable killed outright stops renewing
    its slot's lease, and the keeper then kills the slot's ranks."""
    from opt_study.plan.planners import plan_trials
    from opt_study.study import pool

    monkeypatch.setattr(pool, "RENEW_S", 0.5)  # the trainable's side runs here, in the test
    spec = spec_factory(
        study={"name": "poolstop"},
        workload={"type": "tiny_lm", "layers": 1, "heads": 2, "width": 32, "context": 16},
        scale={"workers": 2, "cpus_per_worker": 0.5, "micro_batch_size": 4, "launcher": "pool"},
        training={"steps": 400, "eval_every": 6},
    )
    (plan,) = plan_trials(spec)
    keeper = pool.make_keeper(spec, lease_s=4.0)
    try:
        slot = ray_cluster.get(keeper.acquire.remote())
        reports = []

        def tune_report(metrics):  # a stopped trainable's tune.report
            reports.append(metrics["step"])
            raise SystemExit(0)

        with pytest.raises(SystemExit):
            pool._run_on(slot, spec, plan.as_dict(), None, tune_report, keeper)
        steps = [r["step"] for r in read_steps(spec.study_dir).to_pylist()]
        assert reports == [6] and 6 <= max(steps) < 399, (reports, steps)
        assert _settled(ray_cluster, keeper, []), "the stopped trial's slot was not lent again"
        # lent again (the same slot: its ranks ended cleanly), then never renewed: reclaimed
        again = ray_cluster.get(keeper.acquire.remote())
        assert again.key == slot.key and ray_cluster.get(keeper.lent.remote()) == [slot.key]
        assert _settled(ray_cluster, keeper, [], wait_s=60)
        with pytest.raises(ray_cluster.exceptions.RayActorError):
            ray_cluster.get(slot.ranks[0].where.remote(), timeout=60)
    finally:
        pool.close_keeper(keeper)


def _settled(ray, keeper, lent: list, wait_s: float = 30) -> bool:
    """Whether the keeper's lent slots become `lent` within wait_s (its calls from one caller may
    run out of order: it is a threaded actor)."""
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < wait_s:
        if ray.get(keeper.lent.remote()) == lent:
            return True
        time.sleep(0.2)
    return False
