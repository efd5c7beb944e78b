"""What a study will run, decided before any of it runs: `TrialPlan` and the planners.

No torch and no Ray here: the driver plans, records and reports trials without importing the
training stack. Import the planners from `opt_study.plan.planners`.
"""

from opt_study.plan.trial_plan import TrialPlan

__all__ = ["TrialPlan"]
