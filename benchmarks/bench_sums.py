"""Benchmark 3 (METRICS issue 7a): the cost of the measurement math on one rank's shard.

Run as `python benchmarks/bench_sums.py OUT.json` (one process, one torch thread: a rank's view
of a 2-core machine running 2 ranks). For shards of SIZES elements it times
`opt_study.measure.sums.local_sums` against ONE PASS over the same bytes (`t.sum()` over every
operand of every fragment: the memory-bound floor of anything that reads those vectors).

The shard is laid out as a rank holds it at ZeRO-1/2: one flat fp32 buffer per vector, cut into
the fragments of a real model's parameters (tiny_lm, width 128 or 320, 8 layers: 101 tensors of
1.66M or 10.05M elements), grouped by module path as StepMeasurer groups them. Three workloads:

- `no_probe` (the target): every raw sum that exists without the probe, over the 6 vectors
  x, g, Δ, x₀, Δ_{t−1}, g_{t−1} (11 sums);
- `norms`: the every-step norms ‖g‖², ‖Δ‖², ‖x‖² over x, g, Δ (what an unmeasured step costs);
- `with_probe`: all 14 sums over the 7 vectors (g⁺ added), for reference.

Target: time(local_sums, no_probe) / time(one pass) <= 1.5, medians over REPEATS of the
thread's CPU time (robust to other jobs taking the core; memory stalls still count).
"""
from __future__ import annotations

from common import Section, fmt, load1, median, out_path, write_json

SIZES = {"1.6M": (128, 8), "10M": (320, 8)}  # tiny_lm (width, layers) whose parameters make the shard
REPEATS = 9
TARGET = 1.5
WORKLOADS = {
    "no_probe": (("x", "g", "delta", "x0", "delta_prev", "g_prev"), None),
    "norms": (("x", "g", "delta"), ("sq_grad", "sq_update", "sq_param")),
    "with_probe": (("x", "g", "delta", "g_plus", "x0", "delta_prev", "g_prev"), None),
}


def shard(width: int, layers: int):
    """(fragment shapes as element counts, group index per fragment, number of groups)."""
    from opt_study.measure.hook import group_names
    from opt_study.workloads.tiny_lm import TinyLM, TinyLMConfig

    model = TinyLM(TinyLMConfig(width=width, layers=layers, heads=4, context=64))
    named = list(model.named_parameters())
    groups, group_of = group_names([n for n, _ in named])
    return [p.numel() for _, p in named], group_of, len(groups)


def fragments(sizes, group_of, fields, gen):
    import torch

    from opt_study.measure.sums import Fragment

    total = sum(sizes)
    flat = {f: torch.randn(total, generator=gen) for f in fields}
    frags, lo = [], 0
    for n, grp in zip(sizes, group_of):
        frags.append(Fragment(group=grp, **{f: flat[f][lo:lo + n] for f in fields}))
        lo += n
    return frags


def copied_fraction(sizes) -> float:
    """Share of the shard's elements in fragments shorter than sums.CHUNK: local_sums
    concatenates those (torch.cat, a copy) into chunk-sized blocks before the dots."""
    from opt_study.measure.sums import CHUNK

    return sum(n for n in sizes if n < CHUNK) / sum(sizes)


def assemble_blocks(frags) -> None:
    """A diagnostic: only the block assembly of local_sums (slicing and torch.cat), no dots.
    Uses the module's private `_blocks`, as local_sums does; skipped if it is gone."""
    from opt_study.measure import sums

    blocks = getattr(sums, "_blocks", None)
    if blocks is None:
        return
    buckets: dict = {}
    for f in frags:
        buckets.setdefault((f.group, tuple(f.tensors())), []).append(f)
    for (_, present), members in buckets.items():
        for _ in blocks(members, present, sums.CHUNK):
            pass


def time_it(fn, repeats: int) -> list[float]:
    """CPU time of this thread per call: on a shared 2-core machine wall time also counts the
    time other jobs hold the core; thread CPU time does not (memory stalls still count)."""
    import time

    fn()  # warm-up: allocator, BLAS dispatch
    out = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        out.append(time.thread_time() - t0)
    return out


def main() -> None:
    import torch

    from opt_study.measure.sums import local_sums

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    results = []
    for label, (width, layers) in SIZES.items():
        sizes, group_of, n_groups = shard(width, layers)
        for wname, (fields, only) in WORKLOADS.items():
            frags = fragments(sizes, group_of, fields, gen)

            def one_pass():
                for f in frags:
                    for t in f.tensors().values():
                        t.sum()

            def sums():
                local_sums(frags, n_groups, only=only)

            load = load1()
            base, ours, blocks = [], [], []
            for _ in range(3):  # alternate so a burst of foreign load hits both
                base += time_it(one_pass, REPEATS // 3)
                ours += time_it(sums, REPEATS // 3)
                blocks += time_it(lambda: assemble_blocks(frags), REPEATS // 3)
            results.append({"size": label, "elements": sum(sizes), "fragments": len(sizes),
                            "groups": n_groups, "workload": wname, "vectors": len(fields),
                            "load1": load, "one_pass_s": median(base), "local_sums_s": median(ours),
                            "ratio": median(ours) / median(base), "blocks_s": median(blocks),
                            "copied_fraction": copied_fraction(sizes)})
            print(f"sums {results[-1]}", flush=True)
    write_json(out_path(), {"results": results, "repeats": REPEATS, "threads": 1})


def summarize(res: dict) -> Section:
    table = [["shard", "workload", "vectors", "one pass ms", "local_sums ms", "ratio",
              "GB/s (local_sums)", "of which block assembly ms", "load1"]]
    worst = 0.0
    for r in res["results"]:
        gbs = r["elements"] * 4 * r["vectors"] / r["local_sums_s"] / 1e9
        table.append([f"{r['size']} ({r['elements']:,} el., {r['fragments']} fragments, {r['groups']} groups)",
                      r["workload"], str(r["vectors"]), fmt(1000 * r["one_pass_s"]),
                      fmt(1000 * r["local_sums_s"]), fmt(r["ratio"]), fmt(gbs),
                      fmt(1000 * r["blocks_s"]), fmt(r["load1"])])
        if r["workload"] == "no_probe":
            worst = max(worst, r["ratio"])
    notes = ["One process, 1 torch thread (a rank's share of this 2-core machine). Medians of "
             f"{res['repeats']} timings each (thread CPU time, so time the core spent on other jobs "
             "is not counted), the two sides alternated in 3 blocks after a warm-up call.",
             "One pass = `t.sum()` over every operand of every fragment (each byte read once).",
             "`no_probe` is the target workload (11 sums over x, g, Δ, x₀, Δ_{t−1}, g_{t−1}); "
             "`norms` is what every unmeasured step computes; `with_probe` adds g⁺ (14 sums).",
             "Block assembly (a diagnostic): the slicing and `torch.cat` local_sums does before its dot "
             "products, timed alone. local_sums copies every fragment shorter than its chunk; that is "
             + ", ".join(f"{fmt(100 * r['copied_fraction'])}% of the {r['size']} shard"
                         for r in res["results"] if r["workload"] == "no_probe") + ".",
             "At 1.6M elements the 6 vectors (40 MB) stay in this VM's last-level cache between "
             "repeats, which favours the one-pass baseline; at 10M (240 MB) both sides stream from memory."]
    return Section("3. Measurement math: local_sums vs one pass over the shard (METRICS 7a)",
                   f"time(local_sums) / time(one pass) <= {TARGET} at 1.6M and 10M elements",
                   "PASS" if worst <= TARGET else "MISS", f"worst ratio {fmt(worst)} (no_probe)",
                   table, notes)


if __name__ == "__main__":
    main()
