"""TPE search (`search.method: tpe`): Optuna's Tree-structured Parzen Estimator through Ray Tune's
Optuna integration (`ray.tune.search.optuna.OptunaSearch`), one TPE per optimizer label.

TPE: Bergstra, Bardenet, Bengio & Kégl 2011, "Algorithms for Hyper-Parameter Optimization",
https://papers.nips.cc/paper/2011/hash/86e8f7ab32cfd12577bc2619bc635690-Abstract.html

Random and quasirandom search plan every trial before Tune starts; TPE is adaptive, so here only
the trial IDS are fixed in advance and the hyperparameters are proposed online:

- Ids: `<label>-tpe-<i:03d>-s<seed>` for configuration i < `search.samples` of each label and
  each study seed. Configuration i is proposed once and run once per study seed (seeds stay a
  study dimension), its seeds handed out one after the other.
- Fair budget: every label has its own TPE (its own Optuna study over its own space, seeded by
  `search.seed` and the label) and gets exactly `samples` configurations; labels take turns, so
  they progress together. Per-label ASHA (opt_study.study.per_optimizer_asha) works unchanged.
- The objective TPE minimises for a configuration: the mean over its seeds of each trial's best
  evaluation loss (what crowded_valley ranks by). A diverged trial counts +inf (TPE then treats
  the configuration as among the worst, and moves away from it); a trial ASHA stopped counts its
  best evaluation loss so far (as Ray's OptunaSearch does with a stopped trial's last result);
  a crashed (failed) trial makes the configuration FAIL, which TPE ignores, until a resume
  re-runs it.
- Records: a TPE trial enters the trials table when it starts, with the hyperparameters as
  suggested (opt_study.study.recorder) and phase `tpe`; plan.json lists the trials proposed so far.
- Resume: configurations whose every seed finished (completed, stopped, diverged) are fed back
  to their label's TPE as completed trials with their recorded objective (history); a proposed
  configuration with unfinished seeds is enqueued with its recorded hyperparameters and only its
  unfinished seeds run; the remaining configurations are proposed with that history.
- Determinism: the proposals are a function of `search.seed` and of the results in the order
  each TPE receives them. With `max_concurrent_trials: 1` that order is fixed and a study is
  reproducible; with several trials at once it depends on which finish first (as for any
  asynchronous model-based search). Suggestions wait for nothing: a proposal uses the results
  finished so far.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from opt_study.config import OptimizerSpec, Spec
from opt_study.plan.trial_plan import TrialPlan
from opt_study.results.trials import DONE_STATUSES

PHASE = "tpe"
DONE = DONE_STATUSES  # finished: never re-run
METRIC = "objective"  # what each label's OptunaSearch is told; lower is better


def trial_id(label: str, index: int, seed: int) -> str:
    return f"{label}-tpe-{index:03d}-s{seed}"


def trial_value(status: str, best_eval_loss: Any) -> float | None:
    """One trial's contribution to its configuration's objective; None: no measurement (failed,
    or not finished). Diverged: +inf; otherwise the best evaluation loss (+inf if none is finite)."""
    if status == "diverged":
        return math.inf
    if status in ("completed", "stopped", "running"):  # running: Tune stopped it at a report
        ok = isinstance(best_eval_loss, (int, float)) and math.isfinite(best_eval_loss)
        return float(best_eval_loss) if ok else math.inf
    return None


def recorded(spec: Spec, opt: OptimizerSpec, index: int, by_id: Mapping[str, dict]) -> dict | None:
    """The hyperparameters configuration `index` of `opt` was proposed with (None: not yet)."""
    for seed in spec.study.seeds:
        hp = by_id.get(trial_id(opt.label, index, seed), {}).get("hparams")
        if isinstance(hp, dict):
            return hp
    return None


def slots(spec: Spec, records: list[dict]) -> list[tuple[TrialPlan, bool]]:
    """(plan, proposed) for every TPE trial of the study, label by label, configuration by
    configuration, seed by seed. A configuration not proposed yet has empty hparams."""
    by_id = {r["trial_id"]: r for r in records}
    out = []
    for opt in spec.optimizers:
        for i in range(spec.search.samples):
            hp = recorded(spec, opt, i, by_id)
            out += [
                (
                    TrialPlan(trial_id(opt.label, i, s), opt.label, opt.name, dict(hp or {}), s, i, phase=PHASE),
                    hp is not None,
                )
                for s in spec.study.seeds
            ]
    return out


def proposed_plans(spec: Spec, records: list[dict]) -> list[TrialPlan]:
    """The TPE trials whose configuration has been proposed (what plan.json lists)."""
    return [p for p, proposed in slots(spec, records) if proposed]
