"""Planners: (spec, trial records) -> the study's trials, one small protocol for every search.

A planner is chosen by name, never by scattered string tests: `planner_for(spec)` maps the
study's protocol (or, under protocol none, its search method) to one entry of PLANNERS.

- random / quasirandom (protocol none): every optimizer gets the same budget, `search.samples`
  draws (seeded random, or scrambled Sobol) times its grid, times the study's seeds; a
  study-level RNG seeded by search.seed and the optimizer's label keeps the others' draws when
  one is added.
- tpe: the trial ids are fixed, hyperparameters are proposed online (opt_study.plan.tpe).
- crowded_valley, algoperf_external, steps_to_target: opt_study.plan.protocols.

Every planner is a pure function of (spec, records): a resumed study plans the same trials.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

from opt_study.config import ConfigError, Spec
from opt_study.config.space import expand, expand_quasirandom, seed_of
from opt_study.plan import protocols, tpe
from opt_study.plan.trial_plan import TrialPlan
from opt_study.results.trials import DONE_STATUSES, read_trial_records
from opt_study.storage.names import MAX_NAME, RULE, is_safe_name


class Planner(Protocol):
    def plan(self, spec: Spec, records: list[dict]) -> list[TrialPlan]:
        """Every trial that can be planned now, with its hyperparameters (what plan.json lists)."""

    def slots(self, spec: Spec, records: list[dict]) -> list[TrialPlan]:
        """Every trial the study will run, planned or not (an unproposed tpe trial has empty
        hparams): what a run, a resume and `describe` count."""


@dataclass(frozen=True)
class GridPlanner:
    """protocol none: `search.samples` draws per optimizer times its grid, times the seeds."""

    quasirandom: bool

    def plan(self, spec: Spec, records: list[dict]) -> list[TrialPlan]:
        plans = []
        for opt in spec.optimizers:
            if self.quasirandom:
                configs = expand_quasirandom(opt.space, spec.search.samples, seed_of(spec.search.seed, opt.label))
            else:
                configs = expand(opt.space, spec.search.samples, random.Random(f"{spec.search.seed}:{opt.label}"))
            for i, hp in enumerate(configs):
                for seed in spec.study.seeds:
                    plans.append(
                        TrialPlan(
                            trial_id=f"{opt.label}-{i:03d}-s{seed}",
                            label=opt.label,
                            optimizer=opt.name,
                            hparams=hp,
                            seed=seed,
                            index=i,
                        )
                    )
        return plans

    def slots(self, spec: Spec, records: list[dict]) -> list[TrialPlan]:
        return self.plan(spec, records)


class TPEPlanner:
    def plan(self, spec: Spec, records: list[dict]) -> list[TrialPlan]:
        return tpe.proposed_plans(spec, records)

    def slots(self, spec: Spec, records: list[dict]) -> list[TrialPlan]:
        return [p for p, _ in tpe.slots(spec, records)]


class CrowdedValleyPlanner:
    def plan(self, spec: Spec, records: list[dict]) -> list[TrialPlan]:
        return protocols.plan_crowded_valley(spec, records)

    def slots(self, spec: Spec, records: list[dict]) -> list[TrialPlan]:
        return self.plan(spec, records)  # the rerun phase appears once the search has finished


class StepsToTargetPlanner:
    def plan(self, spec: Spec, records: list[dict]) -> list[TrialPlan]:
        return protocols.plan_steps_to_target(spec, records)

    def slots(self, spec: Spec, records: list[dict]) -> list[TrialPlan]:
        return self.plan(spec, records)  # an optimizer's confirm phase appears once its tuning finished


class AlgoPerfPlanner:
    def plan(self, spec: Spec, records: list[dict]) -> list[TrialPlan]:
        return protocols.plan_algoperf_external(spec)

    def slots(self, spec: Spec, records: list[dict]) -> list[TrialPlan]:
        return self.plan(spec, records)


PLANNERS: dict[str, Planner] = {
    "random": GridPlanner(quasirandom=False),
    "quasirandom": GridPlanner(quasirandom=True),
    "tpe": TPEPlanner(),
    "crowded_valley": CrowdedValleyPlanner(),
    "algoperf_external": AlgoPerfPlanner(),
    "steps_to_target": StepsToTargetPlanner(),
}


def planner_for(spec: Spec) -> Planner:
    """The study's planner: its protocol, or under protocol none its search method."""
    return PLANNERS[spec.search.protocol if spec.search.protocol != "none" else spec.search.resolved_method]


def plan_trials(spec: Spec, records: list[dict] | None = None) -> list[TrialPlan]:
    """Every trial of the study that can be planned now (default records: the study's own)."""
    return planner_for(spec).plan(spec, read_trial_records(spec.study_dir) if records is None else records)


def pending_plans(spec: Spec) -> list[TrialPlan]:
    """The study's trials not yet finished (DONE_STATUSES): what a run or resume runs."""
    records = read_trial_records(spec.study_dir)
    done = {r["trial_id"] for r in records if r.get("status") in DONE_STATUSES}
    return [p for p in planner_for(spec).slots(spec, records) if p.trial_id not in done]


def check_trial_ids(spec: Spec) -> None:
    """ConfigError naming ``optimizers[i].label`` if a trial id the study would use is not a safe
    name (opt_study.storage.names): a label legal on its own (128 characters) makes a longer id,
    which would fail the first write of a trial. The ids are those of every slot planned from no
    records; crowded_valley's later rerun ids are never longer than its one-shot rerun ids, which
    are among them (same seeds, a shorter tag); steps_to_target's confirm ids are added."""
    where = {o.label: i for i, o in enumerate(spec.optimizers)}
    later = []  # steps_to_target's confirm ids, planned once tuning finished
    if spec.search.protocol == "steps_to_target":
        later = [(o.label, protocols.confirm_id(o.label, s)) for o in spec.optimizers for s in spec.search.rerun_seeds]
    for label, trial_id in [(p.label, p.trial_id) for p in planner_for(spec).slots(spec, [])] + later:
        if not is_safe_name(trial_id):
            room = MAX_NAME - (len(trial_id) - len(label))
            raise ConfigError(
                spec.source,
                f"optimizers[{where[label]}].label",
                f"makes trial id {trial_id[:60]!r}... of {len(trial_id)} characters, not a safe name "
                f"({RULE}); shorten the label to at most {room} characters",
            )
