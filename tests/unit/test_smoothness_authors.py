"""smoothness_authors (docs/METRICS.md §Derived metrics) against a direct transcription of the
authors' formula on full tensors, in one process: the real StepMeasurer on a tiny MLP, and beside
it plain autograd on a copy of the model at x_t and x_{t+1} on the same batch.

The transcription is tranhp98/some_projects, test_properties/transformers/run_clm.py lines
340-346 (``compute_smoothness``), with their current_grad = ∇f(w_t; x_{t−1}) = our g⁺_t and
prev_grad = ∇f(w_{t−1}; x_{t−1}) = our g_t (s = 1)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from opt_study.config import MeasureConfig
from opt_study.measure import sums
from opt_study.measure.cadence import Cadence
from opt_study.measure.hook import StepMeasurer
from opt_study.measure.reference import reference_tensor_norms


def compute_smoothness(current_param, current_grad, prev_param, prev_grad):
    """The authors' code, verbatim in its arithmetic: per-tensor norms, summed, then divided."""
    sum_num = 0
    sum_denom = 0
    for i in range(len(current_param)):
        sum_num += torch.norm(current_grad[i] - prev_grad[i])
        sum_denom += torch.norm(current_param[i] - prev_param[i])
    return sum_num / sum_denom


class _Engine:
    """Just enough of a one-process ZeRO-0 fp32 engine for StepMeasurer (as tests/unit/test_names.py)."""

    def __init__(self, model: torch.nn.Module):
        self.module, self.device = model, torch.device("cpu")
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)

    def gradient_accumulation_steps(self) -> int:
        return 1

    def zero_optimization_stage(self) -> int:
        return 0

    def set_gradient_accumulation_boundary(self, value) -> None:
        pass

    def backward(self, loss) -> None:
        loss.backward()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=False)

    def step(self) -> None:
        self.optimizer.step()
        self.zero_grad()


def _grads(model, batch, loss_fn) -> list[torch.Tensor]:
    """∇f on ``batch`` at a copy of ``model`` (plain autograd, nothing of the engine)."""
    m = copy.deepcopy(model)
    m.zero_grad()
    loss_fn(m, batch).backward()
    return [p.grad.detach().clone() for p in m.parameters()]


@pytest.mark.parametrize("fused", ["1", "0"])
def test_smoothness_authors_is_their_formula(monkeypatch, fused):
    monkeypatch.setenv("OPT_STUDY_FUSED_SUMS", fused)  # the C++ kernel and the torch path
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    eng = _Engine(model)
    steps = 4
    m = StepMeasurer(
        eng,
        SimpleNamespace(zero_stage=0, rank=0, world_size=1),
        MeasureConfig(every=1),
        "fp32",
        Cadence(steps=steps, eval_every=steps, measure_every=1),
    )
    loss_of = lambda mod, b: ((mod(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    loss_fn = lambda b: loss_of(eng.module, b)  # noqa: E731
    checked = 0
    for t in range(steps):
        batch = (torch.randn(8, 5), torch.randn(8, 3))
        prev_param = [p.detach().clone() for p in model.parameters()]
        prev_grad = _grads(model, batch, loss_of)  # g_t = ∇f(x_t; B_t)
        m.begin(t)
        m.before_micro(batch)
        loss = loss_fn(batch)
        eng.backward(loss)
        m.at_boundary()
        eng.step()
        row = m.end(t, loss.detach().double(), loss_fn)
        current_param = [p.detach().clone() for p in model.parameters()]
        current_grad = _grads(model, batch, loss_of)  # g⁺_t = ∇f(x_{t+1}; B_t)
        theirs = float(compute_smoothness(current_param, current_grad, prev_param, prev_grad))
        assert row["probe_s"] == 1.0
        assert row["smoothness_authors"] == pytest.approx(theirs, rel=1e-5)
        # the raw columns are the two sums of their formula, and the float64 reference agrees
        flat = lambda ts: torch.cat([x.reshape(-1) for x in ts])  # noqa: E731
        ref = reference_tensor_norms(
            flat(prev_grad), flat(current_grad), flat(current_param) - flat(prev_param), [p.numel() for p in prev_param]
        )
        for k, v in ref.items():
            assert row[k] == pytest.approx(v, rel=1e-5), k
        # four tensors in two groups: not the global ratio ‖g⁺ − g‖ / ‖Δ‖
        assert abs(row["smoothness_authors"] / row["smoothness_local"] - 1) > 1e-3
        checked += 1
    assert checked == steps


def test_tensor_sums_split_fragments():
    """sums.tensor_sums: each tensor's partial sums, fused and torch paths alike; a rank holding
    none of a tensor (an empty fragment) contributes 0."""
    gen = torch.Generator().manual_seed(3)
    sizes = [5, 0, 70_000, 3]  # one tensor spans two 64k chunks
    n = sum(sizes)
    v = {k: torch.randn(n, generator=gen) for k in ("x", "g", "delta", "g_plus")}
    got = sums.tensor_sums(v, sizes).tolist()
    parts = {k: t.double().split(sizes) for k, t in v.items()}
    want_diff = [float(((a - b) ** 2).sum()) for a, b in zip(parts["g_plus"], parts["g"])]
    want_upd = [float((d**2).sum()) for d in parts["delta"]]
    assert got[0] == pytest.approx(want_diff, rel=1e-6)
    assert got[1] == pytest.approx(want_upd, rel=1e-6)
    assert got[0][1] == 0.0 and got[1][1] == 0.0
