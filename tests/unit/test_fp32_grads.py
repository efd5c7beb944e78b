"""measure.fp32_grads (opt_study/measure/fp32grad.py): fp32 g and g⁺ on measured bf16 steps leave
training bit-for-bit as it is, and the fp32 loss beside them is fp32eval's. The gradients
themselves are checked against float64 autograd at the same gathered points with the same dropout
masks at world 1 and 2, ZeRO 1-3, in tests/multirank/test_multirank.py (``*_fp32_vs_fp64``)."""

from __future__ import annotations

import pytest
import torch

from opt_study.config.errors import ConfigError
from opt_study.measure import fp32grad
from opt_study.plan import TrialPlan
from opt_study.results.parquet import read_steps
from opt_study.trial.loop import run_trial

MLP = {"type": "mlp_classify", "hidden": [16, 16], "dropout": 0.1}  # dropout: masks are replayed


def _rows(spec_factory, name, measure, zero_stage=1):
    spec = spec_factory(
        study={"name": name},
        workload=MLP,
        scale={"workers": 1, "zero_stage": zero_stage, "micro_batch_size": 16, "precision": "bf16", "grad_accum": 2},
        training={"steps": 12, "eval_every": 6},
        optimizers=[{"name": "adamw", "params": {"lr": 0.01}}],
        measure=measure,
    )
    run_trial(spec, TrialPlan("t", "adamw", "adamw", {"lr": 0.01}, seed=0, index=0), report=lambda m: None)
    return read_steps(spec.study_dir).to_pylist()


@pytest.mark.parametrize("probe_s", ["1", "uniform"])
def test_fp32_grads_leave_training_bit_for_bit(spec_factory, probe_s):
    """Every step measured with fp32 gradients vs never measured: the same iterates (‖x‖ and ‖Δ‖
    of the fp32 masters at every step, bitwise) and the same training losses on the steps whose
    stored loss is the training forward's (every 2nd step measured)."""
    on = _rows(spec_factory, "on", {"every": 1, "fp32_grads": True, "probe_s": probe_s, "next_batch": True})
    half = _rows(spec_factory, "half", {"every": 2, "fp32_grads": True, "probe_s": probe_s})
    off = _rows(spec_factory, "off", {"every": 0})
    assert [r["grad_precision"] for r in on] == ["fp32"] * 12
    assert [r["measured"] for r in half] == [False, True] * 6
    assert [r["grad_precision"] for r in half] == ["bf16", "fp32"] * 6
    assert all(r["grad_precision"] == "bf16" and not r["measured"] for r in off)
    for a, b, c in zip(on, half, off):
        assert (a["param_norm"], a["update_norm"]) == (c["param_norm"], c["update_norm"]), a["step"]
        assert (b["param_norm"], b["update_norm"]) == (c["param_norm"], c["update_norm"]), a["step"]
        if not b["measured"]:
            assert (b["loss"], b["grad_norm"]) == (c["loss"], c["grad_norm"]), b["step"]
    assert [r["eval_loss"] for r in on if r.get("eval_loss") is not None] == [
        r["eval_loss"] for r in off if r.get("eval_loss") is not None
    ]


def test_fp32_losses_equal_fp32eval_and_gradients_differ_from_bf16(spec_factory):
    """The fp32 ℓ, ℓ⁺ computed beside the gradients are fp32eval's (the losses of a run with
    fp32_grads off, bitwise: the same fp32 forward at the same point with the same masks), while
    ‖g‖ moves from the bf16 backward's to the fp32 one's by about bf16 rounding."""
    on = _rows(spec_factory, "on", {"every": 1, "fp32_grads": True})
    off = _rows(spec_factory, "off", {"every": 1, "fp32_grads": False})
    for a, b in zip(on, off):
        assert (a["loss"], a["loss_probe"], a["loss_precision"]) == (b["loss"], b["loss_probe"], "fp32"), a["step"]
        assert a["grad_precision"] == "fp32" and b["grad_precision"] == "bf16"
        assert a["grad_norm"] != b["grad_norm"]
        assert abs(a["grad_norm"] - b["grad_norm"]) < 0.05 * b["grad_norm"]  # same gradient, other rounding


def test_enabled_resolves_auto():
    assert fp32grad.enabled("auto", "bf16", 1) and fp32grad.enabled("auto", "fp16", 2)
    assert not fp32grad.enabled("auto", "bf16", 3)  # the whole model in fp32 per rank: opt-in only
    assert fp32grad.enabled(True, "bf16", 3)
    assert not fp32grad.enabled(True, "fp32", 0) and not fp32grad.enabled("auto", "fp32", 2)
    assert not fp32grad.enabled(False, "bf16", 1)


@pytest.mark.parametrize("value", ["yes", 1, 0, None, "AUTO"])
def test_config_refuses_anything_but_auto_true_false(spec_factory, value):
    with pytest.raises(ConfigError, match="measure.fp32_grads"):
        spec_factory(measure={"fp32_grads": value})
    for ok in ("auto", True, False):
        assert spec_factory(measure={"fp32_grads": ok}).measure.fp32_grads == ok


def test_loss_and_grad_touch_no_parameter_state():
    """Directly on a module (world 1, no DeepSpeed): the gradient is the mean over micro-batches
    of float64 autograd's, and the module's parameters get no .grad, no new .data, no hook call."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(7, 3))
    module.train()
    named = [(n, p) for n, p in module.named_parameters()]
    fired = []
    for _, p in named:
        p.register_hook(lambda g: fired.append(g))
    datas = [(p.data_ptr(), p.detach().clone()) for _, p in named]
    view = SimpleNamespace(
        named=named, engine=SimpleNamespace(device=torch.device("cpu"), module=module), mode="hp", world=1,
        bounds=lambda: [(0, p.numel()) for _, p in named],
    )  # fmt: skip
    frags = [p.detach().reshape(-1).clone() for _, p in named]
    batches = [(torch.randn(4, 5), torch.randint(0, 3, (4,))) for _ in range(3)]
    from opt_study.measure.probe import rng_state

    states = []
    for _ in batches:
        states.append(rng_state())
        torch.rand(1)  # each micro-batch its own RNG state, as the training forwards leave them

    def loss_fn(model, batch):
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    loss, g = fp32grad.loss_and_grad(view.engine, view, frags, batches, states, loss_fn)
    assert all(p.grad is None for _, p in named) and not fired
    assert all(p.data_ptr() == ptr and torch.equal(p.detach(), v) for (_, p), (ptr, v) in zip(named, datas))
    ref = module.double()
    total, gref = 0.0, torch.zeros(sum(p.numel() for _, p in named), dtype=torch.float64)
    from opt_study.measure.probe import set_rng_state

    for b, st in zip(batches, states):
        set_rng_state(st)
        ell = loss_fn(ref, (b[0].double(), b[1]))
        gref += torch.cat([q.reshape(-1) for q in torch.autograd.grad(ell, list(ref.parameters()))])
        total += float(ell)
    gref /= len(batches)
    assert float(loss) == pytest.approx(total / len(batches), rel=1e-6)
    assert float((g.flat.double() - gref).norm() / gref.norm()) < 1e-6
