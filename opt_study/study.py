"""Spec -> a Ray Tune study: the trial plan, resources, per-optimizer ASHA, storage, resume.

The plan (every trial's id, optimizer, hyperparameters and seed) is expanded here, seeded by
`search.seed`, before Tune starts: it is stored in the trials table, so a resumed study reuses it
and a study's provenance never depends on Ray's result objects. Tune then runs that list: a grid
over the planned trials, each launched as a TorchTrainer worker group or, for one-worker trials,
in the Tune trial's own process.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from opt_study.config import Spec
from opt_study.space import budget, expand
from opt_study.trial import TrialPlan


def plan_trials(spec: Spec) -> list[TrialPlan]:
    """Every optimizer gets the same budget: `search.samples` draws times its grid, times seeds.

    A study-level RNG seeded by search.seed and the optimizer's label makes the plan a pure
    function of the spec (adding an optimizer does not change the others' draws).
    """
    plans = []
    for opt in spec.optimizers:
        rng = random.Random(f"{spec.search.seed}:{opt.label}")
        for i, hp in enumerate(expand(opt.space, spec.search.samples, rng)):
            for seed in spec.study.seeds:
                tid = f"{opt.label}-{i:03d}-s{seed}"
                plans.append(TrialPlan(trial_id=tid, label=opt.label, optimizer=opt.name,
                                       hparams=hp, seed=seed, index=i))
    return plans


def trial_resources(spec: Spec) -> dict:
    """What one trial holds while it runs (also recorded per trial as the compute it used)."""
    s = spec.scale
    per_worker = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.gpus_per_worker else {})}
    return {"launcher": s.resolved_launcher, "workers": s.workers, "per_worker": per_worker,
            "total_cpu": s.cpus_per_worker * s.workers, "total_gpu": s.gpus_per_worker * s.workers,
            "zero_stage": s.zero_stage, "precision": s.precision}


def max_concurrent(spec: Spec, cluster: dict) -> int:
    """How many trials fit at once in the cluster's CPUs/GPUs (at least one)."""
    if spec.search.max_concurrent_trials:
        return spec.search.max_concurrent_trials
    r = trial_resources(spec)
    fits = [int(cluster.get("CPU", 1) // r["total_cpu"])] if r["total_cpu"] else []
    if r["total_gpu"]:
        fits.append(int(cluster.get("GPU", 0) // r["total_gpu"]))
    return max(1, min(fits) if fits else 1)


def storage_paths(spec: Spec) -> dict[str, Path]:
    d = spec.study_dir
    return {"study": d, "ray": d / "ray", "spec": d / "spec.json"}


def describe(spec: Spec) -> dict:
    """A dry-run summary: trials, budgets, resources and where results go."""
    plans = plan_trials(spec)
    return {"study": spec.study.name, "trials": len(plans),
            "per_optimizer": {o.label: budget(o.space, spec.search.samples) * len(spec.study.seeds)
                              for o in spec.optimizers},
            "resources_per_trial": trial_resources(spec), "study_dir": str(spec.study_dir),
            "mlflow": spec.tracking_uri}


def write_spec(spec: Spec, source_text: str | None) -> None:
    """Keep the exact YAML the study was started from next to its results (provenance)."""
    d = spec.study_dir
    d.mkdir(parents=True, exist_ok=True)
    if source_text is not None:
        tmp = d / ".spec.yaml.tmp"
        tmp.write_text(source_text)
        os.replace(tmp, d / "spec.yaml")
    tmp = d / ".plan.json.tmp"
    tmp.write_text(json.dumps([p.as_dict() for p in plan_trials(spec)], indent=1))
    os.replace(tmp, d / "plan.json")


# ------------------------------------------------------------------------------- running a study
def per_optimizer_asha(spec: Spec):
    """ASHA that compares trials of the same optimizer entry only (a fair, equal-budget race).

    One AsyncHyperBandScheduler per label; Tune sees a single FIFO-style scheduler that routes
    each trial's results to its label's ASHA. A STOP decision is delivered cooperatively: a stop
    file the trial's rank 0 sees on its next step (opt_study.trial.stop_path), so the trial ends
    on its own and Ray Train releases its workers; Tune is told to CONTINUE.
    """
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

    from opt_study.trial import stop_path

    a = spec.search.asha
    evals = spec.training.steps // spec.training.eval_every + (spec.training.steps % spec.training.eval_every > 0)

    class PerLabelASHA(FIFOScheduler):
        def __init__(self):
            super().__init__()
            self._by_label = {o.label: AsyncHyperBandScheduler(
                time_attr="training_iteration", metric=a.metric, mode="min", max_t=evals,
                grace_period=a.grace_period, reduction_factor=a.reduction_factor,
                stop_last_trials=False)  # a trial that reaches max_t ends by itself
                for o in spec.optimizers}

        def _asha(self, trial):
            return self._by_label[trial.config["trial"]["label"]]

        def set_search_properties(self, metric, mode, **spec_):
            return True

        def on_trial_add(self, controller, trial):
            self._asha(trial).on_trial_add(controller, trial)

        def on_trial_result(self, controller, trial, result):
            decision = self._asha(trial).on_trial_result(controller, trial, result)
            if decision == TrialScheduler.STOP:
                f = stop_path(spec.study_dir, trial.config["trial"]["trial_id"])
                f.parent.mkdir(parents=True, exist_ok=True)
                f.touch()
            return TrialScheduler.CONTINUE

        def on_trial_complete(self, controller, trial, result):
            self._asha(trial).on_trial_complete(controller, trial, result)

        def on_trial_remove(self, controller, trial):
            self._asha(trial).on_trial_remove(controller, trial)

    return PerLabelASHA()


def pending_plans(spec: Spec) -> list[TrialPlan]:
    """The planned trials not yet finished (completed, stopped or diverged): what a run/resume runs."""
    from opt_study.results.trials import read_trial_records

    done = {r["trial_id"] for r in read_trial_records(spec.study_dir)
            if r.get("status") in ("completed", "stopped", "diverged")}
    return [p for p in plan_trials(spec) if p.trial_id not in done]


def ray_env() -> dict:
    """Environment for every Ray worker: CPU accelerator, shared compiled-op cache, quiet logs."""
    keep = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "opt_study" / "torch_extensions"))
    # Ray Train gives a worker group 60 s to start; on a loaded 2-core machine several groups
    # starting at once need longer.
    env.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600"))
    env.update({"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "PYTHONUNBUFFERED": "1",
                "MLFLOW_ENABLE_TELEMETRY": "false", "TOKENIZERS_PARALLELISM": "false"})
    return env


def ensure_ray(spec: Spec) -> None:
    import ray

    if ray.is_initialized():
        return
    for k, v in ray_env().items():
        os.environ.setdefault(k, v)  # set before ray.init: workers inherit the raylet's env
    kw = dict(runtime_env={"env_vars": ray_env()}, log_to_driver=False, include_dashboard=False,
              configure_logging=False)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kw)
    else:
        ray.init(**kw)


def run_study(spec: Spec, source_text: str | None = None, out=None) -> dict:
    """Run (or continue) a study: only planned trials that have not finished are run."""
    import sys

    import ray
    from ray import tune

    from opt_study.launch import trainable_for
    from opt_study.recorder import StudyRecorder
    from opt_study.results.mlflow_sink import MlflowSink
    from opt_study.results.trials import read_trial_records, write_trials_table

    out = out or sys.stdout
    write_spec(spec, source_text)
    todo = pending_plans(spec)
    resources = trial_resources(spec)
    sink = MlflowSink(spec.tracking_uri, experiment_name=f"opt_study/{spec.study.name}")
    parent = sink.parent_run(spec.study.name, params=_study_params(spec),
                             tags={"opt_study.workload": spec.workload.type})
    recorder = StudyRecorder(spec, todo, resources, sink, parent, out=out)
    known = {r["trial_id"] for r in read_trial_records(spec.study_dir)}
    for p in todo:
        if p.trial_id not in known:
            recorder.record(p, "pending")
    write_trials_table(spec.study_dir)
    if not todo:
        print(f"study {spec.study.name}: every planned trial has finished; nothing to run", file=out)
        return {"ran": 0, "parent_run_id": parent}
    ensure_ray(spec)
    concurrent = max_concurrent(spec, ray.cluster_resources())
    print(f"study {spec.study.name}: {len(todo)} trials to run, {concurrent} at a time "
          f"({resources['launcher']}, {resources['workers']} worker(s) x {resources['per_worker']})", file=out)
    run_idx = len(list((spec.study_dir / "ray").glob("run-*"))) if (spec.study_dir / "ray").exists() else 0
    tuner = tune.Tuner(
        trainable_for(spec),
        param_space={"trial": tune.grid_search([p.as_dict() for p in todo])},
        tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=concurrent,
                                    scheduler=per_optimizer_asha(spec) if spec.search.asha else None),
        run_config=tune.RunConfig(name=f"run-{run_idx}", storage_path=str(spec.study_dir / "ray"),
                                  callbacks=[recorder], verbose=0,
                                  # in-process trials are retried by Tune; worker groups by Ray Train
                                  failure_config=tune.FailureConfig(
                                      max_failures=spec.training.max_failures
                                      if spec.scale.resolved_launcher == "in_process" else 0)),
    )
    tuner.fit()
    write_trials_table(spec.study_dir)
    if not pending_plans(spec):  # every planned trial finished: close the study's parent run
        sink.end_parent(parent)
    return {"ran": len(todo), "parent_run_id": parent}


def _study_params(spec: Spec) -> dict:
    return {"workload": spec.workload.type, "optimizers": ",".join(o.label for o in spec.optimizers),
            "seeds": ",".join(map(str, spec.study.seeds)), "samples": spec.search.samples,
            "zero_stage": spec.scale.zero_stage, "workers": spec.scale.workers,
            "steps": spec.training.steps, "measure_every": spec.measure.every}
