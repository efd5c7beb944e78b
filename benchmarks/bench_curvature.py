"""The cost of one online curvature measurement (docs/METRICS.md §Online curvature) in units of
one training step.

Run as `DS_ACCELERATOR=cpu PYTHONPATH=. torchrun --standalone --nproc_per_node 2
benchmarks/bench_curvature.py OUT.json` (not in run_all.py: a 10M-parameter curvature
measurement takes minutes on 2 cores). 2 ranks, ZeRO-2, tiny_lm of 10.05M parameters (width
320, 8 layers: bench_full_grad's model), run_trial throughout, AdamW. Two trials of STEPS steps,
curvature on steps 3 and 7 (curvature_every 4, measure.every 0):

- `lanczos`: `lanczos_steps: M`, no critical sharpness: 2M gradient evaluations (a probe each:
  the point written into the shards, forward + backward with reduction, the engine restored);
- `critical`: `critical_forwards: 10`, no Lanczos: at most 10 forwards, one loss all-reduce each.

The unit is the median `step_time_s` of the trial's unmeasured steps (a plain training step);
the cost is `curvature_time_s` (the measurement alone, rank 0) over it, median over the two
curvature steps. A probe is about one step (benchmark 5), so Lanczos should cost about 2M steps
and the critical sharpness a few (a forward is about a third of a step).
"""

from __future__ import annotations

from common import Section, fmt, load1, md_table, median, out_path, study_dict, write_json

MODEL = {"type": "tiny_lm", "layers": 8, "heads": 4, "width": 320, "context": 16, "dropout": 0.0}
STEPS, EVERY, M = 8, 4, 10
VARIANTS = {
    "lanczos": {"every": 0, "curvature_every": EVERY, "lanczos_steps": M, "critical_forwards": 0},
    "critical": {"every": 0, "curvature_every": EVERY, "lanczos_steps": 0, "critical_forwards": 10},
}


def run(name: str, measure: dict, storage: str, world: int) -> dict | None:
    from opt_study import distributed

    import loops

    doc = study_dict(
        f"curv{name}", storage, workers=world, stage=2, steps=STEPS, measure=measure, model=MODEL, micro_batch=4
    )
    doc["scale"]["launcher"] = "worker_group"
    load = load1()
    loops.opt_study_trial(doc, f"t{name}")
    if distributed.rank() != 0:
        return None
    from opt_study.results.parquet import read_steps
    from opt_study.validate import parse_study

    rows = read_steps(parse_study(doc).study_dir, trial_ids=[f"t{name}"]).to_pylist()
    plain = [r["step_time_s"] for r in rows if not r["measured"] and r["step"] > 0]
    curv = [r for r in rows if r["curvature_time_s"] is not None]
    unit = median(plain)
    return {
        "step_s": unit,
        "curvature_s": [r["curvature_time_s"] for r in curv],
        "cost_in_steps": median(r["curvature_time_s"] / unit for r in curv),
        "sharpness": [r["sharpness"] for r in curv],
        "critical_sharpness": [r["critical_sharpness"] for r in curv],
        "load1_before": load,
    }


def main() -> None:
    from opt_study import distributed

    import loops

    loops.init()
    tmp, storage = loops.shared_tempdir()
    world = distributed.world_size()
    res = {name: run(name, m, storage, world) for name, m in VARIANTS.items()}
    if distributed.rank() == 0:
        import torch

        from opt_study.workloads import TinyLMConfig, make_workload

        params = {k: v for k, v in MODEL.items() if k != "type"}
        n = sum(p.numel() for p in make_workload("tiny_lm", TinyLMConfig(**params), 0).build_model().parameters())
        write_json(
            out_path(), {"world": world, "params": n, "lanczos_steps": M, "results": res, "torch": torch.__version__}
        )
        sec = summarize({"world": world, "params": n, "lanczos_steps": M, "results": res})
        print(f"{sec.title}: {sec.headline}\n{md_table(sec.table)}")
    distributed.barrier()
    if tmp is not None:
        tmp.cleanup()


def summarize(res: dict) -> Section:
    r = res["results"]
    rows = [["measurement", "one step (s)", "measurement (s)", "cost in steps", "per Lanczos step"]]
    for name, v in r.items():
        per = fmt(v["cost_in_steps"] / res["lanczos_steps"]) if name == "lanczos" else "–"
        curv = ", ".join(fmt(x) for x in v["curvature_s"])
        rows.append([name, fmt(v["step_s"]), curv, fmt(v["cost_in_steps"]), per])
    return Section(
        "Online curvature: cost of one measurement",
        "reported",
        "INFO",
        f"{res['params'] / 1e6:.2f}M parameters, {res['world']} ranks, ZeRO-2; Lanczos m = {res['lanczos_steps']}",
        rows,
    )


if __name__ == "__main__":
    main()
