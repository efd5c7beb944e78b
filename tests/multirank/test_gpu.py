"""GPT-2 in bf16 with measurement (fp32 loss re-evaluation on measured steps), checked against the
float64 reference at every step, with tokens/s and MFU recorded: benchmarks/bench_gpu.py.

`test_gpt2_small_bf16_on_gpu` (marker `gpu`, skipped without CUDA) runs GPT-2 small (124M) on
one GPU: numerics and speed on one device, not multi-rank sharding (NCCL runs one rank per GPU;
the sharded paths are tests/multirank/test_multirank.py's). `test_gpt2_tiny_bf16_on_cpu` runs the very same
script and functions with a tiny GPT-2 on the CPU, so no line of the GPU path is untried here.
Speed is recorded (`record_property`, printed), never asserted: targets live in benchmarks/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-6  # docs/METRICS.md's scale-aware tolerance, as in tests/multirank/test_multirank.py
# What the checker must have compared at least once (a missing key would be a silent skip).
MUST = {
    "grad_norm",
    "update_norm",
    "param_norm",
    "sq_grad",
    "sq_grad_probe",
    "sq_update",
    "sq_param",
    "sq_dist_init",
    "ip_grad_update",
    "ip_probe_update",
    "sq_grad_diff",
    "ip_update_prev",
    "ip_grad_prev",
    "loss_vs_fp32_ref",
    "loss_probe_vs_fp32_ref",
    "loss_precision_mismatch",
    "convexity_gap_fwd",
    "convexity_gap_bwd",
    "smoothness_local",
    "smoothness_descent",
    "cls_convexity_fwd_mismatch",
    "cls_convexity_bwd_mismatch",
    "probe_state_diffs",
    "grad_fp32_vs_fp64",  # measure.fp32_grads (on under bf16 by default): g, g⁺ against float64 autograd
}


def run_bench(tmp_path: Path, *args: str, timeout: int) -> dict:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), str(out), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def check_result(r: dict, record) -> None:
    c = r["check"]
    assert MUST <= set(c["errors"]), sorted(MUST - set(c["errors"]))
    for k, e in c["errors"].items():
        assert e <= TOL, f"{k}: error {e:.2e} > {TOL:.0e}"
    assert c["measured_steps"] == [9, 19]  # every 10 steps, the last step included
    assert c["loss_precision"] == ["fp32"]
    # the stored losses are fp32 re-evaluations, not the bf16 forward's own (~1e-4..1e-2 apart)
    assert c["train_loss_gap"] > 1e-6
    s = c["speed"]
    assert s["flops_per_step"] == 6 * s["n_params"] * s["tokens_per_step"]
    if r["peak_flops"] is None:  # a GPU the peak table does not know, and no --peak-tflops
        assert s["mfu"] is None
    else:
        assert s["mfu"] == pytest.approx(s["steps_per_s"] * s["flops_per_step"] / r["peak_flops"])
    b, steps, warmup = r["bench"], r["args"]["steps"], r["args"]["warmup"]
    probed = sum(1 for t in range(warmup, steps) if (t + 1) % 10 == 0 or t + 1 == steps)
    assert [run["measured_in_window"] for run in b["runs"]] == [
        0 if run["variant"] == "off" else probed for run in b["runs"]
    ]
    assert b["off"]["tokens_per_s"] > 0 and b["every10"]["tokens_per_s"] > 0
    for key, value in (
        ("tokens_per_s_off", b["off"]["tokens_per_s"]),
        ("tokens_per_s_every10", b["every10"]["tokens_per_s"]),
        ("mfu_off", b["off"]["mfu"]),
        ("mfu_every10_probe_excluded", b["every10"]["mfu"]),
        ("steps_per_s_ratio_every10_over_off", b["ratio_every10_over_off"]),
    ):
        record(key, value)
        print(f"{key}: {value}")


@pytest.mark.slow
def test_gpt2_tiny_bf16_on_cpu(tmp_path, record_property):
    """The GPU test's code path on the CPU: a 2-layer GPT-2, bf16 under DeepSpeed ZeRO-2, measured
    every 10 steps, every number against the reference; then the off / every-10 speed runs.
    The peak is nominal (0.1 TFLOP/s) so the MFU arithmetic runs too."""
    r = run_bench(
        tmp_path,
        "--size",
        "tiny",
        "--device",
        "cpu",
        "--micro-batch",
        "4",
        "--check-steps",
        "20",
        "--steps",
        "20",
        "--warmup",
        "5",
        "--repeats",
        "1",
        "--peak-tflops",
        "0.1",
        timeout=600,
    )
    check_result(r, record_property)
    # the tiny model, tied head counted once: embeddings, 2 blocks of 12d² + 13d, final LayerNorm
    assert r["check"]["speed"]["n_params"] == 256 * 32 + 32 * 32 + 2 * 12_704 + 2 * 32


@pytest.mark.gpu
@pytest.mark.slow
def test_gpt2_small_bf16_on_gpu(tmp_path, record_property):
    """GPT-2 small (124M) on one GPU: 20 checked steps, then 2 x 60-step speed runs per variant."""
    r = run_bench(tmp_path, "--size", "small", "--device", "cuda", timeout=1800)
    check_result(r, record_property)
    assert r["check"]["speed"]["n_params"] == 124_439_808
    record_property("device", r.get("device_name"))
