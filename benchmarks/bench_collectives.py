"""Benchmark 6 (METRICS issue 7d): collectives opt_study issues per measured step.

Run as `torchrun --nproc_per_node 2 benchmarks/bench_collectives.py OUT.json`.
The real run_trial with a StepMeasurer subclass (the test seam the multi-rank harness uses) that
reads `opt_study.distributed.COUNTERS["all_reduce"]` before and after each of its hooks (begin,
before_micro, at_boundary, end), so the count is taken on the real code path. Separately it
counts every `torch.distributed` collective call made between `begin` and the return of `end`
(wrapping the module's functions): those include DeepSpeed's own gradient reductions (of the
step's backward and, on measured steps, of the probe's backward), which opt_study does not
issue and which COUNTERS does not count. Evaluation (once, after the last step) is outside the
hooks. Target: exactly one opt_study all-reduce per measured step, at every ZeRO stage.
"""

from __future__ import annotations

from common import Section, out_path, study_dict, write_json

SMALL_MODEL = {"type": "tiny_lm", "layers": 1, "heads": 2, "width": 32, "context": 16, "dropout": 0.1}
STEPS = 6
CASES = [{"stage": s, "measure": {"every": 2}} for s in (0, 1, 2, 3)] + [
    {"stage": 2, "measure": {"every": 2, "norms": False}},
    {"stage": 2, "measure": {"every": 0, "norms": False}},
]
DIST_FUNCS = (
    "all_reduce",
    "all_reduce_coalesced",
    "reduce_scatter_tensor",
    "reduce_scatter",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "reduce",
    "all_to_all_single",
    "barrier",
    "all_gather_object",
    "broadcast_object_list",
)


class DistCounter:
    """Counts calls of torch.distributed's collectives by name while `active` is set."""

    def __init__(self):
        import torch.distributed as dist

        self.counts: dict[str, int] = {}
        self.active = False
        for name in DIST_FUNCS:
            fn = getattr(dist, name, None)
            if fn is not None:
                setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def wrapped(*a, **kw):
            if self.active:
                self.counts[name] = self.counts.get(name, 0) + 1
            return fn(*a, **kw)

        return wrapped

    def take(self) -> dict[str, int]:
        out, self.counts = self.counts, {}
        return out


def counting_measurer(dist_counter: DistCounter, log: list):
    from opt_study.distributed import COUNTERS
    from opt_study.measure.hook import StepMeasurer

    class Counting(StepMeasurer):
        def _count(self, hook, fn, *a):
            before = COUNTERS["all_reduce"]
            out = fn(*a)
            self.ours[hook] = self.ours.get(hook, 0) + COUNTERS["all_reduce"] - before
            return out

        def begin(self, step):
            self.ours = {}
            dist_counter.take()
            dist_counter.active = True
            self._count("begin", super().begin, step)

        def before_micro(self, batch):
            self._count("before_micro", super().before_micro, batch)

        def at_boundary(self):
            self._count("at_boundary", super().at_boundary)

        def end(self, step, loss_local, loss_fn, **kw):  # kw: whatever run_trial passes on
            in_step = dist_counter.take()
            parent = super().end
            row = self._count("end", lambda: parent(step, loss_local, loss_fn, **kw))
            dist_counter.active = False
            in_end = dist_counter.take()
            total = {k: in_step.get(k, 0) + in_end.get(k, 0) for k in set(in_step) | set(in_end)}
            log.append(
                {
                    "step": step,
                    "measured": bool(self.measured),
                    "opt_study": dict(self.ours),
                    "torch_dist_in_end": in_end,
                    "torch_dist_in_step": total,
                }
            )
            return row

    return Counting


def main() -> None:
    from opt_study import distributed

    import loops

    loops.init()
    tmp, storage = loops.shared_tempdir()
    counter = DistCounter()
    results = []
    for i, case in enumerate(CASES):
        log: list[dict] = []
        doc = study_dict(
            f"coll{i}",
            storage,
            workers=distributed.world_size(),
            stage=case["stage"],
            steps=STEPS,
            measure=case["measure"],
            model=SMALL_MODEL,
            micro_batch=4,
            launcher="worker_group",
        )
        loops.opt_study_trial(doc, f"c{i}", measurer_cls=counting_measurer(counter, log))
        results.append({"case": case, "steps": log})
        if distributed.rank() == 0:
            print(
                f"collectives case {case}: opt_study all-reduces per step "
                f"{[(s['step'], s['measured'], sum(s['opt_study'].values())) for s in log]}",
                flush=True,
            )
    if distributed.rank() == 0:
        write_json(out_path(), {"results": results, "world": distributed.world_size(), "steps": STEPS})
        tmp.cleanup()


def _per_step(steps: list[dict], measured: bool) -> tuple[set, set, set]:
    rows = [s for s in steps if s["measured"] == measured]
    ours = {sum(s["opt_study"].values()) for s in rows}
    in_end = {tuple(sorted(s["torch_dist_in_end"].items())) for s in rows}
    in_step = {tuple(sorted(s["torch_dist_in_step"].items())) for s in rows}
    return ours, in_end, in_step


def _fmt_calls(calls: set) -> str:
    return " or ".join(", ".join(f"{k} {v}" for k, v in c) or "none" for c in sorted(calls)) or "-"


def summarize(res: dict) -> Section:
    table = [
        [
            "ZeRO",
            "measure",
            "opt_study all-reduces / measured step",
            "/ unmeasured step",
            "torch.distributed calls in end(), measured step",
            "torch.distributed calls in the whole step, measured",
        ]
    ]
    ok = True
    for r in res["results"]:
        m_ours, m_end, m_step = _per_step(r["steps"], True)
        u_ours, _, _ = _per_step(r["steps"], False)
        if m_ours:
            ok = ok and m_ours == {1}
        ok = ok and u_ours <= {1}
        table.append(
            [
                str(r["case"]["stage"]),
                str(r["case"]["measure"]),
                "/".join(map(str, sorted(m_ours))) or "-",
                "/".join(map(str, sorted(u_ours))) or "-",
                _fmt_calls(m_end),
                _fmt_calls(m_step),
            ]
        )
    notes = [
        f"{res['world']} ranks, {res['steps']} steps per case, tiny_lm (1 layer, width 32). "
        'Counts from `opt_study.distributed.COUNTERS["all_reduce"]` deltas around every '
        "StepMeasurer hook (begin, before_micro, at_boundary, end).",
        "The torch.distributed columns count every collective call in the process while the hook "
        "window is open, so they include DeepSpeed's own gradient reductions (of the step's "
        "backward, and on measured steps the probe's backward); those are not opt_study's and "
        "are listed only to make the separation visible. The loss-only step (every 0, "
        "norms off) still issues one all-reduce: the global mean loss.",
        "Evaluation (one all-reduce at each eval boundary) runs outside the measurer.",
    ]
    return Section(
        "6. Collectives per measured step (METRICS 7d)",
        "exactly one opt_study all-reduce per measured step",
        "PASS" if ok else "MISS",
        "1 all-reduce per measured step at ZeRO 0-3" if ok else "see table",
        table,
        notes,
    )


if __name__ == "__main__":
    main()
