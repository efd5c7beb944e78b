"""Which steps are measured, evaluated, logged and checkpointed: ONE frozen object.

``Cadence.from_spec(spec)`` reads every step cadence of a study (measure.every,
training.eval_every, training.log_every, training.checkpoint_every, training.steps) and both
the step hook (hook.StepMeasurer) and the trial loop (opt_study.trial.loop) ask it, so the
decisions cannot disagree. Every decision depends on the step number alone, so every rank takes
the same one and joins the same collectives.

Steps are 0-based loop indices; step t is the t-th optimizer step, after which t + 1 updates have
been applied, so "every k" means (t + 1) % k == 0 (``due``).

- evaluated: every eval_every-th step and the last one (the loop also evaluates when a trial
  stops or diverges early: a runtime event, not a cadence).
- measured: every measure.every-th step (0: never), and every evaluated step, since a scheduler
  may stop the trial at an evaluation (levanter-style declared hook); and every curvature step.
- curvature: every measure.curvature_every-th step (0: never): the step hook also measures the
  sharpness and the critical sharpness (opt_study.measure.sharpness). A curvature step is a
  measured step, so its row carries the probe and every raw sum too.
- logged: step % log_every == 0, every evaluated step, and every measured step: a measured row is
  never dropped, whatever log_every says.
- checkpointed: every checkpoint_every-th step (null in the spec: eval_every; 0: never).

measure.snapshot_every stays with its saver (opt_study.trial.snapshots.SnapshotSaver.is_due: ``due``
and the trial's last step, a runtime event), which asks ``due`` too.
"""

from __future__ import annotations

from dataclasses import dataclass


def due(step: int, every: int) -> bool:
    """Whether loop step ``step`` completes a multiple of ``every`` updates (never if every <= 0)."""
    return every > 0 and (step + 1) % every == 0


@dataclass(frozen=True)
class Cadence:
    steps: int  # training.steps
    eval_every: int  # training.eval_every (resolved: never null here)
    measure_every: int = 0  # measure.every; 0 = never measured
    log_every: int = 1  # training.log_every
    checkpoint_every: int = 0  # training.checkpoint_every resolved (null -> eval_every); 0 = never
    curvature_every: int = 0  # measure.curvature_every; 0 = no online curvature

    def __post_init__(self):
        if self.steps < 1 or self.eval_every < 1 or self.log_every < 1:
            raise ValueError(f"steps, eval_every and log_every must be >= 1: {self}")
        if min(self.measure_every, self.checkpoint_every, self.curvature_every) < 0:
            raise ValueError(f"measure_every, checkpoint_every and curvature_every must be >= 0: {self}")

    @classmethod
    def from_spec(cls, spec) -> Cadence:
        """The cadence of a study's trials (``spec``: an opt_study.config.Spec)."""
        t, m = spec.training, spec.measure
        return cls(
            steps=t.steps,
            eval_every=t.eval_every,
            measure_every=m.every,
            log_every=t.log_every,
            checkpoint_every=t.eval_every if t.checkpoint_every is None else t.checkpoint_every,
            curvature_every=m.curvature_every or 0,
        )

    def last(self, step: int) -> bool:
        return step + 1 == self.steps

    def evaluated(self, step: int) -> bool:
        """An evaluation (and a Tune report) is due after this step."""
        return due(step, self.eval_every) or self.last(step)

    def measured(self, step: int) -> bool:
        """The step hook measures this step (probe and every raw sum)."""
        return (self.measure_every > 0 and (due(step, self.measure_every) or self.evaluated(step))) or self.curvature(
            step
        )

    def curvature(self, step: int) -> bool:
        """The step hook also measures the sharpness and the critical sharpness (a measured step)."""
        return due(step, self.curvature_every)

    @property
    def measures(self) -> bool:
        """Whether any step of the trial is measured (the hook then keeps x_0)."""
        return self.measure_every > 0 or self.curvature_every > 0

    def logged(self, step: int) -> bool:
        """This step's row is written (the loop also writes when a trial ends early)."""
        return step % self.log_every == 0 or self.evaluated(step) or self.measured(step)

    def checkpointed(self, step: int) -> bool:
        """A DeepSpeed checkpoint is due after this step (the loop saves only while running)."""
        return due(step, self.checkpoint_every)
