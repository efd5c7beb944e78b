"""Reproduce the assumption tables and figures of Tran, Zhang & Cutkosky (arXiv:2407.01825)
from a stored study.

    python analysis/assumption_tables.py STUDY_DIR [--select best|all] [--q 0.95] [--out DIR]

Prints, per optimizer x workload: the fraction of measured steps where each convexity inequality
holds / is violated / is indeterminate (within the noise floor), the effective smoothness ratio,
median and max local smoothness and the descent-lemma statistics with L̂ = max L_t, each as the
mean over seeds ± the 95% Student-t half-width; the (L0, L1) envelope; the checkpoint-replay
convexity ratios where the study has them. Writes the table as CSV and the figures (trajectories,
(L0, L1) scatter, replay) as PNG into DIR (default STUDY_DIR/analysis).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from opt_study.report import figures, tables
from opt_study.report.data import load
from opt_study.report.text import format_table

SHOWN = (
    "label",
    "workload",
    "config",
    "seeds",
    "n_measured",
    "frac_convexity_fwd_holds",
    "frac_convexity_fwd_violated",
    "frac_convexity_bwd_holds",
    "frac_convexity_bwd_violated",
    "smoothness_ratio",
    "smoothness_local_median",
    "smoothness_local_max",
    "frac_descent_holds",
    "frac_progress_predicted",
)


def _with_ci(rows: list[dict]) -> list[dict]:
    """Rows whose statistics read ``mean ± half-width`` (the paper's presentation)."""
    out = []
    for r in rows:
        shown = {}
        for k in SHOWN:
            v, ci = r.get(k), r.get(f"{k}_ci")
            if isinstance(v, float):
                shown[k] = f"{v:.3g}" + (f" ± {ci:.2g}" if isinstance(ci, float) and ci == ci else "")
            else:
                shown[k] = v
        out.append(shown)
    return out


def write_csv(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path)
    ap.add_argument(
        "--select",
        choices=("best", "all"),
        default="best",
        help="best: each optimizer's best configuration (default); all: every trial",
    )
    ap.add_argument("--q", type=float, default=0.95, help="quantile of the (L0, L1) envelope")
    ap.add_argument("--out", type=Path, help="output folder (default STUDY/analysis)")
    a = ap.parse_args(argv)
    out = a.out or a.study / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    data = load(a.study)
    try:
        rows = tables.assumption_table(data, select=a.select)
        print(f"Assumption table ({a.select} configuration per optimizer; mean ± 95% CI over seeds)")
        print(format_table(list(SHOWN), _with_ci(rows), len(rows)))
        write_csv(rows, out / "assumption_table.csv")
        env = tables.envelope_table(data, q=a.q)
        print(f"\n(L0, L1)-smoothness envelope, q = {a.q}")
        print(format_table(["label", "L0", "L1", "n", "frac_below"], env, len(env)))
        figures.trajectory_figure(data).savefig(out / "trajectories.png", dpi=100)
        figures.smoothness_figure(data, q=a.q).savefig(out / "smoothness.png", dpi=100)
        replay = tables.replay_table(data)
        if replay:
            print("\nCheckpoint replay: Σ⟨∇F(x_e), x_e − y⟩ / Σ(F(x_e) − F(y)) per reference y")
            print(format_table(list(replay[0]), replay, len(replay)))
            figures.replay_figure(data).savefig(out / "replay.png", dpi=100)
        else:
            print("\n(no replay/ dataset in this study)")
        status = tables.status_table(data)[-1]
        print("\ntrials: " + ", ".join(f"{k} {v}" for k, v in status.items() if k != "label" and v))
    finally:
        data.db.close()
    print(f"\nwrote {out}/assumption_table.csv and figures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
