"""Spec -> a Ray Tune study: resources, per-optimizer ASHA, storage, resume.

The plan (every trial's id, optimizer, hyperparameters and seed) is expanded by
`opt_study.plan.planners`, seeded by `search.seed`, before Tune starts: it is stored in the
trials table, so a resumed study reuses it and a study's provenance never depends on Ray's
result objects. Tune then runs that list: a grid
over the planned trials, each launched as a TorchTrainer worker group or, for one-worker trials,
in the Tune trial's own process. Under `search.method: tpe` only the trial ids are fixed in
advance; opt_study.study.tpe_search.StudyTPE proposes the hyperparameters as results come in.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

from opt_study.config import Spec
from opt_study.plan import TrialPlan
from opt_study.plan.planners import pending_plans, plan_trials, planner_for
from opt_study.results.sink import Sink
from opt_study.results.trials import read_trial_records
from opt_study.storage import layout, objectstore
from opt_study.study.asha import PerLabelASHA


# ------------------------------------------------------------------------ resources and storage
def trial_resources(spec: Spec) -> dict:
    """What one trial holds while it runs (also recorded per trial as the compute it used)."""
    s = spec.scale
    per_worker = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.gpus_per_worker else {})}
    return {
        "launcher": s.resolved_launcher,
        "workers": s.workers,
        "per_worker": per_worker,
        "total_cpu": s.cpus_per_worker * s.workers,
        "total_gpu": s.gpus_per_worker * s.workers,
        "zero_stage": s.zero_stage,
        "precision": s.precision,
    }


def max_concurrent(spec: Spec, cluster: dict) -> int:
    """How many trials fit at once in the cluster's CPUs/GPUs (at least one)."""
    if spec.search.max_concurrent_trials:
        return spec.search.max_concurrent_trials
    r = trial_resources(spec)
    fits = [int(cluster.get("CPU", 1) // r["total_cpu"])] if r["total_cpu"] else []
    if r["total_gpu"]:
        fits.append(int(cluster.get("GPU", 0) // r["total_gpu"]))
    return max(1, min(fits) if fits else 1)


def describe(spec: Spec) -> dict:
    """A dry-run summary: trials, budgets, resources and where results go (under tpe every
    trial, proposed or not)."""
    plans = planner_for(spec).slots(spec, read_trial_records(spec.study_dir))
    return {
        "study": spec.study.name,
        "trials": len(plans),
        "per_optimizer": dict(collections.Counter(p.label for p in plans)),
        "resources_per_trial": trial_resources(spec),
        "study_dir": str(spec.study_dir),
        "mlflow": spec.tracking_uri,
    }


def write_spec(spec: Spec, source_text: str | None) -> None:
    """Keep the exact YAML the study was started from next to its results (provenance)."""
    d = spec.study_dir
    d.mkdir(parents=True, exist_ok=True)
    if source_text is not None:
        layout.atomic_write_bytes(layout.spec_path(d), source_text.encode())
    plan = json.dumps([p.as_dict() for p in plan_trials(spec)], indent=1)
    layout.atomic_write_bytes(layout.plan_path(d), plan.encode())


# ------------------------------------------------------------------------------- running a study
def ray_env() -> dict:
    """Environment for every Ray worker: CPU accelerator, shared compiled-op cache, quiet logs."""
    keep = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "opt_study" / "torch_extensions"))
    # Ray Train gives a worker group 60 s to start; on a loaded 2-core machine several groups
    # starting at once need longer.
    env.setdefault(
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    )
    env.update(
        {
            "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
            "PYTHONUNBUFFERED": "1",
            "MLFLOW_ENABLE_TELEMETRY": "false",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    return env


def ensure_ray(spec: Spec) -> None:
    import ray

    if ray.is_initialized():
        return
    for k, v in ray_env().items():
        os.environ.setdefault(k, v)  # set before ray.init: workers inherit the raylet's env
    kw = dict(
        runtime_env={"env_vars": ray_env()}, log_to_driver=False, include_dashboard=False, configure_logging=False
    )
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kw)
    else:
        ray.init(**kw)


def run_study(spec: Spec, source_text: str | None = None, out=None) -> dict:
    """Run (or continue) a study: only planned trials that have not finished are run.

    A protocol's later phases (crowded_valley's seed reruns of each optimizer's best
    configuration) can only be planned once earlier phases finished, so this runs batches of
    newly planned trials until nothing new appears; a trial is attempted once per call.
    """
    import sys

    from opt_study.results.mlflow_queue import QueuedSink
    from opt_study.results.query import experiment_name

    out = out or sys.stdout
    objectstore.pull_study(spec.study_dir)  # an object-store root: start from what the store holds
    sink: Sink = QueuedSink(spec.study_dir, spec.tracking_uri, experiment_name(spec.study.name))
    parent = sink.parent_run(
        spec.study.name, params=_study_params(spec), tags={"opt_study.workload": spec.workload.type}
    )
    attempted: set[str] = set()
    ran = 0
    while True:
        write_spec(spec, source_text)
        todo = [p for p in pending_plans(spec) if p.trial_id not in attempted]
        if not todo:
            break
        attempted |= {p.trial_id for p in todo}
        _run_batch(spec, todo, sink, parent, out)
        ran += len(todo)
    if ran == 0:
        print(f"study {spec.study.name}: every planned trial has finished; nothing to run", file=out)
    if not pending_plans(spec):  # every planned trial finished: close the study's parent run
        sink.end_parent(parent)
    flush_mlflow(sink, spec, out)
    return {"ran": ran, "parent_run_id": parent}


def flush_mlflow(sink: Sink, spec: Spec, out) -> None:
    """Deliver what the MLflow queue still holds; if the server is unreachable, say how to finish."""
    left = sink.drain()
    if left:
        print(
            f"MLflow: {left} write(s) not delivered yet, kept in {layout.mlflow_queue_dir(spec.study_dir)}; "
            f"deliver them with: opt-study sync-mlflow {spec.study_dir}",
            file=out,
        )


def _run_batch(spec: Spec, todo: list[TrialPlan], sink: Sink, parent: str | None, out) -> None:
    """One Tune run over `todo`: record them pending, then run them with the study's scheduler.
    Under tpe, `todo` are trial ids and StudyTPE proposes the hyperparameters: a trial is
    recorded when it starts (with them), and Tune asks the searcher `len(todo)` times."""
    import ray
    from ray import tune

    from opt_study.results.trials import read_trial_records, write_trials_table
    from opt_study.study.launch import trainable_for
    from opt_study.study.recorder import StudyRecorder

    resources = trial_resources(spec)
    recorder = StudyRecorder(spec, todo, resources, sink, parent, out=out)
    records = read_trial_records(spec.study_dir)
    searcher = None
    if spec.search.resolved_method == "tpe":
        from opt_study.study.tpe_search import StudyTPE

        searcher = StudyTPE(spec, records)
    known = {r["trial_id"] for r in records}
    for p in todo:
        if p.trial_id not in known and searcher is None:
            recorder.record(p, "pending")
    write_trials_table(spec.study_dir)
    ensure_ray(spec)
    concurrent = max_concurrent(spec, ray.cluster_resources())
    print(
        f"study {spec.study.name}: {len(todo)} trials to run, {concurrent} at a time "
        f"({resources['launcher']}, {resources['workers']} worker(s) x {resources['per_worker']})",
        file=out,
    )
    run_idx = _next_run_index(layout.ray_dir(spec.study_dir))
    tuner = tune.Tuner(
        trainable_for(spec),
        param_space={} if searcher else {"trial": tune.grid_search([p.as_dict() for p in todo])},
        tune_config=tune.TuneConfig(
            num_samples=len(todo) if searcher else 1,
            search_alg=searcher,
            max_concurrent_trials=concurrent,
            scheduler=PerLabelASHA(spec) if spec.search.asha else None,
        ),
        run_config=tune.RunConfig(
            name=f"run-{run_idx}",
            **objectstore.ray_storage(layout.ray_dir(spec.study_dir)),
            callbacks=[recorder],
            verbose=0,
            # in-process trials are retried by Tune; worker groups by Ray Train
            failure_config=tune.FailureConfig(
                max_failures=spec.training.max_failures if spec.scale.resolved_launcher == "in_process" else 0
            ),
        ),
    )
    tuner.fit()
    write_trials_table(spec.study_dir)


def _next_run_index(ray_dir: Path) -> int:
    """The number of the next `run-<i>` folder of Ray's experiment state (in the object store
    when the root is one: Ray writes there directly)."""
    m = objectstore.mirror_for(ray_dir.parent)
    if m is not None:
        names = set(m.children(ray_dir))
    else:
        names = {p.name for p in ray_dir.glob("run-*")} if ray_dir.exists() else set()
    return len([n for n in names if n.startswith("run-")])


def _study_params(spec: Spec) -> dict:
    return {
        "workload": spec.workload.type,
        "optimizers": ",".join(o.label for o in spec.optimizers),
        "seeds": ",".join(map(str, spec.study.seeds)),
        "samples": spec.search.samples,
        "zero_stage": spec.scale.zero_stage,
        "workers": spec.scale.workers,
        "steps": spec.training.steps,
        "measure_every": spec.measure.every,
    }
