"""Issue 13: the convexity classes of an mlp_classify study under the first noise floor (u·|ℓ|) and
the current one (u·M, docs/METRICS.md §Noise floor), on the very same rows.

Run as `python benchmarks/bench_floor_classes.py [OUT.json]`: in-process single-rank trials,
fp32, 600 steps, every 2nd step measured, SGD and AdamW, on a two-hidden-layer MLP and on
softmax regression (`hidden: []`). The old classes are recomputed from the stored columns with
`metrics.noise_floor` without loss scales (the first version's formula at fp32 and s = 1).
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
from pathlib import Path

RUNS = (
    ("mlp_classify hidden [64,64]", {"type": "mlp_classify"}, {"sgd": 0.1, "adamw": 0.003}),
    ("softmax regression", {"type": "mlp_classify", "hidden": []}, {"sgd": 2.0, "adamw": 0.05}),
    ("softmax regression, low-loss tail", {"type": "mlp_classify", "hidden": []}, {"sgd": 8.0, "adamw": 0.3}),
)


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from opt_study.measure import metrics
    from opt_study.measure.names import SUM_NAMES
    from opt_study.plan import TrialPlan
    from opt_study.results.parquet import read_steps
    from opt_study.trial.loop import run_trial

    from specs import SpecFactory

    out = []
    for name, wl, lrs in RUNS:
        for opt, lr in lrs.items():
            f = SpecFactory(Path(tempfile.mkdtemp()))
            spec = f(
                study={"name": "floor"},
                workload=wl,
                scale={"workers": 1, "zero_stage": 0, "micro_batch_size": 32},
                training={"steps": 600, "eval_every": 600},
                optimizers=[{"name": opt, "params": {"lr": lr}}],
                measure={"every": 2},
            )
            run_trial(spec, TrialPlan("t", opt, opt, {"lr": lr}, seed=0, index=0), report=lambda m: None)
            rows = [r for r in read_steps(spec.study_dir).to_pylist() if r["measured"] and not r["flag"]]
            new, old = collections.Counter(), collections.Counter()
            for r in rows:
                sums = {k: r[k] for k in SUM_NAMES}
                floor_old = metrics.noise_floor(sums, r["loss"], r["loss_probe"], r["probe_s"], "fp32")
                for side in ("fwd", "bwd"):
                    new[r[f"cls_convexity_{side}"]] += 1
                    old[metrics.classify(r[f"convexity_gap_{side}"], floor_old)] += 1
            n = sum(new.values())
            rec = {
                "workload": name,
                "opt": opt,
                "lr": lr,
                "rows": len(rows),
                "min_loss": min(r["loss"] for r in rows),
                "old": {c: old[c] / n for c in metrics.CLASSES},
                "new": {c: new[c] / n for c in metrics.CLASSES},
            }
            print(json.dumps(rec), flush=True)
            out.append(rec)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
