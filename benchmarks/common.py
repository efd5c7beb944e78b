"""Shared helpers of the benchmark suite: environment, machine facts, load, medians, specs.

Every benchmark module runs as its own process (plain Python or one torchrun job of 2 ranks),
writes its raw numbers as JSON, and exposes `summarize(result) -> Section` for run_all.py, which
turns the sections into benchmarks/RESULTS.md. Nothing here imports torch or DeepSpeed at module
level, so run_all.py stays light; the timed code imports them inside its own `main()`.

Timing policy (this machine has 2 cores and other people run tests on it): every timed section
records `os.getloadavg()[0]` before it starts, variants are interleaved (rotated per repeat) so a
burst of foreign load hits each variant alike, and results are medians over repeats.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"

# The model every ">= 100 ms step" benchmark uses (parity, measured-every-10): a GPT-2 shaped
# tiny_lm of about 1.9M parameters. On this 2-core Xeon with one torch thread per rank and 2
# ranks at ZeRO-2 a step takes 150-350 ms (the spread is foreign load); run_all.py reports the
# measured median, which must stay >= 100 ms for the ratios to mean what the targets assume.
STEP_MODEL = {"type": "tiny_lm", "layers": 4, "heads": 4, "width": 192, "context": 64, "dropout": 0.1}
STEP_MICRO_BATCH = 16
MIN_STEP_S = 0.100


def child_env() -> dict[str, str]:
    """Environment for every benchmark child process: DeepSpeed on CPU with the cached comm op,
    Ray without auth tokens or telemetry, one OpenMP thread per rank (2 ranks on 2 cores), and
    the repository on the import path."""
    env = dict(os.environ)
    env.update(
        {
            "DS_ACCELERATOR": "cpu",
            "TORCH_EXTENSIONS_DIR": str(REPO / ".venv" / "torch_extensions"),
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_ENABLE_TELEMETRY": "false",
            "DO_NOT_TRACK": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
        }
    )
    return env


def load1() -> float:
    """The 1-minute load average (recorded before every timed section)."""
    return round(os.getloadavg()[0], 2)


def median(xs) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict:
    """The facts RESULTS.md opens with (no heavy imports: versions come from package metadata)."""
    mem = ""
    try:
        kb = int(
            next(
                line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
            ).split()[1]
        )
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "memory": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "deepspeed": _version("deepspeed"),
        "ray": _version("ray"),
        "load1_at_start": load1(),
    }


def write_json(path: str | os.PathLike, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, default=float))


def out_path() -> str:
    """The JSON file a benchmark writes: argv[1] (run_all.py passes one per benchmark)."""
    if len(sys.argv) < 2:
        raise SystemExit(f"usage: {sys.argv[0]} OUT.json")
    return sys.argv[1]


def study_dict(
    name: str,
    storage: str,
    *,
    workers: int,
    stage: int,
    steps: int,
    measure: dict,
    model: dict | None = None,
    micro_batch: int = STEP_MICRO_BATCH,
    launcher: str = "auto",
    opt: str = "adamw",
    lr: float = 1e-3,
) -> dict:
    """A study document (what a YAML file holds) for one trial of `model` at this scale.

    eval_every = steps, so evaluation runs once, after the last timed step."""
    return {
        "study": {"name": name, "storage": storage},
        "workload": dict(model or STEP_MODEL),
        "scale": {
            "workers": workers,
            "zero_stage": stage,
            "micro_batch_size": micro_batch,
            "launcher": launcher,
            "cpus_per_worker": 0.5 if workers > 1 else 1.0,
        },
        "training": {"steps": steps, "eval_every": steps},
        "optimizers": [{"name": opt, "params": {"lr": lr}}],
        "measure": measure,
    }


def window_rate(times_unix: list[float], warmup: int) -> float:
    """Steps per second over steps warmup..N-1, from each step's end time (time_unix of step k
    is taken when step k has finished, so steps w..N-1 span time_unix[w-1]..time_unix[N-1])."""
    n = len(times_unix)
    if warmup < 1 or n - warmup < 1:
        raise ValueError(f"need 1 <= warmup < {n}")
    return (n - warmup) / (times_unix[-1] - times_unix[warmup - 1])


def paired_ratios(runs: list[dict], variant: str, base: str, key: str = "steps_per_s") -> list[float]:
    """Per-repeat ratio variant / base of `key` (both runs of a repeat are adjacent in time)."""
    by = {(r["rep"], r["variant"]): r[key] for r in runs}
    reps = sorted({r["rep"] for r in runs})
    return [by[(k, variant)] / by[(k, base)] for k in reps if (k, variant) in by and (k, base) in by]


# ------------------------------------------------------------------------------ report pieces
@dataclass
class Section:
    """One benchmark's part of RESULTS.md."""

    title: str
    target: str
    verdict: str  # PASS, MISS, or INFO (no target)
    headline: str  # the number compared with the target, in words
    table: list[list[str]] = field(default_factory=list)  # first row = header
    notes: list[str] = field(default_factory=list)


def md_table(rows: list[list[str]]) -> str:
    if not rows:
        return ""
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows[1:]]
    return "\n".join(out)


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:
            return "nan"
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.0f}"
    return str(x)
