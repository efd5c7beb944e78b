"""Issue 13: the convexity classes of mlp_classify studies under the first noise floor (u·|ℓ|) and
the current one (u·M, docs/METRICS.md §Noise floor), on the very same rows, per optimizer and
precision, with the authors' statistics beside ours.

Run as `python benchmarks/bench_floor_classes.py [OUT.json]` (about 1.5 minutes on 2 cores):
in-process single-rank trials of 600 steps, micro-batch 32, seed 0, every step measured, the
next-batch gap on (`measure.next_batch`). The two-hidden-layer MLP (non-convex) runs sgd,
momentum (heavy ball, 0.9), adamw, lion and muon in fp32 at ZeRO 0 and in bf16 at ZeRO 1 (the
loop's bf16 needs ZeRO 1-3; measured losses are re-evaluated in fp32). Softmax regression
(`hidden: []`, convex) runs sgd and adamw in fp32, also at large lrs into its low-loss tail.
`--fp32-grads` runs only the bf16 rows, with `measure.fp32_grads` false (g, g⁺ of the bf16
backward, the floor's u_bf16 terms) and true (fp32 g, g⁺: opt_study/measure/fp32grad.py); without
it the bf16 rows take the default, `auto`, which is on under bf16 at ZeRO 1.
Prints one JSON record per trial, then the two markdown tables of benchmarks/RESULTS.md's
section "Issue 13: convexity classes per optimizer".

Learning rates of the MLP: `--sweep` trains each optimizer (fp32, measurement off, same 600 steps)
at its registry default × 3^k, k = -2..2, and prints the lr of the lowest final eval loss; that
choice is written into SWEPT_LR by hand (the bf16 trials reuse it), so the main run does not redo
the sweep.

The old classes come from `first_floor`, the floor of the package's first version (cfea46a,
metrics.noise_floor): u·(|ℓ| + |ℓ⁺| + G·‖sΔ‖ [+ G·(2‖x‖ + ‖sΔ‖) at bf16/fp16 or s ≠ 1]), one
unit roundoff u of the trial's precision for losses and gradients; the package no longer has it.
The new classes are the stored `cls_*` columns. Per trial: metrics.summarize's statistics (our
global smoothness_local, smoothness_ratio), the median and max of the authors' per-tensor
smoothness_authors, and the authors' aggregates (results.query.authors_aggregates, one window =
the whole run, as their run_clm.py).
"""

from __future__ import annotations

import collections
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

STEPS = 600
MLP = {"type": "mlp_classify"}
SOFTMAX = {"type": "mlp_classify", "hidden": []}
SWEEP_FACTORS = (1 / 9, 1 / 3, 1.0, 3.0, 9.0)
# --sweep's choice on the MLP (2026-12-05; the sweep's losses are in benchmarks/RESULTS.md)
SWEPT_LR = {"sgd": 0.09, "momentum": 0.03, "adamw": 0.003, "lion": 0.0003, "muon": 0.00667}
# (label, workload, precision, zero stage, {optimizer: lr}); softmax lrs are the first version's
RUNS = (
    ("mlp [64,64]", MLP, "fp32", 0, SWEPT_LR),
    ("mlp [64,64]", MLP, "bf16", 1, SWEPT_LR),
    ("softmax regression", SOFTMAX, "fp32", 0, {"sgd": 2.0, "adamw": 0.05}),
    ("softmax regression, low-loss tail", SOFTMAX, "fp32", 0, {"sgd": 8.0, "adamw": 0.3}),
)


def first_floor(sums, loss, loss_probe, probe_s, precision: str) -> float:
    """The noise floor of the first version (git show cfea46a:opt_study/measure/metrics.py,
    noise_floor), kept here to recompute the old classes; c and u are the package's."""
    from opt_study.measure.metrics import FLOOR_C, UNIT_ROUNDOFF

    s = float(probe_s)
    gsum = math.sqrt(sums["sq_grad"]) + math.sqrt(sums["sq_grad_probe"])
    seg = abs(s) * math.sqrt(sums["sq_update"])
    scale = abs(loss) + abs(loss_probe) + gsum * seg
    if precision in ("bf16", "fp16") or s != 1.0:  # the evaluation points are rounded
        scale += gsum * (2.0 * math.sqrt(sums["sq_param"]) + seg)
    return FLOOR_C * UNIT_ROUNDOFF[precision] * scale


def train(workload, precision, zero, opt, lr, every, next_batch=True, fp32_grads="auto"):
    """One trial; returns (study_dir, the final report, wall seconds)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from opt_study.plan import TrialPlan
    from opt_study.trial.loop import run_trial

    from specs import SpecFactory

    spec = SpecFactory(Path(tempfile.mkdtemp()))(
        study={"name": "floor"},
        workload=workload,
        scale={"workers": 1, "zero_stage": zero, "micro_batch_size": 32, "precision": precision},
        training={"steps": STEPS, "eval_every": STEPS},
        optimizers=[{"name": opt, "params": {"lr": lr}}],
        measure={"every": every, "next_batch": next_batch and every > 0, "fp32_grads": fp32_grads},
    )
    t = time.perf_counter()
    final = run_trial(spec, TrialPlan("t", opt, opt, {"lr": lr}, seed=0, index=0), report=lambda m: None)
    return spec.study_dir, final, time.perf_counter() - t


def fractions(counter: collections.Counter) -> dict[str, float]:
    from opt_study.measure.metrics import CLASSES

    n = sum(counter.values())
    return {c: counter[c] / n if n else math.nan for c in CLASSES}


def classes(rows, precision: str) -> dict[str, dict[str, float]]:
    """Class fractions per side under the old and the new floor, and the next-batch gap's."""
    from opt_study.measure import metrics
    from opt_study.measure.names import SUM_NAMES

    cnt = collections.defaultdict(collections.Counter)
    over = collections.defaultdict(list)  # |gap_bwd| / floor per row: how far from deciding
    for r in rows:
        old = first_floor({k: r[k] for k in SUM_NAMES}, r["loss"], r["loss_probe"], r["probe_s"], precision)
        over["old"].append(abs(r["convexity_gap_bwd"]) / old)
        over["new"].append(abs(r["convexity_gap_bwd"]) / r["noise_floor"])
        for side in ("fwd", "bwd"):
            cnt[f"new_{side}"][r[f"cls_convexity_{side}"]] += 1
            cnt[f"old_{side}"][metrics.classify(r[f"convexity_gap_{side}"], old)] += 1
        if r.get("cls_nb_convexity") is not None:
            cnt["nb"][r["cls_nb_convexity"]] += 1
    out = {k: fractions(v) for k, v in cnt.items()}
    out["nb_rows"] = sum(cnt["nb"].values())
    out.update({f"gap_over_floor_{k}_median": statistics.median(v) for k, v in over.items()})
    return out


def measure_one(label, workload, precision, zero, opt, lr, fp32_grads="auto") -> dict:
    from opt_study.measure import metrics
    from opt_study.results.parquet import read_steps
    from opt_study.results.query import authors_aggregates, open_study

    study_dir, final, wall = train(workload, precision, zero, opt, lr, every=1, fp32_grads=fp32_grads)
    measured = [r for r in read_steps(study_dir).to_pylist() if r["measured"]]
    rows = [r for r in measured if not r["flag"]]
    summ = metrics.summarize(measured)
    with open_study(study_dir) as db:
        (agg,) = authors_aggregates(db)  # window None: one window, the whole run
    la = [r["smoothness_authors"] for r in rows if r["smoothness_authors"] is not None]
    ratio = [r["smoothness_authors"] / r["smoothness_local"] for r in rows if r["smoothness_local"]]
    return {
        "workload": label,
        "precision": precision,
        "opt": opt,
        "lr": lr,
        "fp32_grads": fp32_grads,
        "grad_precision": sorted({r["grad_precision"] for r in rows}),
        "step_time_median_s": statistics.median(r["step_time_s"] for r in rows),
        "rows": len(rows),
        "flagged": len(measured) - len(rows),
        "min_loss": min(r["loss"] for r in rows),
        "final_eval_loss": final.get("eval_loss"),
        "wall_s": wall,
        **classes(rows, precision),
        "smoothness_local_median": summ["smoothness_local_median"],
        "smoothness_local_max": summ["smoothness_local_max"],
        "smoothness_authors_median": statistics.median(la) if la else math.nan,
        "smoothness_authors_max": max(la) if la else math.nan,
        "authors_over_local_min": min(ratio),
        "authors_over_local_max": max(ratio),
        "smoothness_ratio": summ["smoothness_ratio"],
        "authors": agg,
    }


def sweep() -> dict[str, float]:
    """Each MLP optimizer's lr of the lowest final eval loss over default × SWEEP_FACTORS."""
    from opt_study.optim.registry import optimizer_entry

    best = {}
    for opt in SWEPT_LR:
        default = optimizer_entry(opt).defaults["lr"]
        losses = {}
        for f in SWEEP_FACTORS:
            lr = float(f"{default * f:.3g}")
            _, final, _ = train(MLP, "fp32", 0, opt, lr, every=0)
            losses[lr] = final.get("eval_loss", math.nan)
            print(json.dumps({"sweep": opt, "lr": lr, "eval_loss": losses[lr]}), flush=True)
        best[opt] = min(losses, key=lambda k: losses[k] if math.isfinite(losses[k]) else math.inf)
    return best


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if "--sweep" in sys.argv:
        print(json.dumps({"best_lr": sweep()}), flush=True)
        return
    runs = [(*run, "auto") for run in RUNS]
    if "--fp32-grads" in sys.argv:  # only the bf16 rows, with measure.fp32_grads false and true
        runs = [
            (f"{r[0]}, fp32_grads: {str(fg).lower()}", *r[1:], fg)
            for fg in (False, True)
            for r in RUNS
            if r[2] == "bf16"
        ]
    out = []
    for label, wl, precision, zero, lrs, fp32_grads in runs:
        for opt, lr in lrs.items():
            rec = measure_one(label, wl, precision, zero, opt, lr, fp32_grads)
            print(json.dumps(rec), flush=True)
            out.append(rec)
    if args:
        Path(args[0]).write_text(json.dumps(out, indent=1))
    print(markdown(out))


def _hvi(f: dict) -> str:
    return "/".join(f"{100 * f[c]:.1f}" for c in ("holds", "violated", "indeterminate"))


def _g(v) -> str:
    return f"{v:.3g}"


def markdown(out: list[dict]) -> str:
    """The two tables of benchmarks/RESULTS.md's section: classes, then the smoothness and the
    authors' aggregates (one window: the whole run)."""
    head = "| workload | prec. | optimizer | lr | rows | min loss |"
    t1 = [
        head + " fwd old | fwd new | bwd old | bwd new | next-batch new | median \\|gap\\|/floor old / new |",
        "|" + "---|" * 12,
    ]
    t2 = [
        "| workload | prec. | optimizer | ours: L median / max | authors': L median / max | authors'/ours per step |"
        " ours: smoothness_ratio | gap_mean | gap_ema99 | gap_ema9999 | Σ⟨g⁺,Δ⟩/Σδ | convexity excess |"
        " L ema99 / ema9999 |",
        "|" + "---|" * 13,
    ]
    for r in out:
        a, key = r["authors"], f"| {r['workload']} | {r['precision']} | {r['opt']} |"
        t1.append(
            f"{key} {r['lr']:g} | {r['rows']} | {_g(r['min_loss'])} | {_hvi(r['old_fwd'])} | {_hvi(r['new_fwd'])} |"
            f" {_hvi(r['old_bwd'])} | {_hvi(r['new_bwd'])} | {_hvi(r['nb'])} |"
            f" {_g(r['gap_over_floor_old_median'])} / {_g(r['gap_over_floor_new_median'])} |"
        )
        t2.append(
            f"{key} {_g(r['smoothness_local_median'])} / {_g(r['smoothness_local_max'])} |"
            f" {_g(r['smoothness_authors_median'])} / {_g(r['smoothness_authors_max'])} |"
            f" {r['authors_over_local_min']:.2f}-{r['authors_over_local_max']:.2f} | {_g(r['smoothness_ratio'])} |"
            f" {_g(a['gap_mean'])} | {_g(a['gap_ema99'])} | {_g(a['gap_ema9999'])} |"
            f" {_g(a['linear_over_loss_gap'])} | {_g(a['convexity_excess'])} |"
            f" {_g(a['smoothness_ema99'])} / {_g(a['smoothness_ema9999'])} |"
        )
    return "\n".join(t1) + "\n\n" + "\n".join(t2)


if __name__ == "__main__":
    main()
