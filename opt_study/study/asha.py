"""ASHA that races trials of the same optimizer entry only (a fair, equal-budget race).

Asynchronous successive halving: Li et al. 2020, "A System for Massively Parallel
Hyperparameter Tuning", https://arxiv.org/abs/1810.05934.

One AsyncHyperBandScheduler per label; Tune sees a single FIFO-style scheduler that routes each
trial's results to its label's ASHA. A STOP decision is delivered cooperatively: a stop file
(opt_study.trial.control) that the trial's rank 0 sees on its next step, so the trial ends on
its own and Ray Train releases its workers; Tune is told to CONTINUE.
"""

from __future__ import annotations

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from opt_study.config import Spec
from opt_study.trial.control import request_stop


class PerLabelASHA(FIFOScheduler):
    def __init__(self, spec: Spec):
        super().__init__()
        a, t = spec.search.asha, spec.training
        evals = -(-t.steps // t.eval_every)  # at every eval_every-th step and at the last step
        self.study_dir = spec.study_dir
        self._by_label = {
            o.label: AsyncHyperBandScheduler(
                time_attr="training_iteration",
                metric=a.metric,
                mode="min",
                max_t=evals,
                grace_period=a.grace_period,
                reduction_factor=a.reduction_factor,
                stop_last_trials=False,
            )  # a trial that reaches max_t ends by itself
            for o in spec.optimizers
        }

    def _asha(self, trial):
        return self._by_label[trial.config["trial"]["label"]]

    def set_search_properties(self, metric, mode, **spec_):
        return True

    def on_trial_add(self, controller, trial):
        self._asha(trial).on_trial_add(controller, trial)

    def on_trial_result(self, controller, trial, result):
        decision = self._asha(trial).on_trial_result(controller, trial, result)
        if decision == TrialScheduler.STOP:
            request_stop(self.study_dir, trial.config["trial"]["trial_id"])
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, controller, trial, result):
        self._asha(trial).on_trial_complete(controller, trial, result)

    def on_trial_remove(self, controller, trial):
        self._asha(trial).on_trial_remove(controller, trial)


def per_optimizer_asha(spec: Spec) -> PerLabelASHA:
    """The study's scheduler under `search.asha`."""
    return PerLabelASHA(spec)
