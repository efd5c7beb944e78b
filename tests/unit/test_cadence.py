"""opt_study.measure.cadence.Cadence: the one rule for measured / evaluated / logged /
checkpointed steps, shared by the step hook and the trial loop; and the hook's call protocol."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from opt_study.measure.cadence import Cadence, due
from opt_study.plan import TrialPlan


def _old_measured(step, every, eval_every, total):  # hook.py before the Cadence
    if every <= 0:
        return False
    return (step + 1) % every == 0 or (step + 1) % eval_every == 0 or step + 1 == total


@pytest.mark.parametrize(
    "steps, eval_every, every, log_every, ckpt",
    [
        (10, 10, 3, 4, None),
        (12, 5, 0, 1, 0),
        (7, 2, 1, 7, 3),
        (9, 4, 5, 2, None),
    ],
)
def test_rules(spec_factory, steps, eval_every, every, log_every, ckpt):
    spec = spec_factory(
        training={"steps": steps, "eval_every": eval_every, "log_every": log_every, "checkpoint_every": ckpt},
        measure={"every": every},
    )
    c = Cadence.from_spec(spec)
    assert c.checkpoint_every == (eval_every if ckpt is None else ckpt)
    for t in range(steps + 1):  # the hook also asks one step past the end (keep_prev)
        assert c.measured(t) == _old_measured(t, every, eval_every, steps), t
        assert c.evaluated(t) == ((t + 1) % eval_every == 0 or t + 1 == steps)
        assert c.checkpointed(t) == (bool(c.checkpoint_every) and (t + 1) % c.checkpoint_every == 0)
        # the old loop's rule, plus every measured step (rows were dropped with log_every > 1)
        assert c.logged(t) == (t % log_every == 0 or c.evaluated(t) or c.measured(t))
        if c.measured(t):
            assert c.logged(t)


def test_due_and_validation():
    assert [t for t in range(10) if due(t, 3)] == [2, 5, 8]
    assert not any(due(t, 0) for t in range(5))
    with pytest.raises(ValueError):
        Cadence(steps=5, eval_every=0)
    with pytest.raises(ValueError):
        Cadence(steps=5, eval_every=5, measure_every=-1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Cadence(steps=5, eval_every=5).steps = 6


def test_measured_rows_are_logged_whatever_log_every(spec_factory):
    """The trial loop writes every measured row (before the Cadence, log_every = 4 dropped the
    measured steps 2 and 5 of this trial), and the rows log_every asks for."""
    from opt_study.results.parquet import read_steps
    from opt_study.trial.loop import run_trial

    spec = spec_factory(
        training={"steps": 8, "eval_every": 8, "log_every": 4, "checkpoint_every": 0}, measure={"every": 3}
    )
    threads = torch.get_num_threads()  # run_trial sets scale.torch_threads for the process
    try:
        run_trial(spec, TrialPlan("t", "sgd", "sgd", {"lr": 0.1}, seed=0, index=0), report=lambda m: None)
    finally:
        torch.set_num_threads(threads)  # later tests' BLAS sums depend on the thread count
    rows = read_steps(spec.study_dir).to_pylist()
    assert [(r["step"], r["measured"]) for r in rows] == [(0, False), (2, True), (4, False), (5, True), (7, True)]
    assert all(r["ip_grad_update"] is not None for r in rows if r["measured"])


# ----------------------------------------------------------------------------- the hook protocol
def test_hook_protocol_is_enforced():
    from types import SimpleNamespace

    from test_names import _Engine  # tests/unit is on sys.path (rootdir conftest)

    from opt_study.config import MeasureConfig
    from opt_study.measure.hook import StepMeasurer

    model = torch.nn.Linear(2, 1)
    eng = _Engine(model)
    m = StepMeasurer(
        eng,
        SimpleNamespace(zero_stage=0, rank=0, world_size=1),
        MeasureConfig(every=1),
        "fp32",
        Cadence(steps=3, eval_every=3, measure_every=1),
    )
    batch = (torch.randn(4, 2), torch.randn(4, 1))
    loss_fn = lambda b: ((model(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    for bad in (lambda: m.before_micro(batch), m.at_boundary, lambda: m.end(0, torch.zeros(()), loss_fn)):
        with pytest.raises(RuntimeError, match="after construction"):
            bad()
    m.begin(0)
    with pytest.raises(RuntimeError, match="after begin"):
        m.at_boundary()  # no micro-batch yet
    with pytest.raises(RuntimeError, match="after begin"):
        m.begin(0)
    m.before_micro(batch)
    loss = loss_fn(batch)
    eng.backward(loss)
    m.at_boundary()
    with pytest.raises(RuntimeError, match="after at_boundary"):
        m.before_micro(batch)
    eng.step()
    with pytest.raises(RuntimeError, match=r"end\(1\) but begin\(0\)"):
        m.end(1, loss.detach(), loss_fn)
    row = m.end(0, loss.detach().double(), loss_fn)
    assert row["measured"] and row["loss"] == float(loss.detach())
    m.begin(1)  # the next step starts cleanly
