"""The steps-to-target protocol end to end through the real runner (Ray Tune, in-process
DeepSpeed trials): the tune phase, the confirm phase planned from its records, and the result
read back through `opt-study query`'s views. Its statistics on fixed numbers are
tests/unit/test_steps_to_target.py."""

from __future__ import annotations

import io
import json

import pytest
from scipy import stats as sps

from opt_study.results.query import open_study
from opt_study.results.trials import read_trial_records

import specs

pytestmark = pytest.mark.slow

STEPS, EVERY, SEEDS = 30, 5, [1, 2]
TARGET = 5.0  # the fast label's eval loss falls below it within 10 steps; the slow one's stays near 50


def test_steps_to_target_study_end_to_end(ray_cluster, tmp_path, capsys):
    """Tune: 2 configurations per label, each trained to the end (no early stopping). Confirm:
    the one with the lower final eval loss, once per rerun seed. The `steps_to_target` view
    equals the numbers recomputed here from the stored evaluations (first evaluation at or after
    warm-up with eval loss <= target) and scipy's one-sided t-test."""
    from opt_study.cli.main import main
    from opt_study.study.run import run_study

    slices = dict(
        search={"protocol": "steps_to_target", "samples": 2, "rerun_seeds": SEEDS, "target": {"value": TARGET}},
        optimizers=[
            {"name": "sgd", "label": "fast", "params": {"lr": {"loguniform": [0.05, 0.1]}}},
            {"name": "sgd", "label": "slow", "params": {"lr": {"loguniform": [1e-4, 2e-4]}}},
        ],
        workload={"type": "quadratic", "dim": 8, "cols": 4, "noise": 0.1},
        scale={"workers": 1, "cpus_per_worker": 1, "zero_stage": 0, "micro_batch_size": 4},
        training={"steps": STEPS, "eval_every": EVERY, "checkpoint_every": 0, "schedule": {"warmup_steps": 5}},
        measure={"every": 0},
    )
    spec = specs.make_spec(tmp_path, file="stt.yaml", **slices)
    text = specs.write_spec(tmp_path / "stt.yaml", tmp_path, **slices).read_text()  # kept as spec.yaml
    assert run_study(spec, source_text=text, out=io.StringIO())["ran"] == 2 * (2 + len(SEEDS))
    recs = {r["trial_id"]: r for r in read_trial_records(spec.study_dir)}
    assert all(r["status"] == "completed" for r in recs.values())
    with open_study(spec.study_dir, threads=1) as db:
        last = {r["trial_id"]: r["n"] for r in db.rows("SELECT trial_id, max(step) AS n FROM steps GROUP BY 1")}
        evals: dict[str, list] = {}
        for r in db.rows("SELECT trial_id, step, eval_loss FROM steps WHERE eval_loss IS NOT NULL ORDER BY step"):
            evals.setdefault(r["trial_id"], []).append((r["step"] + 1, r["eval_loss"]))
    assert set(last.values()) == {STEPS - 1}  # every trial trained to the end
    expect = {}
    for label in ("fast", "slow"):
        tune = [r for r in recs.values() if r["label"] == label and r["phase"] == "tune"]
        confirm = sorted(
            (r for r in recs.values() if r["label"] == label and r["phase"] == "confirm"), key=lambda r: r["seed"]
        )
        assert len(tune) == 2 and [r["seed"] for r in confirm] == SEEDS
        best = min(tune, key=lambda r: evals[r["trial_id"]][-1][1])
        assert all(r["hparams"] == best["hparams"] for r in confirm), label
        steps = [next((n for n, v in evals[r["trial_id"]] if n >= 5 and v <= TARGET), float("inf")) for r in confirm]
        final = [evals[r["trial_id"]][-1][1] for r in confirm]
        expect[label] = (steps, final)
    assert all(s < STEPS for s in expect["fast"][0]) and expect["slow"][0] == [float("inf")] * 2

    sql = "SELECT label, reached, steps, final_eval_loss, verdict FROM steps_to_target ORDER BY label"
    rc, out = main(["query", str(spec.study_dir), sql, "--format", "json"]), capsys.readouterr()
    assert rc == 0, out.err
    got = {r["label"]: r for r in map(json.loads, out.out.splitlines())}
    for label, (steps, final) in expect.items():
        r = got[label]
        reached = sum(s < STEPS for s in steps)
        assert r["reached"] == f"{reached}/2", label
        if reached == 2:
            assert r["steps"] == pytest.approx(sum(steps) / 2)
        assert r["final_eval_loss"] == pytest.approx(sum(final) / 2, rel=1e-6)
        p = sps.ttest_1samp(final, TARGET, alternative="less").pvalue
        assert r["verdict"] == ("reaches" if p < 0.01 else "not shown"), (label, p)
    assert got["slow"]["verdict"] == "not shown"
    assert main(["query", str(spec.study_dir), "SELECT * FROM steps_to_target_pairs", "--format", "json"]) == 0
    pairs = {(r["A"], r["B"]): r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    p = sps.ttest_ind(expect["fast"][1], expect["slow"][1], equal_var=False, alternative="less").pvalue
    assert (("fast", "slow") in pairs and pairs[("fast", "slow")]["lower_final_loss"]) == (p < 0.01)
    assert ("slow", "fast") not in pairs
