"""`make bench` rewrites benchmarks/RESULTS.md but keeps the targeted runs below its marker line
(issue notes cite them), so a full run never drops a hand-run benchmark's numbers."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import run_all  # noqa: E402  (benchmarks/ is scripts, not a package)


def test_targeted_sections_survive_a_rewrite(tmp_path):
    out = tmp_path / "RESULTS.md"
    assert run_all.kept_sections(out) == "\n" + run_all.TARGETED + "\n"  # a first write adds the marker
    out.write_text("# old generated part\n\n" + run_all.TARGETED + "\n\n## Issue 13: numbers\n| a | 1 |\n")
    assert run_all.kept_sections(out) == "\n" + run_all.TARGETED + "\n\n## Issue 13: numbers\n| a | 1 |\n"


def test_the_committed_results_have_the_marker():
    assert run_all.TARGETED in (BENCH / "RESULTS.md").read_text()
