"""Benchmark 4 (METRICS issue 7b): opt_study's shard path vs DeepSpeed's safe_get_full_* API.

Run as `torchrun --nproc_per_node 2 benchmarks/bench_full_grad.py OUT.json`.
The same global quantities ‖g‖², ⟨g, x⟩, ‖x‖² at the same moment (after the boundary backward,
before `engine.step()`, when ZeRO-1/2 gradient fragments exist), two ways:

- `full`: per parameter, `deepspeed.utils.safe_get_full_grad(p)` and `safe_get_full_fp32_param(p)`
  (each materializes the full-size tensor on every rank through a collective), then fp32 dots
  accumulated in float64 on the full tensors (every rank computes everything);
- `shard` (the target): opt_study's shard view (`ShardView.params()` / `grads()`: this rank's
  fp32 fragments, views of what the engine holds), `local_sums` for the three sums, `pack` and
  ONE `all_reduce_sum`;
- `shard_cloned`: the same after cloning the fragments, as StepMeasurer does (it keeps x_t and
  g_t across `engine.step()`), for reference.

Model: tiny_lm of 10.05M parameters (width 320, 8 layers), 2 ranks, ZeRO-2 and ZeRO-3, built by
opt_study.trial.engine.build_engine (the trials' own DeepSpeed config). Each of STEPS steps times both
ways (order alternated) after a barrier; the results must agree to 1e-6 relative. Target:
time(full) / time(shard) >= 10, median over steps.
"""

from __future__ import annotations

from common import Section, fmt, load1, median, out_path, write_json

MODEL = {"layers": 8, "heads": 4, "width": 320, "context": 16, "dropout": 0.0}
STAGES = (2, 3)
STEPS = 6
TARGET = 10.0
SUMS = ("sq_grad", "ip_param_grad", "sq_param")


def full_way(params) -> list[float]:
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    acc = torch.zeros(3, dtype=torch.float64)
    for p in params:
        g = safe_get_full_grad(p).reshape(-1).float()
        x = safe_get_full_fp32_param(p).reshape(-1).float()
        acc += torch.stack([torch.dot(g, g), torch.dot(x, g), torch.dot(x, x)]).double()
    return acc.tolist()


def shard_way(view, group_of, n_groups, clone: bool) -> list[float]:
    import torch

    from opt_study import distributed
    from opt_study.measure.sums import LOSS_NAMES, SUM_NAMES, Fragment, local_sums, pack, unpack

    xs, gs = (view.clone_params(), view.clone_grads()) if clone else (view.params(), view.grads())
    frags = [Fragment(group=group_of[i], x=x, g=g) for i, (x, g) in enumerate(zip(xs, gs))]
    packed = pack(local_sums(frags, n_groups, only=SUMS), torch.zeros(len(LOSS_NAMES), dtype=torch.float64))
    distributed.all_reduce_sum(packed)
    per_group, _ = unpack(packed, n_groups)
    assert set(SUMS) <= set(SUM_NAMES)
    return [float(per_group[k].sum()) for k in SUMS]


def run_stage(stage: int) -> list[dict]:
    import time

    import torch

    from opt_study import distributed
    from opt_study.config import ScaleConfig
    from opt_study.measure.hook import group_names
    from opt_study.measure.shards import ShardView
    from opt_study.trial import engine as engine_mod
    from opt_study.workloads import TinyLMConfig, make_workload

    world, rank = distributed.world_size(), distributed.rank()
    scale = ScaleConfig(workers=world, zero_stage=stage, micro_batch_size=2, launcher="worker_group")
    engine_mod.setup_process(scale)
    wl = make_workload("tiny_lm", TinyLMConfig(**MODEL), 0)
    model = wl.build_model()
    n_params = sum(p.numel() for p in model.parameters())
    eng, info = engine_mod.build_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-4), scale, None)
    view = ShardView(eng, stage, "fp32", rank, world)
    groups, group_of = group_names(view.names)
    params = [p for _, p in view.named]
    out = []
    for step in range(STEPS):
        loss = wl.loss(eng, wl.train_batch(step, rank, scale.micro_batch_size))
        eng.backward(loss)
        times, values = {}, {}
        load = load1()
        ways = ("full", "shard", "shard_cloned")
        for way in ways[step % 3 :] + ways[: step % 3]:
            distributed.barrier()
            t0 = time.perf_counter()
            values[way] = (
                full_way(params)
                if way == "full"
                else shard_way(view, group_of, len(groups), clone=way == "shard_cloned")
            )
            times[way] = time.perf_counter() - t0
        eng.step()
        rel = max(
            abs(a - b) / max(abs(a), abs(b), 1e-300)
            for w in ("shard", "shard_cloned")
            for a, b in zip(values["full"], values[w])
        )
        out.append(
            {
                "stage": stage,
                "step": step,
                "load1": load,
                "full_s": times["full"],
                "shard_s": times["shard"],
                "shard_cloned_s": times["shard_cloned"],
                "ratio": times["full"] / times["shard"],
                "ratio_cloned": times["full"] / times["shard_cloned"],
                "max_rel_diff": rel,
                "params": n_params,
                "local_elements": view.local_numel(),
                "tensors": len(params),
                "values": values["shard"],
            }
        )
        if rank == 0:
            print(f"fullgrad {out[-1]}", flush=True)
    del eng, view, params
    return out


def main() -> None:
    import gc

    from opt_study import distributed

    import loops

    loops.init()
    rows = []
    for stage in STAGES:
        rows += run_stage(stage)
        gc.collect()
    if distributed.rank() == 0:
        write_json(out_path(), {"rows": rows, "world": distributed.world_size(), "steps": STEPS})


def summarize(res: dict) -> Section:
    table = [
        [
            "ZeRO",
            "parameters (tensors)",
            "elements on rank 0",
            "safe_get_full_* ms",
            "shard path ms",
            "speed-up per step",
            "speed-up (median)",
            "shard path with clones ms (speed-up)",
            "max rel. diff",
            "load1",
        ]
    ]
    verdict_ratios = []
    for stage in sorted({r["stage"] for r in res["rows"]}):
        rs = [r for r in res["rows"] if r["stage"] == stage]
        ratio = median(r["ratio"] for r in rs)
        verdict_ratios.append(ratio)
        table.append(
            [
                str(stage),
                f"{rs[0]['params']:,} ({rs[0]['tensors']})",
                f"{rs[0]['local_elements']:,}",
                fmt(1000 * median(r["full_s"] for r in rs)),
                fmt(1000 * median(r["shard_s"] for r in rs)),
                ", ".join(fmt(r["ratio"]) for r in rs),
                fmt(ratio),
                f"{fmt(1000 * median(r['shard_cloned_s'] for r in rs))} ({fmt(median(r['ratio_cloned'] for r in rs))})",
                fmt(max(r["max_rel_diff"] for r in rs), 2),
                ", ".join(fmt(r["load1"]) for r in rs),
            ]
        )
    worst = min(verdict_ratios)
    notes = [
        f"{res['world']} ranks; ‖g‖², ⟨g, x⟩, ‖x‖² after the boundary backward of each of "
        f"{res['steps']} steps, both ways timed on rank 0 after a barrier (order alternated).",
        "safe_get_full_*: one full-size collective per call, two calls per parameter tensor. The "
        "shard path reads this rank's fragments through ShardView (no copy), runs local_sums and "
        "one all-reduce of a small float64 vector; 'with clones' first copies the fragments, as "
        "StepMeasurer does to keep x_t and g_t across engine.step().",
        "max rel. diff: the largest relative difference between the two ways' results.",
    ]
    return Section(
        "4. Shard view + local_sums + one all-reduce vs safe_get_full_* (METRICS 7b)",
        f"time(safe_get_full_*) / time(shard path) >= {TARGET:g} at 10M parameters",
        "PASS" if worst >= TARGET else "MISS",
        f"speed-up {' / '.join(fmt(x) for x in verdict_ratios)} (ZeRO {'/'.join(map(str, STAGES))})",
        table,
        notes,
    )


if __name__ == "__main__":
    main()
