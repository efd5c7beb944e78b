"""What one trial of a study holds, and whether the connected Ray cluster can ever place it.

`trial_resources` is recorded per trial; `max_concurrent` bounds Tune's trials at once (the
user's cap, else the autoscaler's maximum cluster, else none); `check_fits` refuses, as a
ConfigError naming the field, a trial no node or no cluster size could ever hold, instead of a
run that waits forever. The autoscaler's limits come from Ray's private state API, read here
only and treated as optional.
"""

from __future__ import annotations

from opt_study.config import ConfigError, Spec


def trial_resources(spec: Spec) -> dict:
    """What one trial holds while it runs (also recorded per trial as the compute it used)."""
    s = spec.scale
    per_worker = s.ray_resources_per_worker
    return {
        "launcher": s.resolved_launcher,
        "workers": s.workers,
        "per_worker": per_worker,
        "total_cpu": s.cpus_per_worker * s.workers,
        "total_gpu": s.gpus_per_worker * s.workers,
        "zero_stage": s.zero_stage,
        "precision": s.precision,
        "device": s.device,
    }


def max_concurrent(spec: Spec, autoscaler_max: dict | None) -> int | None:
    """The bound given to Tune on trials at once: `search.max_concurrent_trials` (the user's cap),
    else how many trials the autoscaler's maximum cluster holds (``autoscaler_max``: its maximum
    CPUs/GPUs), else None: Tune queues every ready trial and runs as many as the cluster holds
    now. A bound taken from the cluster's size at start would hold an autoscaling cluster at its
    start size: only pending trials make the autoscaler add nodes."""
    if spec.search.max_concurrent_trials:
        return spec.search.max_concurrent_trials
    if not autoscaler_max:
        return None
    r = trial_resources(spec)
    fits = [int(autoscaler_max.get("CPU", 0) // r["total_cpu"])] if r["total_cpu"] else []
    if r["total_gpu"]:
        fits.append(int(autoscaler_max.get("GPU", 0) // r["total_gpu"]))
    return max(1, min(fits)) if fits else None


def autoscaler_limits() -> tuple[dict, list[dict]] | None:
    """(maximum CPUs/GPUs, resources of each node type that may be added) of the connected Ray
    cluster's autoscaler, or None without one. Read from the GCS through Ray's own state API:
    private, so any failure counts as no autoscaler (the nodes alive now are then all we know)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()  # None without an autoscaler
        if config is None:
            return None
        maxima = state.get_max_resources_from_cluster_config() or {}
        groups = [dict(g.resources) for g in config.node_group_configs if g.max_count != 0]
    except Exception:  # noqa: BLE001 - an optional refinement, never a cause to fail
        return None
    return {k: float(maxima.get(k, 0)) for k in ("CPU", "GPU")}, groups


def cluster_limits() -> tuple[dict, dict]:
    """(total, largest node): the CPUs and GPUs the connected Ray cluster can ever provide, in
    all and on its largest node. With an autoscaler, its configured node types and maxima
    count too (`autoscaler_limits`)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    total = {k: float(ray.cluster_resources().get(k, 0)) for k in ("CPU", "GPU")}
    largest = {k: float(max((n.get(k, 0) for n in nodes), default=0)) for k in ("CPU", "GPU")}
    maxima, groups = autoscaler_limits() or ({}, [])
    for k in ("CPU", "GPU"):
        total[k] = max(total[k], float(maxima.get(k, 0)))
        largest[k] = max([largest[k], *(float(g.get(k, 0)) for g in groups)])
    return total, largest


def fit_problem(spec: Spec, total: dict, largest: dict) -> tuple[str, str] | None:
    """(field, why) if one trial of ``spec`` can never be placed on a cluster with ``total``
    CPUs/GPUs whose largest node has ``largest``: Tune would wait for it forever. None if it fits."""
    s = spec.scale
    cluster = f"this Ray cluster can provide {total['CPU']:g} CPU(s) and {total['GPU']:g} GPU(s) in all"
    if s.gpus_per_worker > largest["GPU"]:
        return "scale.gpus_per_worker", f"each worker needs {s.gpus_per_worker} GPU but no node has one ({cluster})"
    if s.cpus_per_worker > largest["CPU"]:
        return (
            "scale.cpus_per_worker",
            f"each worker needs {s.cpus_per_worker:g} CPUs; the largest node has {largest['CPU']:g} ({cluster})",
        )
    for k, per in (("CPU", s.cpus_per_worker), ("GPU", s.gpus_per_worker)):
        if s.workers * per > total[k]:
            return (
                "scale.workers",
                f"one trial needs {s.workers} workers x {per:g} {k} = {s.workers * per:g}; {cluster}",
            )
    return None


def check_fits(spec: Spec) -> None:
    """ConfigError (exit 2, one line) instead of a run that waits forever for resources."""
    problem = fit_problem(spec, *cluster_limits())
    if problem:
        raise ConfigError(spec.source, problem[0], f"{problem[1]}; the trial could never start")
