"""Benchmark 1, parity: steps/s of an opt_study trial against a plain DeepSpeed loop.

Run as `torchrun --nproc_per_node 2 benchmarks/bench_parity.py OUT.json` (run_all.py does).
2 ranks, ZeRO-2, the common STEP_MODEL (a step >= 100 ms). Three variants, interleaved and
rotated over REPEATS repeats (loops.interleaved):

- `deepspeed`: the plain loop (loops.plain_deepspeed);
- `off`: run_trial with measurement off (`measure: {every: 0, norms: false}`): loss and lr only;
- `norms`: run_trial with the every-step norms on (‖g‖, ‖Δ‖, ‖x‖ from the shards, one all-reduce).

Timing: steps/s over steps WARMUP..STEPS-1 from each step's end time (the Parquet `time_unix`
column for run_trial, `time.time()` after `engine.step()` for the plain loop), so the first
WARMUP steps and the single evaluation after the last step are excluded from both. Target:
off / deepspeed >= 0.95, the median over repeats of the ratio within a repeat, of the window
mean; the ratio of the median step intervals is shown as a check that is robust to foreign load.
"""

from __future__ import annotations

from common import MIN_STEP_S, Section, fmt, median, out_path, paired_ratios, study_dict, write_json

WARMUP, TIMED, REPEATS = 3, 20, 4
STEPS = WARMUP + TIMED
MEASURE = {"off": {"every": 0, "norms": False}, "norms": {"every": 0, "norms": True}}
VARIANTS = ("deepspeed", "off", "norms")
TARGET = 0.95


def main() -> None:
    from opt_study import distributed

    import loops

    loops.init()
    tmp, storage = loops.shared_tempdir()
    world = distributed.world_size()

    def doc(rep, v):
        return study_dict(
            f"parity{rep}{v}",
            storage,
            workers=world,
            stage=2,
            steps=STEPS,
            measure=MEASURE.get(v, MEASURE["off"]),
            launcher="worker_group",
        )

    variants = {
        "deepspeed": lambda rep: loops.plain_deepspeed(doc(rep, "deepspeed")),
        "off": lambda rep: loops.opt_study_trial(doc(rep, "off"), f"t{rep}off"),
        "norms": lambda rep: loops.opt_study_trial(doc(rep, "norms"), f"t{rep}norms"),
    }
    runs = loops.interleaved(variants, REPEATS, WARMUP, "parity")
    if distributed.rank() == 0:
        write_json(
            out_path(),
            {"runs": runs, "warmup": WARMUP, "timed": TIMED, "repeats": REPEATS, "world": world, "zero_stage": 2},
        )
        tmp.cleanup()


def summarize(res: dict) -> Section:
    runs = res["runs"]
    table = [
        [
            "variant",
            "steps/s (window mean)",
            "steps/s (median interval)",
            "step ms (median)",
            "ratio to deepspeed, per repeat",
            "load1 before each run",
        ]
    ]
    for v in VARIANTS:
        rs = [r for r in runs if r["variant"] == v]
        table.append(
            [
                v,
                fmt(median(r["steps_per_s"] for r in rs)),
                fmt(median(r["steps_per_s_median"] for r in rs)),
                fmt(1000 * median(r["median_step_s"] for r in rs)),
                ", ".join(fmt(x) for x in paired_ratios(runs, v, "deepspeed")),
                ", ".join(fmt(r["load1"]) for r in rs),
            ]
        )
    off = median(paired_ratios(runs, "off", "deepspeed"))
    norms = median(paired_ratios(runs, "norms", "deepspeed"))
    off_med = median(paired_ratios(runs, "off", "deepspeed", "steps_per_s_median"))
    norms_med = median(paired_ratios(runs, "norms", "deepspeed", "steps_per_s_median"))
    step_s = median(r["median_step_s"] for r in runs if r["variant"] == "deepspeed")
    notes = [
        f"2 ranks, ZeRO-2, AdamW, micro-batch {res.get('micro_batch', 16)}; {res['repeats']} repeats "
        f"(variant order rotated), {res['warmup']} warm-up steps excluded, {res['timed']} timed "
        "steps. Steps/s from per-step end times: Parquet `time_unix` for run_trial, `time.time()` "
        "after `engine.step()` for the plain loop; so the loss all-reduce, the Parquet row and "
        "batch creation all count against opt_study. Evaluation (once, after the last step) is "
        "outside the window.",
        f"Ratio of median step intervals (robust to foreign load): off {fmt(off_med)}, norms {fmt(norms_med)}.",
        f"With the every-step norms on (‖g‖, ‖Δ‖, ‖x‖ from the shards): ratio {fmt(norms)} (window mean; no target).",
        f"Plain-loop step time {fmt(1000 * step_s)} ms "
        f"({'>=' if step_s >= MIN_STEP_S else 'BELOW'} the 100 ms the target assumes).",
    ]
    return Section(
        "1. Parity: opt_study trial vs plain DeepSpeed loop",
        f"steps/s(opt_study, measurement off) / steps/s(plain DeepSpeed) >= {TARGET}",
        "PASS" if off >= TARGET else "MISS",
        f"ratio {fmt(off)}",
        table,
        notes,
    )


if __name__ == "__main__":
    main()
