"""Every registered optimizer under real DeepSpeed on 2 CPU ranks (gloo), at every ZeRO stage it
declares with fp32, through the real `run_trial`; plus the declaration checks (LAMB at ZeRO-0
equals the single-process optimizer; LAMB inside a ZeRO-2 engine is caught at run time;
Schedule-Free's reported eval loss is the loss at x). One torchrun job: tests/dist/zoo_harness.py.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opt_study import optim

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict:
    from opt_study.distributed import free_port

    out = tmp_path_factory.mktemp("zoo") / "out.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
           "--master_port", str(free_port()), str(ROOT / "tests" / "dist" / "zoo_harness.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def declared() -> list[tuple[str, int]]:
    return [(n, s) for n, e in optim.OPTIMIZERS.items() for s in sorted(e.zero_stages) if (s, "fp32") in e.combos]


@pytest.mark.slow
def test_every_optimizer_at_every_declared_stage(zoo):
    assert zoo["world"] == WORLD
    assert [(r["opt"], r["stage"]) for r in zoo["results"]] == declared()
    for r in zoo["results"]:
        case = f"{r['opt']} at ZeRO-{r['stage']}"
        assert "error" not in r, f"{case}: {r.get('tb')}"
        losses = r["losses"] + [r["eval_loss"]]
        assert r["status"] == "completed" and len(r["losses"]) == 3, case
        assert all(math.isfinite(v) for v in losses), f"{case}: {losses}"
        assert max(losses) <= 1.05 * losses[0], f"{case} exploded: {losses}"


@pytest.mark.slow
def test_elementwise_rules_are_stage_invariant(zoo):
    """An element-wise rule computes the same numbers on any cut of the parameters: every stage
    gives stage 0's losses. (Lookahead runs with k = 2 here so that its sync, which upstream
    pytorch-optimizer cannot do on ZeRO's flat partitions, happens inside the 3 steps.)"""
    by = {(r["opt"], r["stage"]): r for r in zoo["results"]}
    checked = 0
    for name, e in optim.OPTIMIZERS.items():
        for s in sorted(e.zero_stages - {0}):
            a, b = by[(name, 0)], by[(name, s)]
            for x, y in zip(a["losses"] + [a["eval_loss"]], b["losses"] + [b["eval_loss"]]):
                assert abs(x - y) <= 1e-5 * abs(x), f"{name}: ZeRO-{s} {b['losses']} vs ZeRO-0 {a['losses']}"
            checked += 1
    assert checked == 3 * sum(1 for e in optim.OPTIMIZERS.values() if e.elementwise)


@pytest.mark.slow
def test_layerwise_lamb_at_zero0_matches_single_process(zoo):
    r = zoo["lamb_equivalence"]
    assert r["moved"] > 1e-3  # five LAMB steps really moved the weights
    assert r["max_abs_diff"] <= 1e-6 * max(1.0, r["max_abs"]), r


@pytest.mark.slow
def test_lamb_in_a_zero2_engine_is_caught_at_run_time(zoo):
    assert "not a model parameter" in zoo["lamb_zero2_guard"]
    assert "zero_stage 0 with precision fp32" in zoo["lamb_zero2_guard"]


@pytest.mark.slow
def test_schedulefree_eval_loss_is_the_loss_at_x(zoo):
    r = zoo["schedulefree_eval_at_x"]
    assert abs(r["reported"] - r["at_x"]) <= 1e-6 * abs(r["at_x"]), r
    assert abs(r["at_y"] - r["at_x"]) > 100 * 1e-6 * abs(r["at_x"]), r  # y would have been caught
