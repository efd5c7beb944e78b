"""One planned trial: what the driver schedules and the trial loop runs (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrialPlan:
    """One trial of a study, fixed before the study starts (stored in the trials table)."""

    trial_id: str
    label: str  # the optimizer entry's label (ASHA compares trials of one label only)
    optimizer: str
    hparams: dict[str, Any]
    seed: int
    index: int  # position within its optimizer's budget
    # Tuning protocols (opt_study.study.plan_trials): "" under protocol none.
    phase: str = ""  # oneshot | search | rerun | oneshot_rerun (crowded_valley); external (algoperf_external); tpe
    budget: str = ""  # smallest budget level holding it (small...), or "study<k>" (algoperf)
    target: dict | None = None  # algoperf_external: {"metric": ..., "value": ...}

    def as_dict(self) -> dict:
        return {
            "trial_id": self.trial_id,
            "label": self.label,
            "optimizer": self.optimizer,
            "hparams": dict(self.hparams),
            "seed": self.seed,
            "index": self.index,
            "phase": self.phase,
            "budget": self.budget,
            "target": dict(self.target) if self.target else None,
        }
