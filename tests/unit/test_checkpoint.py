"""Checkpoints are complete or absent, and nothing executable is loaded from them: real DeepSpeed,
one process (the multi-rank kill during a save is tests/multirank/test_checkpoint_kill.py).

A planted checkpoint holds a pickle whose unpickling would create a canary file; the trial must
never create it, whether the plant imitates DeepSpeed (`latest` + a pickle) or opt_study (a
commit marker with the right digests)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest

from opt_study.plan import TrialPlan
from opt_study.results.parquet import read_steps
from opt_study.trial import checkpoint
from opt_study.trial.loop import run_trial

PLAN = TrialPlan("t", "adamw", "adamw", {"lr": 0.01}, seed=3, index=0)


class Canary:
    """Unpickling it creates a file: proof that a load ran code from the checkpoint."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _spec(spec_factory, name, stage=2):
    return spec_factory(
        study={"name": name},
        workload={"type": "tiny_lm", "layers": 1, "heads": 2, "width": 32, "context": 16},
        scale={"workers": 1, "zero_stage": stage, "micro_batch_size": 4},
        training={"steps": 6, "eval_every": 2, "checkpoint_every": 2},
        optimizers=[{"name": "adamw", "params": {"lr": 0.01}}],
    )


def _plant(ckpt_dir: Path, canary: Path, marker: bool) -> None:
    tag = ckpt_dir / "step-4"
    tag.mkdir(parents=True)
    (ckpt_dir / "latest").write_text("step-4")
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (tag / name).write_bytes(pickle.dumps({"module": Canary(canary), "next_step": 4}))
    if marker:  # a forged commit marker, digests and all
        files = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in tag.iterdir()}
        (tag / "COMMITTED").write_text(json.dumps({"format": 1, "step": 4, "world": 1, "files": files}))


def test_a_planted_deepspeed_checkpoint_is_ignored_and_never_unpickled(spec_factory, tmp_path):
    spec = _spec(spec_factory, "planted")
    canary = tmp_path / "canary"
    _plant(spec.study_dir / "checkpoints" / "t", canary, marker=False)
    final = run_trial(spec, PLAN, report=lambda m: None)
    assert not canary.exists()
    # no commit marker: not a checkpoint; the trial ran from step 0
    assert final["status"] == "completed"
    assert [r["step"] for r in read_steps(spec.study_dir).to_pylist()] == list(range(6))
    assert checkpoint.complete_steps(spec.study_dir, "t") == [4, 2]
    assert not (spec.study_dir / "checkpoints" / "t" / "latest").exists()  # pruned with the plant


def test_a_forged_commit_marker_gets_a_weights_only_refusal_not_code(spec_factory, tmp_path):
    spec = _spec(spec_factory, "forged")
    canary = tmp_path / "canary"
    _plant(spec.study_dir / "checkpoints" / "t", canary, marker=True)
    with pytest.raises(RuntimeError, match="weights-only load refuses"):
        run_trial(spec, PLAN, report=lambda m: None)
    assert not canary.exists()


@pytest.mark.parametrize("stage", [0, 3])
def test_a_torn_newest_checkpoint_is_skipped_for_the_previous_complete_one(spec_factory, stage):
    spec = _spec(spec_factory, f"torn{stage}", stage)
    reports = []

    def dying(m):  # dies at the third report: checkpoints step-2 and step-4 are committed
        reports.append(m)
        if len(reports) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_trial(spec, PLAN, report=dying)
    d = spec.study_dir / "checkpoints" / "t"
    assert checkpoint.complete_steps(spec.study_dir, "t") == [4, 2]
    # the newest one's partition file cut short, as by a rank dying while writing it
    part = max((f for f in (d / "step-4").iterdir() if f.name.endswith(".pt")), key=os.path.getsize)
    part.write_bytes(part.read_bytes()[: os.path.getsize(part) // 2])
    assert "differs from its recorded sha256" in checkpoint.verify(d / "step-4", 0, 1)
    with pytest.warns(UserWarning, match="step-4 skipped"):
        final = run_trial(spec, PLAN, report=lambda m: None)
    assert final["status"] == "completed"
    rows = read_steps(spec.study_dir).to_pylist()
    assert [r["step"] for r in rows] == list(range(6))  # every step exactly once
    assert [r["attempt"] for r in rows] == [0, 0, 1, 1, 1, 1]  # resumed at step 2, not 4
