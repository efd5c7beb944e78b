"""What a stored trial was run with, as a hash, and how a new spec differs from a study's stored one.

A trial id depends on its position (`sgd-001-s0`), not on its configuration, so editing the lr
grid of a finished study and running it again would reuse the ids with other hyperparameters.
Each trial record therefore carries `config_hash`, a hash of everything that decides what the
trial computes: optimizer, hyperparameters, seed, workload, scale, training and measure
(`trial_config`). `spec_changes` compares a new spec with the one a study was started from
(its `spec.yaml`) over the stored trials; `opt_study.study.run` refuses a changed study.
No torch, no Ray: the driver calls this before anything starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from opt_study.config import Spec
from opt_study.plan.planners import planner_for
from opt_study.plan.trial_plan import TrialPlan


def _plain(x: Any) -> Any:
    """JSON-able form of a config value (dataclasses as dicts, tuples as lists)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict) or hasattr(x, "items"):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def trial_config(spec: Spec, plan: TrialPlan) -> dict:
    """Everything that decides what trial `plan` computes under `spec` (hashed by config_hash)."""
    return {
        "optimizer": plan.optimizer,
        "hparams": _plain(plan.hparams),
        "seed": plan.seed,
        "workload": {"type": spec.workload.type, **(_plain(spec.workload.params) or {})},
        "scale": _plain(spec.scale),
        "training": _plain(spec.training),
        "measure": _plain(spec.measure),
    }


def config_hash(spec: Spec, plan: TrialPlan) -> str:
    """A short stable hash of `trial_config` (sha256 of its canonical JSON, 16 hex digits)."""
    text = json.dumps(trial_config(spec, plan), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SpecChanges:
    """How a new spec differs from a study's stored one, over the stored trials."""

    fields: tuple[str, ...]  # dotted config fields whose change alters a stored trial
    changed_trials: tuple[str, ...]  # stored trials the new spec would run differently (or not at all)
    added_trials: tuple[str, ...]  # trials only the new spec plans

    @property
    def only_added(self) -> bool:
        return not self.changed_trials and bool(self.added_trials)


def _diff(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if old == new else [path]


def spec_changes(old: Spec, new: Spec, records: list[dict]) -> SpecChanges:
    """Compare the trials `old` (the study's spec.yaml) and `new` plan, given the study's
    `records`. A stored trial (one with a record) is changed when the new spec drops it or
    gives it another `trial_config`; the fields named are the config fields that differ."""
    stored = {r["trial_id"]: r for r in records}
    old_plans = {p.trial_id: p for p in planner_for(old).slots(old, records)}
    new_plans = {p.trial_id: p for p in planner_for(new).slots(new, records)}
    fields: list[str] = []
    changed: list[str] = []
    for tid in sorted(stored):
        now = new_plans.get(tid)
        before = old_plans.get(tid)
        if now is None:
            changed.append(tid)
            fields += _seed_or_search_fields(old, new)
            continue
        new_cfg = trial_config(new, now)
        if before is not None:
            diff = _diff(trial_config(old, before), new_cfg, "")
        else:  # not planned by the stored spec (moved folder, lost spec): the record's own hash
            h = stored[tid].get("config_hash")
            diff = ["config"] if h and h != config_hash(new, now) else []
        if diff:
            changed.append(tid)
            fields += [_field_name(d, now) for d in diff]
    added = sorted(set(new_plans) - set(old_plans) - set(stored))
    return SpecChanges(tuple(dict.fromkeys(fields)), tuple(changed), tuple(added))


def _field_name(path: str, plan: TrialPlan) -> str:
    """A trial_config path as the YAML field a user edits."""
    head, _, rest = path.partition(".")
    if head == "hparams":
        return f"optimizers[{plan.label}].params.{rest}"
    if head == "workload":
        return f"workload.{rest}"
    if head in ("optimizer", "seed"):
        return f"optimizers[{plan.label}].name" if head == "optimizer" else "study.seeds"
    return path


def _seed_or_search_fields(old: Spec, new: Spec) -> list[str]:
    """Why a stored trial is no longer planned: the differing seeds, optimizers or search fields."""
    out = _diff({"seeds": list(old.study.seeds)}, {"seeds": list(new.study.seeds)}, "study")
    out += _diff(
        {o.label: {"name": o.name, "params": _plain(o.space)} for o in old.optimizers},
        {o.label: {"name": o.name, "params": _plain(o.space)} for o in new.optimizers},
        "optimizers",
    )
    out += _diff(_plain(old.search), _plain(new.search), "search")
    return out or ["the trial plan"]
