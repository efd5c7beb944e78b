"""Real DeepSpeed on CPU (gloo) at world sizes 1, 2 and 4, ZeRO 0-3: every sharded number equals
the teacher-forced float64 reference at every step (METRICS.md's correctness contract).

One torchrun job per world size loops over its cases (tests/dist/harness.py), so the whole
matrix costs three process-group start-ups. Tolerances are METRICS.md's scale-aware ones: the
harness already divides each error by its scale (‖a‖‖b‖ for an inner product, the sum itself for
a sum of squares, |ℓ| + ‖g‖‖Δ‖ for anything derived from δ), so 1e-6 applies to every column.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-6
# A float64 single-process gradient vs DeepSpeed's fp32 reduced one: fp32 rounding of the
# forward/backward (about 1e-7 relative per op) over a few hundred-op graph.
TOL_FP64 = 1e-5

STAGES = (0, 1, 2, 3)
CASES = {
    1: [{"stage": s, "workload": "mlp_classify", "gas": 2} for s in STAGES],
    2: [{"stage": s, "workload": w, "gas": g} for s in STAGES for w in ("tiny_lm", "mlp_classify") for g in (1, 2)]
    + [{"stage": 2, "workload": "mlp_classify", "gas": 1, "clip": 0.05, "opt": "momentum"}]
    # the same trial measured at every step and never measured: must end bit-for-bit equal
    + [{"stage": s, "workload": "tiny_lm", "gas": 2, "every": e, "keep_final": True, "pair": f"p{s}"}
       for s in STAGES for e in (1, 0)],
    4: [{"stage": s, "workload": "tiny_lm", "gas": 1} for s in STAGES]
    + [{"stage": 3, "workload": "mlp_classify", "gas": 2}],
}


def torchrun(world: int, cases: list[dict], out: Path, timeout: int = 900) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
           "--master_port", str(_port()), str(ROOT / "tests" / "dist" / "harness.py"), str(out), json.dumps(cases)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _port() -> int:
    from opt_study.distributed import free_port

    return free_port()


@pytest.fixture(scope="module", params=sorted(CASES), ids=lambda w: f"world{w}")
def world_results(request, tmp_path_factory):
    world = request.param
    return world, torchrun(world, CASES[world], tmp_path_factory.mktemp(f"w{world}") / "out.json")


@pytest.mark.slow
def test_every_number_matches_reference(world_results):
    world, data = world_results
    assert data["world"] == world
    assert len(data["results"]) == len(CASES[world])
    for r in data["results"]:
        assert "error" not in r, f"{r['case']}: {r.get('tb', r.get('error'))}"
        assert r["steps"] == 5, r["case"]
        assert r["measured"] == (0 if r["case"].get("every") == 0 else 5), r["case"]
        assert r["probe_state_diff"] == [], f"{r['case']}: the probe changed {r['probe_state_diff']}"
        # memory: what the measurer keeps is a small constant times this rank's own partition,
        # and that partition is this rank's share of the model, not the whole of it
        assert r["kept_ratio"] <= 5.0, r["case"]
        assert r["local_fraction"] <= 1.0 / world + 0.05, r["case"]
        if r["case"].get("every") == 0:
            continue
        errs = r["errors"]
        # the columns each case must have checked (a missing key would be a silent skip)
        must = {"grad_norm", "update_norm", "param_norm", "sq_grad", "sq_grad_probe", "sq_update",
                "ip_grad_update", "ip_probe_update", "sq_grad_diff", "ip_update_prev", "ip_grad_prev",
                "convexity_gap_fwd", "convexity_gap_bwd", "smoothness_local", "smoothness_descent",
                "cls_convexity_fwd_mismatch", "cls_convexity_bwd_mismatch"}
        assert must <= set(errs), f"{r['case']}: unchecked {sorted(must - set(errs))}"
        if r["case"]["workload"] == "mlp_classify":  # dropout-free: independent float64 oracle
            assert {"loss_vs_fp64", "grad_vs_fp64", "sq_grad_small_vs_fp64"} <= set(errs), r["case"]
        if r["case"]["stage"] > 0 and not r["case"].get("clip"):
            assert "engine_grad_norm" in errs  # DeepSpeed reports its own norm at ZeRO 1-3
        for k, e in errs.items():
            limit = TOL_FP64 if k.endswith("_vs_fp64") else TOL
            assert e <= limit, f"world {world} {r['case']}: {k} error {e:.2e} > {limit:.0e}"


@pytest.mark.slow
def test_probe_leaves_trajectory_bit_for_bit_unchanged(world_results):
    """A run measuring every step (probe + sums) ends with exactly the parameters and losses of a
    run that never measures: the probe restores optimizer state, gradient buffers, accumulation
    boundary and counters, RNG (dropout masks replayed) and module buffers."""
    world, data = world_results
    pairs: dict[str, dict] = {}
    for r in data["results"]:
        if "pair" in r["case"]:
            pairs.setdefault(r["case"]["pair"], {})[r["case"]["every"]] = r
    if world != 2:
        assert not pairs
        return
    assert len(pairs) == len(STAGES)
    for name, p in pairs.items():
        on, off = p[1], p[0]
        assert on["losses"] == off["losses"], name
        assert on["final_x"] == off["final_x"], name
