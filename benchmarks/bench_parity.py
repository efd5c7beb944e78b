"""Benchmark 1, parity: steps/s of an opt_study trial against a plain DeepSpeed loop.

Run as `torchrun --nproc_per_node 2 benchmarks/bench_parity.py OUT.json` (run_all.py does).
2 ranks, ZeRO-2, the common STEP_MODEL (a step >= 100 ms). Three variants, interleaved and
rotated over REPEATS repeats:

- `deepspeed`: the plain loop (loops.plain_deepspeed);
- `off`: run_trial with measurement off (`measure: {every: 0, norms: false}`): loss and lr only;
- `norms`: run_trial with the every-step norms on (‖g‖, ‖Δ‖, ‖x‖ from the shards, one all-reduce).

Timing: steps/s over steps WARMUP..STEPS-1 from each step's end time (the Parquet `time_unix`
column for run_trial, `time.time()` after `engine.step()` for the plain loop), so the first
WARMUP steps and the single evaluation after the last step are excluded from both. Target:
off / deepspeed >= 0.95 (the median over repeats of the ratio within a repeat).
"""
from __future__ import annotations

from common import MIN_STEP_S, Section, fmt, load1, median, out_path, study_dict, window_rate, write_json

WARMUP, TIMED, REPEATS = 3, 20, 3
STEPS = WARMUP + TIMED
VARIANTS = ("deepspeed", "off", "norms")
MEASURE = {"off": {"every": 0, "norms": False}, "norms": {"every": 0, "norms": True}}
TARGET = 0.95


def main() -> None:
    import loops
    from opt_study import distributed

    loops.init()
    tmp, storage = loops.shared_tempdir()
    runs = []
    for rep in range(REPEATS):
        order = VARIANTS[rep % 3:] + VARIANTS[:rep % 3]
        for v in order:
            doc = study_dict(f"parity{rep}{v}", storage, workers=distributed.world_size(), stage=2,
                             steps=STEPS, measure=MEASURE.get(v, {"every": 0, "norms": False}),
                             launcher="worker_group")
            load = load1()
            cols = loops.plain_deepspeed(doc) if v == "deepspeed" else loops.opt_study_trial(doc, f"t{rep}{v}")
            if distributed.rank() == 0:
                runs.append({"rep": rep, "variant": v, "load1": load,
                             "steps_per_s": window_rate(cols["time_unix"], WARMUP),
                             "median_step_s": median(cols["step_time_s"][WARMUP:])})
                print(f"parity rep {rep} {v}: {runs[-1]}", flush=True)
    if distributed.rank() == 0:
        write_json(out_path(), {"runs": runs, "warmup": WARMUP, "timed": TIMED, "repeats": REPEATS,
                                "world": distributed.world_size(), "zero_stage": 2})
        tmp.cleanup()


def ratios(runs: list[dict], variant: str, base: str = "deepspeed") -> list[float]:
    """Per-repeat ratio of steps/s (variant over base) within each repeat."""
    by = {(r["rep"], r["variant"]): r["steps_per_s"] for r in runs}
    reps = sorted({r["rep"] for r in runs})
    return [by[(k, variant)] / by[(k, base)] for k in reps if (k, variant) in by and (k, base) in by]


def summarize(res: dict) -> Section:
    runs = res["runs"]
    table = [["variant", "steps/s (median)", "step time ms (median)", "ratio to deepspeed (per repeat)",
              "load1 before each run"]]
    for v in VARIANTS:
        rs = [r for r in runs if r["variant"] == v]
        per = ratios(runs, v)
        table.append([v, fmt(median(r["steps_per_s"] for r in rs)),
                      fmt(1000 * median(r["median_step_s"] for r in rs)),
                      ", ".join(fmt(x) for x in per), ", ".join(fmt(r["load1"]) for r in rs)])
    off, norms = median(ratios(runs, "off")), median(ratios(runs, "norms"))
    step_s = median(r["median_step_s"] for r in runs if r["variant"] == "deepspeed")
    verdict = "PASS" if off >= TARGET else "MISS"
    notes = [f"2 ranks, ZeRO-2, {res['repeats']} repeats (variants rotated), {res['warmup']} warm-up "
             f"steps excluded, {res['timed']} timed steps; steps/s from per-step end times "
             "(Parquet `time_unix` for run_trial, `time.time()` after `engine.step()` for the plain "
             "loop), so Parquet writing, the loss all-reduce and batch creation count for opt_study.",
             f"With the every-step norms on (‖g‖, ‖Δ‖, ‖x‖): ratio {fmt(norms)} (no target).",
             f"Plain-loop step time {fmt(1000 * step_s)} ms "
             f"({'>=' if step_s >= MIN_STEP_S else 'BELOW'} the 100 ms the target assumes)."]
    return Section("1. Parity: opt_study trial vs plain DeepSpeed loop", f"off / deepspeed >= {TARGET}",
                   verdict, f"ratio {fmt(off)} (measurement off)", table, notes)


if __name__ == "__main__":
    main()
