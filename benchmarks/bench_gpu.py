"""GPT-2 in bf16 with measurement on one device: correctness against the reference, tokens/s, MFU,
and the steps/s ratio measuring every 10 steps against measurement off (issue 7, item 5).

Run: `python benchmarks/bench_gpu.py OUT.json [--size small|tiny] [--device cuda|cpu]
[--mode check|bench|all] ...` (one process, one rank; `tests/multirank/test_gpu.py` runs it with GPT-2
small on a GPU and with a tiny GPT-2 on the CPU, through the same functions).

- `check`: one trial (`opt_study.trial.run_trial`, bf16, ZeRO-2, measure every 10, so the losses
  of measured steps are re-evaluated in fp32) whose measurer also gathers the full fp32 tensors
  and checks every raw sum, derived metric and the fp32 losses against the float64 reference at
  every step (tests/dist/streaming.py's StreamingChecker, teacher forced as docs/METRICS.md
  §Correctness contract says). It records tokens/s and MFU too, but the gathering slows it: `bench`
  is the speed measurement.
- `bench`: the same trial with `measure: {every: 0, norms: false}` ("off") and `{every: 10}`,
  interleaved over repeats; steps/s over the steps after a warm-up, their ratio, tokens/s, MFU.

MFU (model FLOPs utilization), the formula: training FLOPs per step = 6 · N · T, N the model's
parameters (the tied embedding/head counted once; GPT-2 small: 124,439,808) and T the tokens of
one optimizer step (micro_batch · block_size · grad_accum · ranks); the 6 is 2 FLOPs per
multiply-add times (1 forward + 2 backward) (Kaplan et al. 2020, https://arxiv.org/abs/2001.08361,
section 2.1). MFU = 6 · N · T · (steps / s) / peak, peak = the device's dense bf16 peak
(BF16_PEAKS: H100 SXM/H200 989, H100 NVL 835, H100 PCIe 756, A100 312 TFLOP/s, NVIDIA's datasheets,
without sparsity; `--peak-tflops` for any other device). Only the training step's FLOPs
are counted, never the probe's (one more forward + backward) or the fp32 loss re-evaluations
(two fp32 forwards): a measuring run's time includes them, its counted FLOPs do not, so its MFU
is the useful-work MFU. Also reported: the PaLM count 6N' + 12·L·d·T per token
(opt_study.workloads.gpt2.flops_per_token), which adds attention's FLOPs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Dense bf16 peaks (no sparsity), FLOP/s, from NVIDIA's datasheets: H100 SXM5 and H200 989.4 T
# (same Hopper compute), H100 NVL 835 T, H100 PCIe 756 T, A100 (SXM4 and PCIe) 312 T, L40S 362 T.
# Matched against torch.cuda.get_device_name() in order: the first substring that occurs wins
# ("H100 PCIe" and "H100 NVL" before the plain "H100", which is the SXM part: "NVIDIA H100 80GB HBM3").
BF16_PEAKS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)
SIZES = {
    "small": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "vocab_size": 50257},
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 256},
}
MEASURE = {"off": {"every": 0, "norms": False}, "every10": {"every": 10}}


def make_token_files(out_dir: Path, block_size: int) -> Path:
    """nanoGPT-format byte-token files from the repository's corpus, long enough for windows of
    block_size + 1 tokens in both splits (the GPU machine has no network for a real dataset)."""
    from opt_study.workloads.prepare import prepare_token_files

    text = (REPO / "opt_study" / "workloads" / "data" / "corpus.txt").read_text()
    copies = max(1, -(-40 * (block_size + 1) // len(text)))
    prepare_token_files([text] * copies, out_dir, "bytes", val_fraction=0.05)
    return out_dir


def gpt2_doc(
    name: str,
    storage: str,
    data_dir: Path,
    size: str,
    device: str,
    steps: int,
    measure: dict,
    micro_batch: int,
    stage: int = 2,
) -> dict:
    """One trial of GPT-2 `size` in bf16 on one rank (a GPU when device is cuda)."""
    return {
        "study": {"name": name, "storage": storage},
        "workload": {"type": "gpt2", **SIZES[size], "dropout": 0.0, "data_dir": str(data_dir), "eval_windows": 8},
        "scale": {
            "workers": 1,
            "gpus_per_worker": 1 if device == "cuda" else 0,
            "zero_stage": stage,
            "precision": "bf16",
            "micro_batch_size": micro_batch,
            "launcher": "in_process",
            "torch_threads": 1 if device == "cpu" else 4,
        },
        "training": {
            "steps": steps,
            "eval_every": steps,
            "grad_clip": 1.0,
            "schedule": {"type": "cosine", "warmup_steps": 2, "min_ratio": 0.1},
        },
        "optimizers": [{"name": "adamw", "params": {"lr": 6e-4, "beta1": 0.9, "beta2": 0.95, "weight_decay": 0.1}}],
        "measure": measure,
    }


def flops(spec) -> dict:
    """Training FLOPs of one optimizer step: the 6·N·T of the module docstring, and PaLM's."""
    from opt_study.workloads.gpt2 import flops_per_token, n_params

    cfg, scale = spec.workload.params, spec.scale
    tokens = scale.micro_batch_size * cfg.block_size * scale.grad_accum * scale.workers
    return {
        "n_params": n_params(cfg),
        "tokens_per_step": tokens,
        "flops_per_step": 6.0 * n_params(cfg) * tokens,
        "flops_per_step_palm": flops_per_token(cfg) * tokens,
    }


def peak_for_name(name: str) -> float | None:
    """The dense bf16 peak of the GPU called `name` (torch's device name); None if not known."""
    return next((peak for key, peak in BF16_PEAKS if key in name), None)


def peak_flops(device: str, given_tflops: float | None) -> float | None:
    """The device's dense bf16 peak: `--peak-tflops` when given, else the table's entry for the
    device; None (no MFU, said on stderr) for a GPU the table does not know."""
    if given_tflops:
        return given_tflops * 1e12
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        peak = peak_for_name(name)
        if peak is None:
            print(f"bench_gpu: no bf16 peak known for {name!r}; pass --peak-tflops for MFU", file=sys.stderr)
        return peak
    return None


def run_one(doc: dict, trial_id: str, warmup: int, peak: float | None, measurer_cls=None) -> dict:
    """Train one trial through run_trial; steps/s over steps warmup..N-1 from the rows' end times
    (every step counts, measured ones included), tokens/s and MFU."""
    from opt_study.measure.hook import StepMeasurer
    from opt_study.plan import TrialPlan
    from opt_study.results.parquet import read_steps
    from opt_study.trial.loop import run_trial
    from opt_study.validate import parse_study

    spec = parse_study(doc)
    opt = doc["optimizers"][0]
    plan = TrialPlan(
        trial_id=trial_id, label=opt["name"], optimizer=opt["name"], hparams=dict(opt["params"]), seed=0, index=0
    )
    t0 = time.time()
    run_trial(spec, plan, report=lambda m: None, measurer_cls=measurer_cls or StepMeasurer)
    wall = time.time() - t0
    t = read_steps(spec.study_dir, trial_ids=[trial_id])
    ends, measured = t.column("time_unix").to_pylist(), t.column("measured").to_pylist()
    steps_per_s = (len(ends) - warmup) / (ends[-1] - ends[warmup - 1])
    f = flops(spec)
    out = {
        "trial": trial_id,
        "wall_s": wall,
        "steps": len(ends),
        "warmup": warmup,
        "measured_in_window": sum(measured[warmup:]),
        "steps_per_s": steps_per_s,
        "tokens_per_s": steps_per_s * f["tokens_per_step"],
        **f,
        "loss_first": t.column("loss")[0].as_py(),
        "loss_last": t.column("loss")[-1].as_py(),
    }
    out["mfu"] = steps_per_s * f["flops_per_step"] / peak if peak else None
    out["mfu_palm"] = steps_per_s * f["flops_per_step_palm"] / peak if peak else None
    return out


def check(args, storage: str, data_dir: Path, peak: float | None) -> dict:
    """The `check` mode of the module docstring: errors (maxima over steps, relative to the
    scale-aware scales of tests/dist/harness.py) and the speed of the checked run."""
    sys.path.insert(0, str(REPO / "tests" / "dist"))
    from opt_study.validate import parse_study

    import harness
    from streaming import StreamingChecker

    doc = gpt2_doc(
        "gpu_check", storage, data_dir, args.size, args.device, args.check_steps, {"every": 10}, args.micro_batch
    )
    spec = parse_study(doc)
    StreamingChecker.case = {"workload": "gpt2", "stage": spec.scale.zero_stage}
    StreamingChecker.spec = spec
    harness.RecordingMeasurer.reference_fn = harness.reference_losses_fn(spec)
    harness.RecordingMeasurer.grads_fn = harness.reference_grads_fn(spec)  # bf16: g, g⁺ are fp32 (fp32_grads)
    speed = run_one(doc, "check", args.warmup, peak, StreamingChecker)
    m = harness.RecordingMeasurer.last
    rows = [r["row"] for r in m.log]
    return {
        "errors": m.errors,
        "speed": speed,
        "measured_steps": [i for i, r in enumerate(rows) if r.get("measured")],
        "loss_precision": sorted({r.get("loss_precision") for r in rows if r.get("measured")}),
        "train_loss_gap": max(
            abs(r["row"]["loss"] - r["train_loss"]) / abs(r["train_loss"]) for r in m.log if r["row"].get("measured")
        ),
        "classes": [(r.get("cls_convexity_fwd"), r.get("cls_convexity_bwd")) for r in rows if r.get("measured")],
    }


def bench(args, storage: str, data_dir: Path, peak: float | None) -> dict:
    """The `bench` mode: off and every10 interleaved (order rotated per repeat), medians."""
    runs = []
    names = list(MEASURE)
    for rep in range(args.repeats):
        for v in names[rep % 2 :] + names[: rep % 2]:
            doc = gpt2_doc(
                f"gpu_bench_{rep}_{v}",
                storage,
                data_dir,
                args.size,
                args.device,
                args.steps,
                MEASURE[v],
                args.micro_batch,
            )
            runs.append({"rep": rep, "variant": v, **run_one(doc, f"b{rep}{v}", args.warmup, peak)})
            print(json.dumps(runs[-1]), flush=True)
    by = {(r["rep"], r["variant"]): r for r in runs}
    ratios = [by[(k, "every10")]["steps_per_s"] / by[(k, "off")]["steps_per_s"] for k in range(args.repeats)]
    med = lambda v, key: statistics.median(r[key] for r in runs if r["variant"] == v)  # noqa: E731
    out = {"runs": runs, "ratio_every10_over_off": statistics.median(ratios), "ratios": ratios}
    for v in names:
        out[v] = {k: med(v, k) for k in ("steps_per_s", "tokens_per_s")}
        out[v]["mfu"] = med(v, "mfu") if peak else None
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--mode", choices=("check", "bench", "all"), default="all")
    p.add_argument("--micro-batch", type=int, default=12)
    p.add_argument("--check-steps", type=int, default=20)
    p.add_argument("--steps", type=int, default=60, help="steps of each bench run")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of steps/s")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="dense bf16 peak of the device (default: 989 on an H100, else no MFU)",
    )
    args = p.parse_args(argv)
    peak = peak_flops(args.device, args.peak_tflops)
    result = {"args": vars(args), "peak_flops": peak}
    with tempfile.TemporaryDirectory(prefix="optstudy-gpu-") as tmp:
        data_dir = make_token_files(Path(tmp) / "tokens", SIZES[args.size]["block_size"])
        if args.mode in ("check", "all"):
            result["check"] = check(args, str(Path(tmp) / "check"), data_dir, peak)
        if args.mode in ("bench", "all"):
            result["bench"] = bench(args, str(Path(tmp) / "bench"), data_dir, peak)
    if args.device == "cuda":
        import torch

        result["device_name"] = torch.cuda.get_device_name()
    Path(args.out).write_text(json.dumps(result, indent=1, default=float))
    return result


if __name__ == "__main__":
    main()
