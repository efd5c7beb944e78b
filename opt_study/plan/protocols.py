"""Tuning protocols as trial plans: Crowded Valley (one-shot defaults, nested random-search
budgets, seed reruns of the best configurations) and AlgoPerf's external-tuning ruleset
(several studies of quasi-random trials), modded-nanogpt's steps-to-target optimizer track
(tune, then confirm the best configuration over seeds), plus the trial count validation checks.

Schmidt, Schneider, Hennig, "Descending through a Crowded Valley", https://arxiv.org/abs/2007.01547;
Dahl et al., "Benchmarking Neural Network Training Algorithms" (AlgoPerf),
https://arxiv.org/abs/2306.07179; Jordan et al., modded-nanogpt,
https://github.com/KellerJordan/modded-nanogpt. Each planner is a pure function of (spec, records).
"""

from __future__ import annotations

import random

from opt_study.config import OptimizerSpec, Spec
from opt_study.config.space import Domain, budget, expand, expand_quasirandom, seed_of
from opt_study.plan.trial_plan import TrialPlan
from opt_study.results.trials import TERMINAL_STATUSES


def protocol_space(opt: OptimizerSpec) -> dict[str, Domain]:
    """The space a protocol tunes: the YAML's params, or the registry entry's default `.space`
    when the YAML gives none (so "tune adam" needs no hand-written space)."""
    if opt.space:
        return dict(opt.space)
    if opt.default_space is None:
        raise ValueError(f"{opt.label}: the spec was not validated (opt_study.validate fills default_space)")
    return dict(opt.default_space)


def nested_draws(spec: Spec, opt: OptimizerSpec, space: dict[str, Domain], n: int, key: str) -> list[tuple[int, dict]]:
    """(j, config) for every grid point x n draws of the sampled keys; j is the draw's position.

    Prefix-stable: the first k draws of each grid point are the same for any n >= k (each grid
    point has its own RNG, or the same Sobol prefix), so smaller budgets nest in larger ones.
    """
    grid_keys = sorted(k for k, d in space.items() if d.kind == "grid")
    rest = {k: d for k, d in space.items() if d.kind != "grid"}
    out = []
    for g, point in enumerate(expand({k: space[k] for k in grid_keys}, 1, random.Random(0))):
        if spec.search.resolved_method == "quasirandom":
            draws = expand_quasirandom(rest, n, seed_of(spec.search.seed, opt.label, key))
        else:
            draws = expand(rest, n, random.Random(f"{spec.search.seed}:{opt.label}:{key}:{g}"))
        out.extend((j, {k: {**d, **point}[k] for k in sorted(space)}) for j, d in enumerate(draws))
    return out


def plan_crowded_valley(spec: Spec, records: list[dict]) -> list[TrialPlan]:
    """Crowded Valley's protocol (Schmidt, Schneider & Hennig 2021, https://arxiv.org/abs/2007.01547).

    Phase oneshot: each optimizer once per study seed at its registry defaults (a YAML scalar
    still fixes its key). Phase search: random search with nested budgets (search.budgets):
    draw j of a grid point belongs to every level whose sample count exceeds j, and `budget`
    names the smallest, so the small budget's trials are the first `small` of the medium's and
    only the largest level is trained. Phase oneshot_rerun (planned at once: the configuration
    is known): the one-shot configuration rerun with search.rerun_seeds, since the paper reports
    one-shot performance over seeds too (budget `oneshot`). Phase rerun (once every search trial
    is finished): the best configuration of each level, rerun with search.rerun_seeds (plan_reruns).
    """
    levels = spec.search.budgets.levels()
    n = levels[-1][1]
    plans, search, oneshot_reruns = [], [], []
    for opt in spec.optimizers:
        space = protocol_space(opt)
        defaults = opt.defaults or {}
        oneshot = {k: d.values[0] if d.kind == "fixed" else defaults[k] for k, d in sorted(space.items())}
        for seed in spec.study.seeds:
            plans.append(
                TrialPlan(
                    f"{opt.label}-oneshot-s{seed}",
                    opt.label,
                    opt.name,
                    oneshot,
                    seed,
                    0,
                    phase="oneshot",
                    budget="oneshot",
                )
            )
        oneshot_reruns += [
            TrialPlan(
                f"{opt.label}-oneshot-rerun-s{seed}",
                opt.label,
                opt.name,
                oneshot,
                seed,
                0,
                phase="oneshot_rerun",
                budget="oneshot",
            )
            for seed in spec.search.rerun_seeds
        ]
        for i, (j, hp) in enumerate(nested_draws(spec, opt, space, n, "search")):
            level = next(name for name, k in levels if j < k)
            for seed in spec.study.seeds:
                search.append(
                    TrialPlan(
                        f"{opt.label}-search-{level}-{i:03d}-s{seed}",
                        opt.label,
                        opt.name,
                        hp,
                        seed,
                        i,
                        phase="search",
                        budget=level,
                    )
                )
    return plans + search + oneshot_reruns + plan_reruns(spec, search, records)


def plan_reruns(spec: Spec, search: list[TrialPlan], records: list[dict]) -> list[TrialPlan]:
    """The rerun phase: [] until every search trial has a terminal record; then, per optimizer
    and budget level, the configuration with the lowest mean best_eval_loss over its completed
    trials (ties: the earlier draw), rerun once per search.rerun_seeds seed. A configuration
    that is best at several levels is rerun once; `budget` lists its levels ("small,medium")."""
    by_id = {r["trial_id"]: r for r in records}
    if not search or any(by_id.get(p.trial_id, {}).get("status") not in TERMINAL_STATUSES for p in search):
        return []
    levels = spec.search.budgets.levels()
    n = levels[-1][1]  # configurations are laid out grid point by grid point, n draws each
    plans = []
    for opt in spec.optimizers:
        mine = [p for p in search if p.label == opt.label]
        scores = config_scores(mine, by_id)
        best: dict[int, list[str]] = {}
        for name, k in levels:
            pool = [(s, i) for i, s in scores.items() if i % n < k]
            if pool:
                best.setdefault(min(pool)[1], []).append(name)
        for i, names in sorted(best.items()):
            hp = next(p.hparams for p in mine if p.index == i)
            for seed in spec.search.rerun_seeds:
                plans.append(
                    TrialPlan(
                        f"{opt.label}-rerun-{i:03d}-s{seed}",
                        opt.label,
                        opt.name,
                        hp,
                        seed,
                        i,
                        phase="rerun",
                        budget=",".join(names),
                    )
                )
    return plans


def config_scores(plans: list[TrialPlan], by_id: dict[str, dict], key: str = "best_eval_loss") -> dict[int, float]:
    """Configuration index -> mean summary[key] (best_eval_loss) over its completed, finite
    trials (a configuration with none is left out: diverged or failed everywhere)."""
    import math

    vals: dict[int, list[float]] = {}
    for p in plans:
        r = by_id.get(p.trial_id, {})
        v = (r.get("summary") or {}).get(key)
        if r.get("status") == "completed" and isinstance(v, (int, float)) and math.isfinite(v):
            vals.setdefault(p.index, []).append(float(v))
    return {i: sum(v) / len(v) for i, v in vals.items()}


def plan_algoperf_external(spec: Spec) -> list[TrialPlan]:
    """AlgoPerf's external tuning ruleset (Dahl et al. 2023, https://arxiv.org/abs/2306.07179):
    `search.studies` independent studies of `search.samples` quasi-random trials each (a Sobol
    seed per study), every trial carrying the target; the score of a study is its fastest
    time to target, and of the workload the median over studies (computed from the trials)."""
    target = {"metric": spec.search.target.metric, "value": spec.search.target.value}
    plans = []
    for opt in spec.optimizers:
        space = protocol_space(opt)
        for k in range(spec.search.studies):
            configs = expand_quasirandom(space, spec.search.samples, seed_of(spec.search.seed, opt.label, "study", k))
            for i, hp in enumerate(configs):
                for seed in spec.study.seeds:
                    plans.append(
                        TrialPlan(
                            f"{opt.label}-external-study{k}-{i:03d}-s{seed}",
                            opt.label,
                            opt.name,
                            hp,
                            seed,
                            i,
                            phase="external",
                            budget=f"study{k}",
                            target=target,
                        )
                    )
    return plans


def plan_steps_to_target(spec: Spec, records: list[dict]) -> list[TrialPlan]:
    """The steps-to-target protocol, after modded-nanogpt's optimizer track
    (https://github.com/KellerJordan/modded-nanogpt: a record is a configuration whose runs
    reach the target validation loss with p < 0.01 over seeds).

    Phase tune: per optimizer `search.samples` configurations of its space (the YAML's params,
    else the registry's default space; `search.method` random or quasirandom), once per study
    seed, every trial trained to the end of its schedule (no early stopping: asha is refused).
    Phase confirm (per optimizer, once each of its tune trials has a terminal record): the
    configuration with the lowest mean final validation loss, rerun once per `search.rerun_seeds`
    seed; opt_study.report.significance scores those trials against `search.target`.
    """
    by_id = {r["trial_id"]: r for r in records}
    tunes, confirms = [], []  # every tune trial first: a later phase never moves an id's position
    for opt in spec.optimizers:
        space = protocol_space(opt)
        if spec.search.resolved_method == "quasirandom":
            configs = expand_quasirandom(space, spec.search.samples, seed_of(spec.search.seed, opt.label, "tune"))
        else:
            configs = expand(space, spec.search.samples, random.Random(f"{spec.search.seed}:{opt.label}:tune"))
        tune = [
            TrialPlan(f"{opt.label}-tune-{i:03d}-s{seed}", opt.label, opt.name, hp, seed, i, phase="tune")
            for i, hp in enumerate(configs)
            for seed in spec.study.seeds
        ]
        tunes += tune
        confirms += plan_confirmation(spec, tune, by_id)
    return tunes + confirms


def confirm_id(label: str, seed: int) -> str:
    """The trial id of `label`'s confirm trial with `seed` (its configuration is in `index`)."""
    return f"{label}-confirm-s{seed}"


def plan_confirmation(spec: Spec, tune: list[TrialPlan], by_id: dict[str, dict]) -> list[TrialPlan]:
    """One optimizer's confirm phase: [] until each of its tune trials is terminal (or when none
    completed with a finite final validation loss); else its best configuration (lowest mean
    summary.final_eval_loss over seeds, ties: the earlier draw) once per rerun seed."""
    if any(by_id.get(p.trial_id, {}).get("status") not in TERMINAL_STATUSES for p in tune):
        return []
    scores = config_scores(tune, by_id, "final_eval_loss")
    if not scores:
        return []
    best = min((s, i) for i, s in scores.items())[1]
    p = next(p for p in tune if p.index == best)
    return [
        TrialPlan(confirm_id(p.label, seed), p.label, p.optimizer, p.hparams, seed, best, phase="confirm")
        for seed in spec.search.rerun_seeds
    ]


def planned_trial_count(spec: Spec) -> int:
    """How many trials the study plans in all (crowded_valley: its reruns at most), without
    expanding anything: what config validation compares with MAX_TRIALS."""
    s, seeds, total = spec.search, len(spec.study.seeds), 0
    for opt in spec.optimizers:
        space = opt.space if s.protocol == "none" else protocol_space(opt)
        if s.protocol == "crowded_valley":  # oneshot, search, oneshot_rerun, rerun (one per level at most)
            levels = s.budgets.levels()
            total += seeds * (1 + budget(space, levels[-1][1])) + (1 + len(levels)) * len(s.rerun_seeds)
        elif s.protocol == "steps_to_target":  # tune, then one configuration's confirmation
            total += budget(space, s.samples) * seeds + len(s.rerun_seeds)
        else:
            total += budget(space, s.samples) * seeds * (s.studies if s.protocol == "algoperf_external" else 1)
    return total
