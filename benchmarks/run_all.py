"""Run the whole performance suite and rewrite benchmarks/RESULTS.md (`make bench`).

Each benchmark is its own process: a torchrun job of 2 ranks (`torchrun --standalone
--nproc_per_node 2`, a free rendezvous port, so it never collides with other jobs on the machine)
or plain Python, with the environment DeepSpeed needs on CPU (common.child_env). Each writes its
raw numbers as JSON; this script turns them into RESULTS.md with the machine description, every
benchmark's numbers, its target and PASS / MISS. A benchmark that fails is reported as ERROR with
the tail of its log, and the suite goes on.

    .venv/bin/python benchmarks/run_all.py                 # everything -> benchmarks/RESULTS.md
    .venv/bin/python benchmarks/run_all.py --only sums,collectives --output /tmp/r.md
    .venv/bin/python benchmarks/run_all.py --keep /tmp/raw # also keep raw JSON and logs there

Timings are never assertions in tests; this suite only reports.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, VENV_BIN, Section, child_env, fmt, load1, machine, md_table

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
# (key, module, runner): runner "torchrun" = one 2-rank job, "python" = one process.
BENCHMARKS = [
    ("parity", "bench_parity", "torchrun"),
    ("launcher", "bench_launcher", "python"),
    ("sums", "bench_sums", "python"),
    ("full_grad", "bench_full_grad", "torchrun"),
    ("measure_every", "bench_measure_every", "torchrun"),
    ("collectives", "bench_collectives", "torchrun"),
    ("ingest", "bench_ingest", "python"),
    ("assumption_table", "bench_assumption_table", "python"),
]
RANKS = 2
TIMEOUT_S = 600  # benchmark 5: 6 repeats of 4 trials, ~6 min on 2 cores
# Before each benchmark, wait (up to QUIET_WAIT_S) for the 1-minute load to fall below QUIET_LOAD:
# our own previous benchmark leaves up to ~2 that decays within a minute; more is someone else.
QUIET_LOAD, QUIET_WAIT_S = 3.0, 30


def command(module: str, runner: str, out_json: Path) -> list[str]:
    script = str(HERE / f"{module}.py")
    if runner == "torchrun":
        return [str(VENV_BIN / "torchrun"), "--standalone", f"--nproc_per_node={RANKS}", script, str(out_json)]
    return [sys.executable, script, str(out_json)]


def wait_quiet(limit_s: float) -> float:
    """Sleep until load1 < QUIET_LOAD or `limit_s` has passed; return the seconds waited."""
    t0 = time.time()
    while load1() >= QUIET_LOAD and time.time() - t0 < limit_s:
        time.sleep(5)
    return time.time() - t0


def run_one(key: str, module: str, runner: str, work: Path, quiet_s: float) -> tuple[Section, dict]:
    out_json, log = work / f"{key}.json", work / f"{key}.log"
    waited = wait_quiet(quiet_s)
    load, t0 = load1(), time.time()
    print(
        f"[{time.strftime('%H:%M:%S')}] {key}: running ({runner}, load1 {load}, waited {waited:.0f} s for quiet)",
        flush=True,
    )
    with open(log, "w") as f:
        try:
            rc = subprocess.run(
                command(module, runner, out_json),
                env=child_env(),
                cwd=REPO,
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=TIMEOUT_S,
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    secs = time.time() - t0
    meta = {"seconds": secs, "load1_before": load, "rc": rc, "waited_s": waited}
    mod = importlib.import_module(module)
    if rc != 0 or not out_json.exists():
        tail = log.read_text(errors="replace")[-2500:]
        title = (mod.__doc__ or key).strip().splitlines()[0]
        return Section(title, "-", "ERROR", f"exit {rc} after {secs:.0f} s", [], ["```\n" + tail + "\n```"]), meta
    section = mod.summarize(json.loads(out_json.read_text()))
    print(f"[{time.strftime('%H:%M:%S')}] {key}: {section.verdict} {section.headline} ({secs:.0f} s)", flush=True)
    return section, meta


def render(info: dict, done: list[tuple[str, Section, dict]], total_s: float) -> str:
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`.venv/bin/python benchmarks/run_all.py`); do not edit by hand above the "
        "targeted-runs line near the end (sections below it are kept). "
        "What each benchmark does and how to read it: benchmarks/README.md.",
        "",
        "## Machine",
        "",
        md_table(
            [
                ["", ""],
                ["date", info["date"]],
                ["CPU", f"{info['cpu']} ({info['cores']} cores)"],
                ["memory", info["memory"]],
                ["OS", info["os"]],
                ["Python", info["python"]],
                ["torch", info["torch"]],
                ["deepspeed", info["deepspeed"]],
                ["ray", info["ray"]],
                ["load1 at start", fmt(info["load1_at_start"])],
                ["suite wall time", f"{total_s:.0f} s"],
            ]
        ),
        "",
        "The machine is shared: the 1-minute load average is recorded before every timed section "
        "(our own 2 ranks add up to 2 to it); before each benchmark the suite waits up to "
        f"{QUIET_WAIT_S} s for it to fall below {QUIET_LOAD}; variants are interleaved and results "
        "are medians over repeats. A load well above 2 during a benchmark means other jobs "
        "shared the 2 cores, and its throughput ratios are then noise-dominated.",
        "",
        "## Summary",
        "",
        md_table(
            [["benchmark", "target", "result", "verdict", "run time s", "load1 before", "waited for quiet s"]]
            + [
                [
                    s.title,
                    s.target,
                    s.headline,
                    f"**{s.verdict}**",
                    f"{m['seconds']:.0f}",
                    fmt(m["load1_before"]),
                    f"{m['waited_s']:.0f}",
                ]
                for _, s, m in done
            ]
        ),
        "",
    ]
    for _, s, _m in done:
        lines += [f"## {s.title}", "", f"Target: {s.target}. Result: {s.headline}. **{s.verdict}**", ""]
        if s.table:
            lines += [md_table(s.table), ""]
        lines += [f"- {n}" if not n.startswith("```") else n for n in s.notes] + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated keys: " + ", ".join(k for k, _, _ in BENCHMARKS))
    ap.add_argument(
        "--output", help="markdown file to write (default: benchmarks/RESULTS.md; with --only, nothing unless given)"
    )
    ap.add_argument("--keep", help="directory to keep the raw JSON and logs in")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=QUIET_WAIT_S,
        help=f"max seconds to wait for load1 < {QUIET_LOAD} before each benchmark (0: never)",
    )
    a = ap.parse_args(argv)
    keys = [k for k, _, _ in BENCHMARKS]
    only = a.only.split(",") if a.only else keys
    unknown = sorted(set(only) - set(keys))
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; known: {keys}")
    os.environ.update(child_env())  # this process imports opt_study too (summaries, launcher)
    info, t0 = machine(), time.time()
    done = []
    with tempfile.TemporaryDirectory(prefix="optstudy-bench-") as tmp:
        work = Path(a.keep) if a.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for key, module, runner in BENCHMARKS:
            if key in only:
                section, meta = run_one(key, module, runner, work, a.quiet_wait)
                done.append((key, section, meta))
    text = render(info, done, time.time() - t0)
    out = Path(a.output) if a.output else (RESULTS if not a.only else None)
    if out is not None:
        out.write_text(text + kept_sections(out))
        print(f"wrote {out}")
    else:
        print(text)
    return 0 if all(s.verdict != "ERROR" for _, s, _ in done) else 1


# Sections below this line are targeted runs (one benchmark, by hand, for one issue): `make bench`
# rewrites what is above it and keeps them as they are.
TARGETED = "<!-- targeted runs: kept by make bench -->"


def kept_sections(path: Path) -> str:
    """The targeted-runs part of an existing RESULTS.md (from the TARGETED line on), or ""."""
    old = path.read_text() if path.exists() else ""
    i = old.find(TARGETED)
    return "\n" + old[i:] if i >= 0 else "\n" + TARGETED + "\n"


if __name__ == "__main__":
    sys.exit(main())
