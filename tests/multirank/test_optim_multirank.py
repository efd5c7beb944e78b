"""Every registered optimizer under real DeepSpeed on 2 CPU ranks (gloo), at every (ZeRO stage,
precision) it declares that a CPU runs (fp32 and bf16; fp16 needs a GPU), through the real
`run_trial`; plus the declaration checks (LAMB at ZeRO-0 equals the single-process optimizer;
NovoGrad inside a ZeRO-2 engine is caught at run time; Schedule-Free's reported eval loss is the
loss at x; PSGD-Kron's random probes leave the ranks' replicas equal; every whole-tensor rule at
ZeRO 1-3 follows its ZeRO-0 trajectory). One torchrun job:
tests/dist/zoo_harness.py (190 cases and 6 checks; 3m24 s at load 16-33 with the whole-tensor
checks at every combination of all four rules; 1m44 s on a quiet machine before those checks).
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

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
PLUGIN_PATH = ROOT / "examples" / "custom_workload"  # byo_example: an optimizer by import path
PLUGINS = ("byo_example.opt:signum",)  # as tests/dist/zoo_harness.py


def entries() -> dict:
    """The registry's optimizers and the plugins the harness sweeps too."""
    if str(PLUGIN_PATH) not in sys.path:
        sys.path.append(str(PLUGIN_PATH))
    return {**optim.OPTIMIZERS, **{n: optim.optimizer_entry(n) for n in PLUGINS}}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict:
    from opt_study.distributed import free_port

    out = tmp_path_factory.mktemp("zoo") / "out.json"
    path = os.pathsep.join([str(ROOT), str(PLUGIN_PATH)])
    env = {**os.environ, "PYTHONPATH": path, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(WORLD),
        "--master_port",
        str(free_port()),
        str(ROOT / "tests" / "dist" / "zoo_harness.py"),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def declared() -> set[tuple[str, int, str]]:
    return {(n, s, p) for n, e in entries().items() for s, p in e.combos if p in optim.CPU_PRECISIONS}


@pytest.mark.slow
def test_every_optimizer_at_every_declared_combination(zoo):
    """Every declared (stage, precision) a CPU runs, each once: 3 steps that stay finite and
    lower the training loss (the defaults of every entry do within 3 steps on `quadratic`)."""
    assert zoo["world"] == WORLD
    ran = [(r["opt"], r["stage"], r["prec"]) for r in zoo["results"]]
    assert len(ran) == len(set(ran)) and set(ran) == declared()
    assert {p for _, _, p in ran} == {"fp32", "bf16"}
    for r in zoo["results"]:
        case = f"{r['opt']} at ZeRO-{r['stage']} {r['prec']}"
        assert "error" not in r, f"{case}: {r.get('tb')}"
        losses = r["losses"] + [r["eval_loss"]]
        assert r["status"] == "completed" and len(r["losses"]) == 3, case
        assert all(math.isfinite(v) for v in losses), f"{case}: {losses}"
        assert r["losses"][-1] < r["losses"][0], f"{case} did not lower the loss: {losses}"
        assert max(losses) <= 1.05 * losses[0], f"{case} exploded: {losses}"


@pytest.mark.slow
def test_elementwise_rules_are_stage_invariant(zoo):
    """An element-wise rule computes the same numbers on any cut of the parameters: within one
    precision every stage gives the lowest stage's losses (fp32: ZeRO-0; bf16: ZeRO-1, as no
    engine runs bf16 at ZeRO-0). (Lookahead runs with k = 2 here so that its sync, which upstream
    pytorch-optimizer cannot do on ZeRO's flat partitions, happens inside the 3 steps.)"""
    by = {(r["opt"], r["stage"], r["prec"]): r for r in zoo["results"]}
    checked = 0
    for name, e in entries().items():
        if not e.elementwise:
            continue  # whole-tensor rules: test_whole_tensor_rules_follow_their_zero0_trajectory
        for prec in optim.CPU_PRECISIONS:
            stages = sorted(s for s, p in e.combos if p == prec)
            for s in stages[1:]:
                a, b = by[(name, stages[0], prec)], by[(name, s, prec)]
                for x, y in zip(a["losses"] + [a["eval_loss"]], b["losses"] + [b["eval_loss"]]):
                    assert abs(x - y) <= 1e-5 * abs(x), (
                        f"{name} {prec}: ZeRO-{s} {b['losses']} vs ZeRO-{stages[0]} {a['losses']}"
                    )
                checked += 1
    assert checked == (3 + 2) * sum(1 for e in entries().values() if e.elementwise)


@pytest.mark.slow
def test_bf16_runs_in_bf16_and_tracks_fp32(zoo):
    """bf16 really ran (the forward sees bf16-rounded weights, so even the first loss differs
    from fp32's) and follows the same trajectory as fp32 (fp32 master weights and gradient
    accumulation: opt_study.trial.engine), to within bf16's rounding (2**-8 relative per weight)."""
    by = {(r["opt"], r["stage"], r["prec"]): r for r in zoo["results"]}
    pairs = [(k, by[(k[0], k[1], "fp32")]) for k in by if k[2] == "bf16"]
    assert len(pairs) == sum(1 for e in entries().values() for _, p in e.combos if p == "bf16")
    for (name, stage, _), fp32 in pairs:
        bf16 = by[(name, stage, "bf16")]
        assert bf16["losses"][0] != fp32["losses"][0], f"{name} ZeRO-{stage}: bf16 loss is fp32's"
        for x, y in zip(fp32["losses"] + [fp32["eval_loss"]], bf16["losses"] + [bf16["eval_loss"]]):
            assert abs(x - y) <= 0.02 * abs(x), f"{name} ZeRO-{stage}: bf16 {bf16['losses']} vs fp32 {fp32['losses']}"


@pytest.mark.slow
def test_layerwise_lamb_at_zero0_matches_single_process(zoo):
    r = zoo["lamb_equivalence"]
    assert r["moved"] > 1e-3  # five LAMB steps really moved the weights
    assert r["max_abs_diff"] <= 1e-6 * max(1.0, r["max_abs"]), r


@pytest.mark.slow
def test_a_zero0_only_rule_in_a_zero2_engine_is_caught_at_run_time(zoo):
    assert "novograd: " in zoo["shape_rule_zero2_guard"]
    assert "not a model parameter" in zoo["shape_rule_zero2_guard"]
    assert "zero_stage 0 with precision fp32" in zoo["shape_rule_zero2_guard"]


@pytest.mark.slow
def test_schedulefree_eval_loss_is_the_loss_at_x(zoo):
    r = zoo["schedulefree_eval_at_x"]
    assert abs(r["reported"] - r["at_x"]) <= 1e-6 * abs(r["at_x"]), r
    assert abs(r["at_y"] - r["at_x"]) > 100 * 1e-6 * abs(r["at_x"]), r  # y would have been caught


@pytest.mark.slow
def test_psgd_kron_replicas_agree_across_ranks(zoo):
    """ZeRO-0: every rank steps its own copy, and the loop seeds torch's generator per rank;
    Kron's probes are drawn per step from the same seed on every rank (factories.SameDrawsKron)."""
    r = zoo["kron_ranks_agree"]
    assert r["ranks"] == WORLD and r["moved"] > 1e-4, r
    assert r["max_abs_diff"] == 0.0, r


# Whole-tensor rules (optim.whole_tensor) at ZeRO 1-3 against the same rule at ZeRO-0, 10 steps.
# Where the engine hands the owner the same reduced gradient as ZeRO-0 (accumulation 1 at every
# stage; ZeRO-1 at any accumulation, which reduces once per step like ZeRO-0), the route moves
# values without arithmetic, so the weights are bit for bit ZeRO-0's. ZeRO 2-3 with accumulation
# reduce every micro-batch's gradient, so the reduced gradient differs from ZeRO-0's by fp32
# rounding (an element-wise rule's weights by about 1e-8 here), and Muon's Newton-Schulz runs in
# bf16 (pytorch-optimizer, as Jordan et al.), where such a difference can flip a rounding: the
# update, entries of order 1, then differs by bf16 ulps (2**-8). The bound: four of those per step
# at the rule's lr, WT_ULPS * lr * steps (measured: 2.9e-3 <= 6.3e-3 for Muon at lr 0.02).
WT_ULPS = 2.0**-6
WT_STEPS = 10


@pytest.mark.slow
def test_whole_tensor_rules_follow_their_zero0_trajectory(zoo):
    rows = zoo["whole_tensor"]
    names = {n for n, e in entries().items() if e.whole_tensor}
    assert "muon" in names and {r["opt"] for r in rows} == names
    # every rule: every sharded CPU combination it declares, fp32 at accumulation 1 and 2, bf16 at 1
    matrix = {n: {tuple(c) for c in m} for n, m in zoo["whole_tensor_matrix"].items()}
    assert set(matrix) == names
    ran = {(r["opt"], r["stage"], r["prec"], r["gas"]) for r in rows}
    assert ran == {(n, *c) for n, m in matrix.items() for c in m}
    assert all((s, p) in optim.optimizer_entry(n).combos for n, m in matrix.items() for s, p, _ in m)
    sharded = [(s, p) for s, p in optim.WHOLE_TENSOR if s > 0 and p in optim.CPU_PRECISIONS]
    for n in names:
        assert matrix[n] == {(s, p, g) for s, p in sharded for g in (1, 2) if (p, g) != ("bf16", 2)}, n
    for r in rows:
        case = f"{r['opt']} ZeRO-{r['stage']} {r['prec']} accumulation {r['gas']}"
        assert r["moved"] > 2 * r["lr"], case  # the reference really trained
        assert len(r["losses"]) == WT_STEPS and all(math.isfinite(v) for v in r["losses"]), case
        if r["prec"] == "bf16":
            # bf16 forwards: the same rule on every stage (bit for bit: the fp32 masters and
            # gradients travel, not the bf16 weights), within bf16's rounding of fp32's losses
            assert r["max_abs_diff_vs_stage"] == 0.0, f"{case} vs ZeRO-{r['vs_stage']}: {r['max_abs_diff_vs_stage']}"
            for x, y in zip(r["ref_losses"], r["losses"]):
                assert abs(x - y) <= 0.02 * abs(x), f"{case}: {r['losses']} vs {r['ref_losses']}"
        elif r["gas"] == 1 or r["stage"] == 1:
            assert r["max_abs_diff"] == 0.0, f"{case}: {r['max_abs_diff']}"
            assert r["losses"] == r["ref_losses"], case
        else:
            assert r["max_abs_diff"] <= WT_ULPS * r["lr"] * WT_STEPS, f"{case}: {r['max_abs_diff']}"
            for x, y in zip(r["ref_losses"], r["losses"]):
                assert abs(x - y) <= 1e-4 * abs(x), f"{case}: {r['losses']} vs {r['ref_losses']}"


@pytest.mark.slow
def test_whole_tensor_rule_resumes_from_its_checkpoint(zoo):
    """The owners' rule state (Muon's momentum) is in DeepSpeed's checkpoint: a trial restarted
    from step 3 of 6 at ZeRO 2 and 3 runs the last 3 steps and ends on the weights of the run
    that never stopped, bit for bit (a lost momentum would change every later update)."""
    runs = zoo["whole_tensor_resume"]
    assert [r["stage"] for r in runs] == [2, 3]
    for r in runs:
        assert r["steps_rerun"] == 3 and r["max_abs_diff"] == 0.0, r
