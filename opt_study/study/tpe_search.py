"""The Tune side of TPE search: `StudyTPE`, a Ray Tune searcher with one Optuna TPE per label.

The trial ids, records and objective it works with are planned in `opt_study.plan.tpe` (see its
module doc for the whole scheme); this module only proposes hyperparameters as results come in.
"""

from __future__ import annotations

import collections
from typing import Any, Mapping

from ray.tune.search import Searcher

from opt_study.config import OptimizerSpec, Spec
from opt_study.config.space import SAMPLED, Domain, seed_of
from opt_study.plan.tpe import DONE, METRIC, PHASE, recorded, trial_id, trial_value
from opt_study.plan.trial_plan import TrialPlan


def optuna_distribution(domain: Domain):
    """A sampled `opt_study.config.space.Domain` -> the Optuna distribution TPE models.

    uniform -> FloatDistribution(lo, hi); loguniform -> FloatDistribution(lo, hi, log=True);
    int -> IntDistribution(lo, hi) (both included, as in the YAML); choice ->
    CategoricalDistribution(values). fixed and grid are not TPE dimensions (ValueError).
    """
    from optuna import distributions as od

    lo_hi = domain.values
    if domain.kind == "uniform":
        return od.FloatDistribution(*lo_hi)
    if domain.kind == "loguniform":
        return od.FloatDistribution(*lo_hi, log=True)
    if domain.kind == "int":
        return od.IntDistribution(*lo_hi)
    if domain.kind == "choice":
        return od.CategoricalDistribution(domain.values)
    raise ValueError(f"a {domain.kind} domain is not a TPE dimension")


def optuna_space(space: Mapping[str, Domain]) -> dict:
    """The sampled keys of `space`, in sorted order, as Optuna distributions."""
    return {k: optuna_distribution(d) for k, d in sorted(space.items()) if d.kind in SAMPLED}


class StudyTPE(Searcher):
    """The study's Tune searcher under `search.method: tpe`: one OptunaSearch (TPESampler) per
    label behind it, handing Tune `{"trial": TrialPlan.as_dict()}` configs (see the module doc).

    `records` are the study's trial records when the run starts (the resume state). `told`
    logs, per label, each (sampled params, objective) its TPE was given, in order (None: failed).
    """

    def __init__(self, spec: Spec, records: list[dict]):
        import optuna

        # Tune checks every result carries the searcher's metric: best_eval_loss is reported by
        # every trial (opt_study.trial); the objective itself is computed at completion.
        super().__init__(metric="best_eval_loss", mode="min")
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial otherwise
        self.spec, self.seeds = spec, tuple(spec.study.seeds)
        self.labels = [o.label for o in spec.optimizers]
        self._tpe: dict[str, Any] = {}  # label -> OptunaSearch
        self._fixed: dict[str, dict] = {}  # label -> its fixed hyperparameters
        self._fresh: dict[str, collections.deque] = {}  # label -> configuration indices never proposed
        self._values: dict[tuple[str, int], dict[int, float | None]] = {}  # (label, i) -> seed -> value
        self._queue: collections.deque[TrialPlan] = collections.deque()  # planned, not handed out
        self._live: dict[str, TrialPlan] = {}  # Tune trial id -> plan
        self.told: dict[str, list[tuple[dict, float | None]]] = {o.label: [] for o in spec.optimizers}
        self._turn = 0
        by_id = {r["trial_id"]: r for r in records}
        for opt in spec.optimizers:
            self._resume_label(opt, by_id)

    # ---------------------------------------------------------------------------- resume state
    def _resume_label(self, opt: OptimizerSpec, by_id: Mapping[str, dict]) -> None:
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        space = optuna_space(opt.space)
        self._fixed[opt.label] = {k: d.values[0] for k, d in opt.space.items() if d.kind == "fixed"}
        history, partial, fresh = [], [], collections.deque()
        for i in range(self.spec.search.samples):
            hp = recorded(self.spec, opt, i, by_id)
            if hp is None:
                fresh.append(i)
                continue
            vals = {}
            for s in self.seeds:
                r = by_id.get(trial_id(opt.label, i, s))
                if r and r.get("status") in DONE:
                    vals[s] = trial_value(r["status"], (r.get("summary") or {}).get("best_eval_loss"))
            self._values[(opt.label, i)] = vals
            (history if len(vals) == len(self.seeds) else partial).append((i, hp))
        sampler = TPESampler(
            seed=seed_of(self.spec.search.seed, opt.label, PHASE) % 2**32,
            n_startup_trials=self.spec.search.tpe_startup_trials,
        )
        tpe = OptunaSearch(
            space=space,
            metric=METRIC,
            mode="min",
            sampler=sampler,
            points_to_evaluate=[{k: hp[k] for k in space} for _, hp in partial] or None,
        )
        for i, hp in history:  # finished configurations: TPE's history, in proposal order
            tpe.add_evaluated_point({k: hp[k] for k in space}, self._objective(opt.label, i))
            self.told[opt.label].append(({k: hp[k] for k in space}, self._objective(opt.label, i)))
        for i, hp in partial:  # proposed, unfinished: enqueued above, asked here in the same order
            got = tpe.suggest(self._key(opt.label, i))
            if got != {k: hp[k] for k in space}:
                raise RuntimeError(f"{opt.label}: resumed configuration {i} came back as {got}, recorded {hp}")
            self._queue.extend(self._plan(opt, i, s, hp) for s in self.seeds if s not in self._values[(opt.label, i)])
        self._tpe[opt.label], self._fresh[opt.label] = tpe, fresh

    def _key(self, label: str, index: int) -> str:
        return f"{label}-tpe-{index:03d}"

    def _plan(self, opt: OptimizerSpec, index: int, seed: int, hp: dict) -> TrialPlan:
        return TrialPlan(trial_id(opt.label, index, seed), opt.label, opt.name, dict(hp), seed, index, phase=PHASE)

    def _objective(self, label: str, index: int) -> float:
        vals = self._values[(label, index)].values()
        return sum(vals) / len(vals)  # +inf if any seed diverged

    # ------------------------------------------------------------------------ Tune's interface
    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the spaces are the study's, set at construction

    def suggest(self, trial_id: str) -> dict | str | None:
        if not self._queue and not self._propose():
            return Searcher.FINISHED
        plan = self._queue.popleft()
        self._live[trial_id] = plan
        return {"trial": plan.as_dict()}

    def _propose(self) -> bool:
        """Ask the next label in turn that has configurations left for one; queue its seeds."""
        n = len(self.labels)
        for k in range(n):
            label = self.labels[(self._turn + k) % n]
            if self._fresh[label]:
                self._turn = (self._turn + k + 1) % n
                i = self._fresh[label].popleft()
                suggested = self._tpe[label].suggest(self._key(label, i))
                hp = dict(sorted({**self._fixed[label], **suggested}.items()))
                opt = next(o for o in self.spec.optimizers if o.label == label)
                self._values[(label, i)] = {}
                self._queue.extend(self._plan(opt, i, s, hp) for s in self.seeds)
                return True
        return False

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        plan = self._live.pop(trial_id, None)
        if plan is None:
            return
        r = result or {}
        vals = self._values[(plan.label, plan.index)]
        vals[plan.seed] = None if error else trial_value(r.get("status", "stopped"), r.get("best_eval_loss"))
        if len(vals) < len(self.seeds):
            return  # the configuration's other seeds are still to come
        tpe, key = self._tpe[plan.label], self._key(plan.label, plan.index)
        value = None if any(v is None for v in vals.values()) else self._objective(plan.label, plan.index)
        tpe.on_trial_complete(key, None if value is None else {METRIC: value}, error=value is None)
        params = {k: plan.hparams[k] for k in optuna_space(self._space(plan.label))}
        self.told[plan.label].append((params, value))

    def _space(self, label: str) -> Mapping[str, Domain]:
        return next(o.space for o in self.spec.optimizers if o.label == label)

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: a study resumes from its trials table, not from Tune's experiment
        state (the constructor rebuilds every TPE from the records)."""

    def restore(self, checkpoint_path: str) -> None:
        """See save()."""
