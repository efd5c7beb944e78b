"""One tiny real TPE study end to end through Ray Tune (the searcher, its rules and its resume
logic, driven directly, are tests/unit/test_tpe.py)."""

from __future__ import annotations

import io
import json

import pytest

from opt_study.config.space import seed_of
from opt_study.plan.tpe import trial_id, trial_value
from opt_study.results.trials import read_trial_records, write_trial_record
from opt_study.study.tpe_search import optuna_distribution

import specs

pytestmark = pytest.mark.slow


def test_tiny_tpe_study_end_to_end(ray_cluster, tmp_path):
    """A real TPE study: Ray Tune asks StudyTPE, in-process DeepSpeed trials train `quadratic`,
    the recorder writes each proposed trial; the first post-start-up proposal is exactly what
    Optuna's TPE makes from the recorded results (and differs when the results are permuted);
    a resume re-runs only the unfinished trials with their recorded hyperparameters."""
    import optuna
    import pyarrow.parquet as pq

    spec = specs.make_spec(
        tmp_path,
        file="t.yaml",
        search={"method": "tpe", "samples": 3, "tpe_startup_trials": 2, "seed": 0, "max_concurrent_trials": 1},
        optimizers=[
            {"name": "sgd", "params": {"lr": {"loguniform": [1e-3, 0.3]}}},
            {"name": "momentum", "params": {"lr": {"loguniform": [1e-3, 0.3]}, "momentum": {"uniform": [0.5, 0.95]}}},
        ],
        workload={"type": "quadratic", "dim": 8, "cols": 4, "noise": 0.1},
        scale={"workers": 1, "cpus_per_worker": 1, "zero_stage": 0, "micro_batch_size": 4},
        training={"steps": 20, "eval_every": 10, "checkpoint_every": 0},
        measure={"every": 0},
    )
    from opt_study.study.run import run_study

    assert run_study(spec, out=io.StringIO())["ran"] == 6
    table = pq.read_table(spec.study_dir / "trials.parquet").to_pylist()
    assert len(table) == 6 and {r["phase"] for r in table} == {"tpe"}
    for label, keys in (("sgd", {"lr"}), ("momentum", {"lr", "momentum"})):
        rows = sorted((r for r in table if r["label"] == label), key=lambda r: r["trial_id"])
        assert [r["trial_id"] for r in rows] == [trial_id(label, i, 0) for i in range(3)]
        hps = [{k: r[f"hp.{k}"] for k in keys} for r in rows]
        assert len({json.dumps(h, sort_keys=True) for h in hps}) == 3
        assert all(1e-3 <= h["lr"] <= 0.3 and 0.5 <= h.get("momentum", 0.5) <= 0.95 for h in hps)
        assert all(r["status"] in ("completed", "diverged") for r in rows)
        # replay the label's TPE from the records: the proposal after the 2 start-up trials
        values = [trial_value(r["status"], r["summary.best_eval_loss"]) for r in rows]
        space = next(o.space for o in spec.optimizers if o.label == label)
        dists = {k: optuna_distribution(space[k]) for k in keys}

        def propose(vals, label=label, hps=hps, dists=dists):  # called in this iteration only
            study = optuna.create_study(
                sampler=optuna.samplers.TPESampler(seed=seed_of(0, label, "tpe") % 2**32, n_startup_trials=2)
            )
            for h, v in zip(hps[:2], vals):
                study.add_trial(optuna.trial.create_trial(params=h, distributions=dists, value=v))
            return study.ask(dists).params

        assert propose(values[:2]) == hps[2]  # TPE's proposal from the first two results
        assert propose(values[:2][::-1]) != hps[2]  # other results, another proposal
    plan = json.loads((spec.study_dir / "plan.json").read_text())
    assert sorted(p["trial_id"] for p in plan) == sorted(r["trial_id"] for r in table)  # replayable
    # resume: one trial failed, one interrupted -> exactly those two run again, as recorded
    recs = {r["trial_id"]: r for r in read_trial_records(spec.study_dir)}
    for tid, status in (("sgd-tpe-002-s0", "failed"), ("momentum-tpe-001-s0", "running")):
        write_trial_record(spec.study_dir, {**recs[tid], "status": status})
    assert run_study(spec, out=io.StringIO())["ran"] == 2
    after = {r["trial_id"]: r for r in read_trial_records(spec.study_dir)}
    for tid, r in recs.items():
        assert after[tid]["hparams"] == r["hparams"]
        rerun = tid in ("sgd-tpe-002-s0", "momentum-tpe-001-s0")
        assert (after[tid]["ended"] != r["ended"]) == rerun and after[tid]["status"] in ("completed", "diverged")
