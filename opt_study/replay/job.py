"""`opt-study replay`: checkpoint replay of a study's trials (docs/METRICS.md §Reference-point metrics).

Convexity gives ⟨∇F(x), x − y⟩ ≥ F(x) − F(y) for every reference y, including references known
only after training: the final iterate, x_0, any saved step. For each trial with snapshots
(opt_study.trial.snapshots), this launches a `torch.distributed.run` job at the trial's own
world size on this node; its ranks (opt_study.replay.worker) evaluate, for every
snapshot x_e, F(x_e), ∇F(x_e) and F(y) on the fixed evaluation sample set and store
⟨∇F(x_e), x_e − y⟩, F(x_e) − F(y), ‖x_e − y‖², ‖∇F(x_e)‖² and, with ``--hessian``, the top
Hessian eigenvalues and a Hutchinson trace (opt_study.results.replay_store).

This module stays import-light (the CLI imports it): torch is imported by the job's ranks only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from opt_study.config import FieldError
from opt_study.plan import TrialPlan
from opt_study.storage import layout
from opt_study.validate import resolve_study


@dataclass(frozen=True)
class HessianOptions:
    """Curvature estimates at every snapshot (opt_study.measure.curvature)."""

    lanczos_steps: int = 20  # Krylov dimension k (k Hessian-vector products, 2 gradients each)
    top: int = 3  # how many of the largest Ritz values to store
    hutchinson_samples: int = 8  # Rademacher probes for the trace (0: no trace)
    fd_eps: float = 3e-5  # central-difference step, relative: ε = fd_eps · max(‖x‖, 1)
    seed: int = 0  # random start vector and probes

    def __post_init__(self):
        if not 1 <= self.lanczos_steps <= 1000:
            raise FieldError("lanczos_steps", "must be an integer in [1, 1000]")
        if not 1 <= self.top <= self.lanczos_steps:
            raise FieldError("top", f"must be in [1, lanczos_steps={self.lanczos_steps}]")
        if not 0 <= self.hutchinson_samples <= 10_000:
            raise FieldError("hutchinson_samples", "must be an integer in [0, 10000]")
        if not 0.0 < self.fd_eps < 1.0:
            raise FieldError("fd_eps", "must be in (0, 1)")
        if self.seed < 0:
            raise FieldError("seed", "must be >= 0")


def load_trial(study_dir, trial_id: str):
    """(spec, plan) of a trial from the study dir's spec.yaml and plan.json."""
    study_dir = Path(study_dir).resolve()
    spec = resolve_study(study_dir)
    plan_file = layout.plan_path(study_dir)
    plans = [p for p in json.loads(plan_file.read_text()) if p["trial_id"] == trial_id]
    if not plans:
        raise ValueError(f"trial {trial_id!r} is not in {plan_file}")
    return spec, TrialPlan(**plans[0])


def run_replay(
    study_dir,
    trial_id: str,
    reference: str = "final",
    hessian: HessianOptions | None = None,
    capture: bool = False,
    timeout: float | None = None,
    objective: str = "eval",
) -> Path:
    """Replay one trial in a torchrun job at its own world size; returns the Parquet file.

    Raises ValueError / FileNotFoundError for a bad reference or a trial without snapshots
    (checked here, before anything starts) and RuntimeError if the job fails.
    """
    from opt_study.distributed import free_port
    from opt_study.trial import snapshots

    study_dir = Path(study_dir).resolve()
    layout.check_reference(reference), layout.check_objective(objective)
    ref_step = snapshots.resolve_reference(study_dir, trial_id, reference)
    world = snapshots.read_meta(study_dir, trial_id, ref_step)["world"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(world),
        "--master_port",
        str(free_port()),
        "-m",
        "opt_study.replay.worker",
        str(study_dir),
        trial_id,
        reference,
        "--objective",
        objective,
    ]
    if hessian is not None:
        cmd += [
            "--hessian",
            "--lanczos-steps",
            str(hessian.lanczos_steps),
            "--top",
            str(hessian.top),
            "--hutchinson",
            str(hessian.hutchinson_samples),
            "--fd-eps",
            repr(hessian.fd_eps),
            "--seed",
            str(hessian.seed),
        ]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, env=env, capture_output=capture, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or "")[-4000:] if capture else ""
        raise RuntimeError(f"replay of {trial_id} failed (exit {proc.returncode}) {tail}")
    return layout.replay_path(study_dir, trial_id, reference, objective)


def add_hessian_args(p: argparse.ArgumentParser) -> None:
    d = HessianOptions()
    p.add_argument(
        "--hessian",
        action="store_true",
        help="also the top Hessian eigenvalues (Lanczos) "
        "and a Hutchinson trace at every snapshot (2 gradients per Hessian-vector product)",
    )
    p.add_argument("--lanczos-steps", type=int, default=d.lanczos_steps)
    p.add_argument("--top", type=int, default=d.top, help="how many of the largest Ritz values to store")
    p.add_argument("--hutchinson", type=int, default=d.hutchinson_samples, help="trace probes (0: none)")
    p.add_argument("--fd-eps", type=float, default=d.fd_eps, help="finite-difference step / max(‖x‖, 1)")
    p.add_argument("--seed", type=int, default=d.seed)


def hessian_options(a) -> HessianOptions | None:
    if not a.hessian:
        return None
    return HessianOptions(
        lanczos_steps=a.lanczos_steps, top=a.top, hutchinson_samples=a.hutchinson, fd_eps=a.fd_eps, seed=a.seed
    )
