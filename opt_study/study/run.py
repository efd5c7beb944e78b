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
import functools
import json
import os
from pathlib import Path

from opt_study.config import Spec
from opt_study.config.measure import batch_label
from opt_study.plan import TrialPlan, protocols
from opt_study.plan.planners import check_trial_ids, pending_plans, plan_trials, planner_for
from opt_study.results.sink import Sink
from opt_study.results.trials import read_trial_records
from opt_study.storage import layout, objectstore
from opt_study.storage.runlock import RunLock
from opt_study.study.asha import PerLabelASHA
from opt_study.study.resources import autoscaler_limits, check_fits, max_concurrent, trial_resources


class StudyInterrupted(KeyboardInterrupt):
    """The run was stopped (Ctrl-C, SIGUSR1) before its trials ended; `opt-study resume` goes on.
    A KeyboardInterrupt: Tune catches the signal itself and returns, this raises it again."""


def one_run_at_a_time(run):
    """`run(spec, ...)` holding the study's run lock: a second run of the same study is refused
    with StudyBusy naming the holder (opt_study.storage.runlock)."""

    @functools.wraps(run)
    def locked(spec: Spec, *args, **kwargs):
        with RunLock(spec.study_dir):
            return run(spec, *args, **kwargs)

    return locked


# ------------------------------------------------------------------------ storage
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


def write_spec(spec: Spec, source_text: str | None, replace: bool = False) -> None:
    """Keep the exact YAML the study was started from next to its results (provenance).

    A study with stored trial records keeps its spec.yaml (`check_unchanged` has refused a
    changed spec), unless `replace` (`--extend`, which only adds trials)."""
    d = spec.study_dir
    d.mkdir(parents=True, exist_ok=True)
    # the study's configuration (spec.yaml, plan.json, Ray's tuner.pkl under ray/) is its
    # owner's alone: nothing in it is meant for other users of the machine
    d.chmod(0o700)
    stored = bool(read_trial_records(d)) and layout.spec_path(d).is_file()
    if source_text is not None and (replace or not stored):
        layout.atomic_write_bytes(layout.spec_path(d), source_text.encode(), mode=0o600)
    plan = json.dumps([p.as_dict() for p in plan_trials(spec)], indent=1)
    layout.atomic_write_bytes(layout.plan_path(d), plan.encode(), mode=0o600)
    layout.ray_dir(d).mkdir(mode=0o700, exist_ok=True)


def check_unchanged(spec: Spec, extend: bool = False) -> bool:
    """Refuse (ConfigError, one line) to run `spec` on a study whose stored trials it would run
    differently; True when it adds trials (allowed with `extend` only). A study without trial
    records or without its spec.yaml has nothing to protect."""
    from opt_study.config import ConfigError
    from opt_study.plan.fingerprint import spec_changes
    from opt_study.validate import resolve_study

    d = spec.study_dir
    records = read_trial_records(d)
    if not records or not layout.spec_path(d).is_file():
        return False
    ch = spec_changes(resolve_study(d), spec, records)
    where = f"study {spec.study.name} ({d}) holds {len(records)} stored trial(s)"
    if ch.changed_trials:
        raise ConfigError(
            spec.source,
            ch.fields[0],
            f"{where} run with another configuration; changed: {', '.join(ch.fields[:6])} "
            f"({len(ch.changed_trials)} stored trial(s) affected, e.g. {ch.changed_trials[0]}); "
            "give the study a new study.name, or use --extend when only new trials are added",
        )
    if ch.added_trials and not extend:
        raise ConfigError(
            spec.source,
            "study.name",
            f"{where}; this spec adds {len(ch.added_trials)} trial(s) (e.g. {ch.added_trials[0]}); "
            "run with --extend to add them, or give the study a new study.name",
        )
    return bool(ch.added_trials)


def plan_table(spec: Spec) -> list[dict]:
    """Every trial the study will run, as rows (id, label, optimizer, hyperparameters, seed,
    phase, budget, status): planned trials, then crowded_valley's later reruns as an upper bound
    (one per optimizer, budget level and rerun seed, planned once the search finished), and
    steps_to_target's confirm trials (one per optimizer and rerun seed, once its tuning finished)."""
    records = read_trial_records(spec.study_dir)
    status = {r["trial_id"]: r.get("status", "") for r in records}
    plans = planner_for(spec).slots(spec, records)
    rows = [{**p.as_dict(), "status": status.get(p.trial_id, "planned")} for p in plans]
    if spec.search.protocol == "crowded_valley" and not any(p.phase == "rerun" for p in plans):
        for o in spec.optimizers:
            for level, _ in spec.search.budgets.levels():
                rows += [
                    {
                        "trial_id": f"{o.label}-rerun-<best {level}>-s{seed}",
                        "label": o.label,
                        "optimizer": o.name,
                        "hparams": {},
                        "seed": seed,
                        "index": -1,
                        "phase": "rerun",
                        "budget": level,
                        "target": None,
                        "status": "upper bound",
                    }
                    for seed in spec.search.rerun_seeds
                ]
    if spec.search.protocol == "steps_to_target":  # an optimizer's confirm phase, once its tuning finished
        planned = {p.label for p in plans if p.phase == "confirm"}
        rows += [
            {
                "trial_id": protocols.confirm_id(o.label, seed),
                "label": o.label,
                "optimizer": o.name,
                "hparams": {},
                "seed": seed,
                "index": -1,
                "phase": "confirm",
                "budget": "",
                "target": None,
                "status": "upper bound",
            }
            for o in spec.optimizers
            if o.label not in planned
            for seed in spec.search.rerun_seeds
        ]
    return rows


# ------------------------------------------------------------------------------- running a study
def ray_env() -> dict:
    """Environment for every Ray worker: CPU accelerator, shared compiled-op cache, quiet logs."""
    # PYTHONPATH: a study's own package named by import path (examples/custom_workload) must
    # import in every worker, also on a Ray cluster whose raylet did not inherit this shell's env
    keep = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS", "PYTHONPATH")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    if env.get("PYTHONPATH"):  # absolute: a worker's working directory is not the driver's
        env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in env["PYTHONPATH"].split(os.pathsep) if p)
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


def run_study(
    spec: Spec, source_text: str | None = None, out=None, extend: bool = False, verbose: bool = False
) -> dict:
    """Run (or continue) a study: only planned trials that have not finished are run.

    A study that already holds trial records runs only the spec it was started from
    (`check_unchanged`; `extend` allows a spec that adds trials and changes none).

    A protocol's later phases (crowded_valley's seed reruns of each optimizer's best
    configuration) can only be planned once earlier phases finished, so this runs batches of
    newly planned trials until nothing new appears; a trial is attempted once per call.

    The console shows progress only (opt_study.study.console); `verbose` keeps Ray's and
    MLflow's own banners and warnings.
    """
    from opt_study.study.console import quiet

    with quiet(verbose):
        return _run_study(spec, source_text, out, extend)


@one_run_at_a_time
def _run_study(spec: Spec, source_text: str | None, out, extend: bool) -> dict:
    import sys

    from opt_study.results.mlflow_queue import QueuedSink
    from opt_study.results.query import experiment_name
    from opt_study.validate import check_runnable

    out = out or sys.stdout
    # a resumed study or a spec from the API has not been through the CLI's checks
    check_runnable(spec)
    check_trial_ids(spec)
    objectstore.pull_study(spec.study_dir)  # an object-store root: start from what the store holds
    extended = check_unchanged(spec, extend)  # before anything is written
    sink: Sink = QueuedSink(spec.study_dir, spec.tracking_uri, experiment_name(spec.study.name))
    parent = sink.parent_run(
        spec.study.name, params=_study_params(spec), tags={"opt_study.workload": spec.workload.type}
    )
    attempted: set[str] = set()
    ran = 0
    while True:
        write_spec(spec, source_text, replace=extended)
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
    from opt_study.study.console import progress_board
    from opt_study.study.launch import trainable_for
    from opt_study.study.pool import close_keeper, make_keeper
    from opt_study.study.recorder import StudyRecorder

    ensure_ray(spec)
    check_fits(spec)  # before any trial is recorded: a trial that can never start would hang Tune
    resources = trial_resources(spec)
    board = progress_board()
    recorder = StudyRecorder(spec, todo, resources, sink, parent, out=out, board=board)
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
    concurrent = max_concurrent(spec, (autoscaler_limits() or ({}, []))[0])
    at_once = f"{concurrent} at a time" if concurrent else "as many at a time as the cluster holds"
    print(
        f"study {spec.study.name}: {len(todo)} trials to run, {at_once} "
        f"({resources['launcher']}, {resources['workers']} worker(s) x {resources['per_worker']})",
        file=out,
    )
    run_idx = _next_run_index(layout.ray_dir(spec.study_dir))
    pool = spec.scale.resolved_launcher == "pool"
    keeper = make_keeper(spec) if pool else None  # owns the pool's warm rank actors for this run
    tuner = tune.Tuner(
        trainable_for(spec, board, keeper),
        param_space={} if searcher else {"trial": tune.grid_search([p.as_dict() for p in todo])},
        tune_config=tune.TuneConfig(
            num_samples=len(todo) if searcher else 1,
            search_alg=searcher,
            max_concurrent_trials=concurrent,
            scheduler=PerLabelASHA(spec) if spec.search.asha else None,
            # the pool's trainable only drives a slot: reusing it saves a process boot per trial
            reuse_actors=pool,
        ),
        run_config=tune.RunConfig(
            name=f"run-{run_idx}",
            **objectstore.ray_storage(layout.ray_dir(spec.study_dir)),
            callbacks=[recorder],
            verbose=0,
            # in-process trials are retried by Tune; worker groups by Ray Train; pool trials by
            # their trainable (on a fresh slot)
            failure_config=tune.FailureConfig(
                max_failures=spec.training.max_failures if spec.scale.resolved_launcher == "in_process" else 0
            ),
        ),
    )
    try:
        tuner.fit()
    finally:
        ray.kill(board)
        if keeper is not None:
            close_keeper(keeper)  # also ends ranks a stopped trainable left running
        recorder.join()  # the trials' last records and MLflow writes (the recorder's worker)
    write_trials_table(spec.study_dir)  # once per batch: the records are the per-trial state
    if recorder.n_done < len(todo):  # Tune returns early only when a signal stopped it
        raise StudyInterrupted(
            f"study {spec.study.name} interrupted with {len(todo) - recorder.n_done} trial(s) unfinished; "
            f"continue with: opt-study resume {spec.study_dir}"
        )


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
        "curvature_every": spec.measure.curvature_every,
        # the batch the sharpness columns were measured on (the step's, or a fixed one)
        "curvature_batch": batch_label(spec.measure.curvature_batch),
    }
