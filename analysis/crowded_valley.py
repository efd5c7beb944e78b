"""Crowded-Valley comparisons (Schmidt, Schneider & Hennig, arXiv:2007.01547) and AlgoPerf-style
performance profiles (Dahl et al., arXiv:2306.07179) from one or more stored studies.

    python analysis/crowded_valley.py STUDY_DIR [STUDY_DIR ...] [--out DIR]

For each study: the best validation loss per optimizer against the tuning budget (the number of
configurations tried, in the plan's order; box plots over seeds), and the table at full budget
(median / min / max over seeds, and how many seeds and trials had no finite loss: diverged,
failed, pending). Across the studies (one workload each): steps to reach each workload's target
and the performance profiles with their scores. Figures go to DIR (default: the first study's
analysis/ folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opt_study.report import figures, tables
from opt_study.report.data import load
from opt_study.report.text import format_table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("studies", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, help="output folder (default FIRST_STUDY/analysis)")
    a = ap.parse_args(argv)
    out = a.out or a.studies[0] / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    datas = [load(s) for s in a.studies]
    try:
        for d in datas:
            rows = tables.crowded_valley_table(d)
            print(f"{d.name} ({d.workload}): best validation loss at full tuning budget, over seeds")
            print(format_table(list(rows[0]) if rows else ["label"], rows, len(rows)))
            for label, by_budget in tables.budget_values(d).items():
                print(f"  {label}: " + "  ".join(f"b={b}: {sorted(v)}" for b, v in by_budget.items()))
            figures.crowded_valley_figure(d).savefig(out / f"crowded_valley_{d.name}.png", dpi=100)
            figures.loss_curves_figure(d).savefig(out / f"loss_curves_{d.name}.png", dpi=100)
            print()
        prof = tables.profile_table(datas)
        print("Steps until every seed of the best configuration reached the workload's target")
        print(format_table(["problem", "label", "target", "steps"], prof["rows"], len(prof["rows"])))
        print(
            "Performance-profile scores (area under ρ(τ), τ in [1, 4]; 1 = fastest everywhere): "
            + ", ".join(f"{k} {v:.3f}" for k, v in prof["scores"].items())
        )
        figures.profile_figure(prof).savefig(out / "profiles.png", dpi=100)
    finally:
        for d in datas:
            d.db.close()
    print(f"\nfigures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
