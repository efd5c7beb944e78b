"""Workloads: purity of batches and init, the fixed and evenly split eval set, learnability,
the quadratic's closed forms, and config validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from opt_study.config import FieldError
from opt_study.workloads import (
    WORKLOADS,
    MLPClassifyConfig,
    QuadraticConfig,
    TinyLMConfig,
    make_workload,
    workload_config_class,
)
from opt_study.workloads.base import derived_seed, eval_slices

# Small but default-shaped configs keep the file fast.
CONFIGS = {
    "tiny_lm": TinyLMConfig(context=32, dropout=0.1),
    "quadratic": QuadraticConfig(),
    "mlp_classify": MLPClassifyConfig(hidden=(32,), dropout=0.1),
}
NAMES = sorted(CONFIGS)


def workload(name: str, seed: int = 0):
    return make_workload(name, CONFIGS[name], seed)


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def eval_loss(w, model, batches) -> float:
    model.eval()
    with torch.no_grad():
        return sum(w.loss(model, b).item() for b in batches) / len(batches)


def test_registry():
    builtin = {"tiny_lm", "quadratic", "mlp_classify", "gpt2", "resnet_cifar"}
    assert set(WORKLOADS) == builtin | {"dataset", "hf_causal_lm", "torchvision"}  # + the adapters
    assert workload_config_class("quadratic") is QuadraticConfig
    known = "dataset, gpt2, hf_causal_lm, mlp_classify, quadratic, resnet_cifar, tiny_lm, torchvision"
    with pytest.raises(ValueError, match=f"known: {known}"):
        make_workload("resnet", None, 0)
    with pytest.raises(TypeError, match="QuadraticConfig"):
        make_workload("quadratic", TinyLMConfig(), 0)
    assert make_workload("quadratic", None, 0).cfg == QuadraticConfig()


@pytest.mark.parametrize("name", NAMES)
def test_train_batch_is_pure_in_seed_step_index(name):
    w1, w2 = workload(name, seed=3), workload(name, seed=3)
    w1.train_batch(0, 0, 8)  # another read in between must not matter: no iterator state
    rng = torch.get_rng_state()
    b = w1.train_batch(5, 2, 8)
    assert torch.equal(torch.get_rng_state(), rng), "train_batch touched the global RNG"
    assert same(b, w2.train_batch(5, 2, 8))
    assert not same(b, w1.train_batch(5, 3, 8))
    assert not same(b, w1.train_batch(6, 2, 8))
    assert not same(b, workload(name, seed=4).train_batch(5, 2, 8))
    assert all(t.shape[0] == 8 for t in b)


@pytest.mark.parametrize("name", NAMES)
def test_model_init_deterministic_and_rng_independent(name):
    w = workload(name, seed=7)
    torch.manual_seed(1)
    m1 = w.build_model()
    torch.manual_seed(2)
    rng = torch.get_rng_state()
    m2 = workload(name, seed=7).build_model()
    assert torch.equal(torch.get_rng_state(), rng), "build_model changed the global RNG"
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    s3 = workload(name, seed=8).build_model().state_dict()
    assert any(not torch.equal(s1[k], s3[k]) for k in s1)


@pytest.mark.parametrize("name", NAMES)
def test_eval_set_fixed_and_split_evenly(name):
    w, mbs = workload(name), 4
    full = w.eval_batches(mbs, 0, 1)
    assert same(full[0], workload(name).eval_batches(mbs, 0, 1)[0])
    for world in (1, 2, 4):
        per_rank = [w.eval_batches(mbs, r, world) for r in range(world)]
        counts = {len(b) for b in per_rank}
        assert len(counts) == 1 and counts.pop() >= 1
        assert all(t.shape[0] == mbs for bs in per_rank for b in bs for t in b)
        # batch j of the round-robin order is rank j % world's (j // world)-th batch
        order = [per_rank[j % world][j // world] for j in range(world * len(per_rank[0]))]
        assert all(same(a, b) for a, b in zip(order, full)), f"world {world} is not a prefix of the set"
        assert len(full) - len(order) < world  # only an incomplete last round is dropped
    with pytest.raises(ValueError, match="fewer than one batch per rank"):
        w.eval_batches(100_000, 0, 2)


def test_eval_slices_closed_form():
    assert eval_slices(10, 2, 1, 2) == [slice(2, 4), slice(6, 8)]  # 5 batches -> 2 rounds of 2
    assert eval_slices(10, 3, 0, 1) == [slice(0, 3), slice(3, 6), slice(6, 9)]
    with pytest.raises(ValueError):
        eval_slices(10, 2, 2, 2)
    assert derived_seed(1, 2, 3) == derived_seed(1, 2, 3) != derived_seed(1, 2, 4)


@pytest.mark.parametrize("name", NAMES)
def test_a_few_adam_steps_reduce_eval_loss(name):
    w = workload(name)
    torch.manual_seed(0)  # dropout masks
    model = w.build_model()
    batches = w.eval_batches(16, 0, 1)
    before = eval_loss(w, model, batches)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(25):
        opt.zero_grad()
        w.loss(model, w.train_batch(step, 0, 16)).backward()
        opt.step()
    after = eval_loss(w, model, batches)
    assert after < 0.9 * before, (before, after)


def test_units_per_batch():
    assert workload("tiny_lm").units_per_batch(workload("tiny_lm").train_batch(0, 0, 4)) == 4 * 32
    for name in ("quadratic", "mlp_classify"):
        assert workload(name).units_per_batch(workload(name).train_batch(0, 0, 5)) == 5
    assert {WORKLOADS[n][0].unit for n in NAMES} == {"tokens", "samples"}


# ------------------------------------------------------------------------------------ quadratic
def test_quadratic_gradient_and_loss_closed_form():
    w = make_workload("quadratic", QuadraticConfig(dim=12, cols=3, noise=0.5), 11)
    model = w.build_model()
    (centres,) = w.train_batch(2, 1, 8)
    loss = w.loss(model, (centres,))
    loss.backward()
    x, c = model.X.detach().double(), centres.double()
    d = x - c
    expected_loss = 0.5 * torch.einsum("bij,ik,bkj->b", d, w.A, d).mean()
    expected_grad = w.A @ (x - c.mean(dim=0))
    # fp32 arithmetic against float64 on the same float32 A: a few ulps of the operand scales
    assert abs(loss.item() - expected_loss.item()) <= 1e-6 * expected_loss.item()
    assert (model.X.grad.double() - expected_grad).norm() <= 1e-6 * expected_grad.norm()


def test_quadratic_spectrum_and_symmetry():
    cfg = QuadraticConfig(dim=20, lambda_min=0.01, lambda_max=100.0)
    w = make_workload("quadratic", cfg, 0)
    assert torch.equal(w.A32, w.A32.T)
    assert w.A.dtype == torch.float64 and torch.equal(w.A, w.A32.double())
    ratios = w.nominal_spectrum[1:] / w.nominal_spectrum[:-1]
    assert torch.allclose(ratios, torch.full_like(ratios, 10 ** (4 / 19)), rtol=1e-12)
    # A's float32 entries move each eigenvalue by at most ~ulp(λ_max) * dim
    assert (w.spectrum - w.nominal_spectrum).abs().max() <= 1e-5 * cfg.lambda_max
    assert w.full_loss(w.C) == 0.0 and w.full_loss(w.build_model().X) > 0.0
    x = w.build_model().X.detach()
    assert torch.equal(x, make_workload("quadratic", cfg, 0).X0)
    assert torch.allclose((x - w.C).std(), torch.tensor(1.0), atol=0.25)  # init_scale = 1


# --------------------------------------------------------------------------------------- tiny_lm
def test_tiny_lm_is_causal_and_replays_dropout_from_global_rng():
    w = workload("tiny_lm")
    model = w.build_model()
    x, _ = w.train_batch(0, 0, 2)
    model.eval()
    x2 = x.clone()
    x2[:, 20] = (x2[:, 20] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(x2)
    assert torch.equal(a[:, :20], b[:, :20]) and not torch.equal(a[:, 20:], b[:, 20:])
    model.train()
    state = torch.get_rng_state()
    with torch.no_grad():
        y1 = model(x)
        torch.set_rng_state(state)
        y2 = model(x)
        y3 = model(x)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)


def test_tiny_lm_corpus_builtin_and_path(tmp_path):
    w = workload("tiny_lm")
    n = len(w.train_data) + len(w.val_data)
    assert 100_000 <= n <= 300_000
    assert len(w.val_data) == int(n * 0.1)  # the split is by position: the last 10%
    assert bytes(w.train_data[:21].tolist()) == b"Byte-level training c"
    assert w.val_windows.shape[1] == 33 and torch.equal(w.val_windows[1], w.val_data[33:66].long())
    p = tmp_path / "c.txt"
    p.write_text("héllo wörld " * 100, encoding="utf-8")
    wp = make_workload("tiny_lm", TinyLMConfig(context=16, corpus=str(p)), 0)
    assert bytes(wp.train_data[:6].tolist()) == "héllo".encode()
    p.write_bytes(b"\xff\xfe" * 500)
    with pytest.raises(FieldError, match="not UTF-8") as e:
        make_workload("tiny_lm", TinyLMConfig(corpus=str(p)), 0)
    assert e.value.field == "corpus"
    with pytest.raises(FieldError, match="cannot read"):
        make_workload("tiny_lm", TinyLMConfig(corpus=str(tmp_path / "missing.txt")), 0)
    p.write_text("short", encoding="utf-8")
    with pytest.raises(FieldError, match="fewer than one window"):
        make_workload("tiny_lm", TinyLMConfig(corpus=str(p)), 0)


# ---------------------------------------------------------------------------------- mlp_classify
def test_mlp_data_standardised_and_split_fixed_across_seeds():
    w0, w1 = workload("mlp_classify", 0), workload("mlp_classify", 1)
    assert torch.equal(w0.val_x, w1.val_x) and torch.equal(w0.val_y, w1.val_y)
    assert len(w0.train_y) + len(w0.val_y) == 1797 and len(w0.val_y) == int(1797 * 0.2)
    assert w0.train_x.mean(dim=0).abs().max() < 1e-5
    std = w0.train_x.std(dim=0)
    assert torch.all(((std - 1).abs() < 1e-4) | (std == 0))
    cfg = MLPClassifyConfig(dataset="synthetic", n_classes=3, n_features=5, n_samples=300, hidden=[8])
    ws = make_workload("mlp_classify", cfg, 0)
    assert cfg.hidden == (8,) and ws.train_x.shape == (240, 5) and set(ws.val_y.tolist()) == {0, 1, 2}
    assert ws.build_model()(ws.val_x).shape == (60, 3)


# ------------------------------------------------------------------------------- config checks
BAD = [
    (TinyLMConfig, {"layers": 0}, "layers"),
    (TinyLMConfig, {"heads": 3}, "heads"),
    (TinyLMConfig, {"dropout": 1.0}, "dropout"),
    (TinyLMConfig, {"val_fraction": 0.0}, "val_fraction"),
    (TinyLMConfig, {"corpus": ""}, "corpus"),
    (QuadraticConfig, {"dim": 0}, "dim"),
    (QuadraticConfig, {"lambda_min": 0.0}, "lambda_min"),
    (QuadraticConfig, {"lambda_min": 2.0, "lambda_max": 1.0}, "lambda_max"),
    (QuadraticConfig, {"noise": -0.1}, "noise"),
    (QuadraticConfig, {"init_scale": float("inf")}, "init_scale"),
    (MLPClassifyConfig, {"dataset": "mnist"}, "dataset"),
    (MLPClassifyConfig, {"hidden": (64, 0)}, "hidden"),
    (MLPClassifyConfig, {"dropout": -0.5}, "dropout"),
    (MLPClassifyConfig, {"n_classes": 3}, "n_classes"),  # digits has 10
    (MLPClassifyConfig, {"dataset": "synthetic", "n_classes": 1}, "n_classes"),
    (MLPClassifyConfig, {"dataset": "synthetic", "n_samples": 5}, "n_samples"),
]


@pytest.mark.parametrize("cls, kwargs, field", BAD, ids=[f"{c.__name__}-{f}" for c, _, f in BAD])
def test_bad_config_raises_field_error(cls, kwargs, field):
    with pytest.raises(FieldError) as e:
        cls(**kwargs)
    assert e.value.field == field and e.value.message


@pytest.mark.parametrize("name", NAMES)
def test_configs_are_frozen_and_default_constructible(name):
    cfg = workload_config_class(name)()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, dataclasses.fields(cfg)[0].name, 1)
    assert hash(cfg) == hash(workload_config_class(name)())
