"""The optimizer zoo, single process: every entry trains `quadratic` from its defaults through the
generic interface, its default search space validates, its (ZeRO stage, precision) declaration
is what its rule allows, and the interface calls (Schedule-Free switch, Lookahead sync flag,
Sophia's side Hessian, the shape guard, per-group lr) do what they say.
The multi-rank side (DeepSpeed at every declared stage) is tests/multirank/test_optim_multirank.py."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_optimizer as po
import torch

from opt_study import optim
from opt_study.config import ConfigError
from opt_study.config.space import parse_domain
from opt_study.workloads import QuadraticConfig, make_workload

ALL = list(optim.OPTIMIZERS)
LAYERWISE = {"novograd", "soap", "shampoo"}
WHOLE_TENSOR = {"muon", "lamb", "normuon", "scion"}  # at ZeRO 1-3 through optim.whole_tensor
# The 2024-26 contenders whose rule needs whole tensors (norms, matrices, per-tensor masks).
RECENT_SHAPED = {"cautious_adamw", "mars", "psgd_kron", "splus"}
STEPS, MBS = 200, 16
# The slowest defaults on this problem after 200 steps: shampoo (0.85), lookahead_radam (0.93),
# lion (0.955: lr 1e-4 moves each coordinate at most 0.02); the rest end below 0.9.
MAX_RATIO = 0.97


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 200 tiny steps: threads only add contention
    yield
    torch.set_num_threads(n)


def train_quadratic(name: str, steps: int, hparams=None):
    """The generic loop: nothing here names an optimizer."""
    w = make_workload("quadratic", QuadraticConfig(), 0)
    model = w.build_model()
    opt = optim.build_optimizer(name, model.parameters(), hparams or {})
    for step in range(steps):
        optim.train_mode(opt)
        opt.zero_grad()
        batch = w.train_batch(step, 0, MBS)
        w.loss(model, batch).backward()
        if optim.needs_hessian(opt):
            optim.estimate_hessian(opt, lambda batch=batch: w.loss(model, batch), seed=step)
        opt.step()
    optim.eval_mode(opt)
    return w, model, opt


@pytest.mark.parametrize("name", ALL)
def test_defaults_reduce_the_quadratic(name):
    w, model, opt = train_quadratic(name, STEPS)
    assert opt.param_groups[0]["lr"] == optim.OPTIMIZERS[name].defaults["lr"]
    assert w.full_loss(model.X) < MAX_RATIO * w.full_loss(w.X0)


@pytest.mark.parametrize("name", ALL)
def test_default_space_validates(name, spec_factory):
    entry = optim.OPTIMIZERS[name]
    assert entry.space and set(entry.space) <= set(entry.defaults), name
    for k, raw in entry.space.items():
        d = parse_domain(raw, k)
        assert d.kind in ("uniform", "loguniform"), f"{name}.{k}"
        assert d.values[0] <= entry.defaults[k] <= d.values[1], f"{name}.{k}: the default lies outside its space"
    # a declared combination a CPU runs: the whole study validates
    stage, precision = min(c for c in entry.combos if c[1] in optim.CPU_PRECISIONS)
    spec = spec_factory(
        scale={"zero_stage": stage, "precision": precision}, optimizers=[{"name": name, "params": dict(entry.space)}]
    )
    assert set(spec.optimizers[0].space) == set(entry.space)


# ---------------------------------------------------------------------------- the declarations
def test_declared_combinations():
    for name, e in optim.OPTIMIZERS.items():
        if name in WHOLE_TENSOR:
            assert e.combos == optim.WHOLE_TENSOR and e.needs_model_shapes and e.whole_tensor, name
        elif name in LAYERWISE | RECENT_SHAPED or name == "sophia":
            assert e.combos == optim.MODEL_TENSORS and e.needs_model_shapes and not e.whole_tensor, name
        elif name.startswith("schedulefree"):
            assert e.combos == optim.MODEL_TENSORS and not e.needs_model_shapes, name
        else:
            assert e.combos == optim.ELEMENTWISE and e.elementwise and e.zero_stages == {0, 1, 2, 3}, name
        for s in optim.STAGES:
            for p in optim.PRECISIONS:
                assert (optim.combination_error(name, s, p) is None) == ((s, p) in e.combos)


def test_combination_errors_say_what_to_change():
    msg = optim.combination_error("novograd", 2, "fp32")
    assert "set scale.zero_stage to 0 with scale.precision fp32" in msg and "real shape" in msg
    msg = optim.combination_error("novograd", 0, "bf16")
    assert "set scale.precision to fp32" in msg
    msg = optim.combination_error("schedulefree_adamw", 3, "fp32")
    assert "evaluation would see y instead of x" in msg and "scale.zero_stage to 0" in msg


def test_whole_tensor_rules_validate_at_zero_1_to_3_and_refuse_fp16(spec_factory):
    """Muon runs whole tensors on owner ranks at ZeRO 1-3 (optim.whole_tensor): fp32 and bf16
    validate there; fp16 (untested on that route) and ZeRO-0 bf16 (no engine) are refused with
    the combinations that work."""
    for stage in (1, 2, 3):
        for precision in ("fp32", "bf16"):
            assert _study(spec_factory, stage, precision, "adamw", "muon").scale.zero_stage == stage
    msg = optim.combination_error("muon", 2, "fp16")  # fp16 needs a GPU: ScaleConfig refuses it here first
    assert "not tested under fp16" in msg
    assert "scale.precision to fp32 or bf16" in msg
    assert msg.endswith(
        "Correct combinations: zero_stage 0/fp32, zero_stage 1/fp32, zero_stage 1/bf16, zero_stage 2/fp32, "
        "zero_stage 2/bf16, zero_stage 3/fp32, zero_stage 3/bf16"
    )
    assert "no bf16 mode without ZeRO" in optim.combination_error("muon", 0, "bf16")


def test_whole_tensor_owners_balance_bytes():
    from opt_study.optim.whole_tensor import assign_owners

    # largest first to the lighter rank: 10 -> 0; 8, 2 -> 1 (10 | 10); the two 1s -> 0 (tie), then 1
    assert assign_owners([10, 1, 1, 8, 2], 2) == [0, 0, 1, 1, 1]
    assert assign_owners([4, 4, 4, 4], 4) == [0, 1, 2, 3]
    assert assign_owners([5], 3) == [0]
    owners = assign_owners([64 * 32, 32, 32 * 16, 16, 16 * 10, 10], 2)
    load = [sum(n for n, r in zip([64 * 32, 32, 32 * 16, 16, 16 * 10, 10], owners) if r == q) for q in (0, 1)]
    assert load == [2048, 730]


def test_whole_tensor_optimizer_on_one_process_is_the_rule():
    """On one process every tensor is this rank's and every fragment is the whole tensor: the
    wrapper's step equals the library's rule bit for bit, over the schedule's lr factor too."""
    from opt_study.optim.whole_tensor import WholeTensorOptimizer

    torch.manual_seed(0)
    ws = [torch.randn(6, 4), torch.randn(4), torch.randn(3, 6)]
    a = [w.clone().requires_grad_() for w in ws]
    flat = torch.cat([w.reshape(-1) for w in ws]).clone()  # what ZeRO would hand the optimizer
    plain = optim.build_optimizer("muon", a, {})
    wrapped = optim.build_optimizer("muon", [w.clone().requires_grad_() for w in ws], {}, zero_stage=2)
    assert isinstance(wrapped, WholeTensorOptimizer)
    wrapped.param_groups[0]["params"] = [flat]
    bounds, at = [], 0
    for w in ws:
        bounds.append((flat[at : at + w.numel()], 0, w.numel()))
        at += w.numel()
    assert optim.attach_fragments(wrapped, lambda: bounds)
    for step in range(3):
        grads = [torch.randn_like(w) for w in ws]
        for p, g in zip(a, grads):
            p.grad = g.clone()
        flat.grad = torch.cat([g.reshape(-1) for g in grads])
        optim.apply_lr_factor(plain, 0.5**step)
        optim.apply_lr_factor(wrapped, 0.5**step)
        plain.step()
        wrapped.step()
        assert torch.equal(flat, torch.cat([p.detach().reshape(-1) for p in a])), step
    sd = wrapped.state_dict()
    assert sd["whole_tensor"]["owner"] == [0, 0, 0] and sd["whole_tensor"]["rule"]["state"]


def _study(spec_factory, stage: int, precision: str, *optimizers: str):
    """A quadratic study at (stage, precision) listing `optimizers` with their defaults."""
    return spec_factory(
        scale={"zero_stage": stage, "precision": precision}, optimizers=[{"name": o} for o in optimizers]
    )


@pytest.mark.parametrize("name", ["novograd", *sorted(RECENT_SHAPED)])
def test_validate_rejects_shape_rules_at_zero2(spec_factory, name):
    with pytest.raises(ConfigError) as e:
        _study(spec_factory, 2, "fp32", "adam", name)
    assert e.value.field == "optimizers[1].name"
    assert e.value.message == optim.combination_error(name, 2, "fp32")
    assert "set scale.zero_stage to 0 with scale.precision fp32" in e.value.message
    assert e.value.message.endswith("Correct combinations: zero_stage 0/fp32")
    assert _study(spec_factory, 0, "fp32", "adam", name).scale.zero_stage == 0  # the named fix validates


def test_recent_elementwise_rules_validate_at_every_zero_stage(spec_factory):
    for stage in (1, 2, 3):
        assert _study(spec_factory, stage, "bf16", "ademamix", "adopt").scale.zero_stage == stage


def test_validate_rejects_novograd_under_bf16(spec_factory):
    """bf16 hands the optimizer DeepSpeed's flat fp32 partitions at any stage (and adam, listed
    first, is rejected at ZeRO-0 bf16 too: no engine runs it), so NovoGrad's message gives its reason."""
    with pytest.raises(ConfigError) as e:
        _study(spec_factory, 1, "bf16", "adam", "novograd")
    assert e.value.field == "optimizers[1].name"
    assert e.value.message == optim.combination_error("novograd", 1, "bf16")
    assert "real shape" in e.value.message
    with pytest.raises(ConfigError) as e:  # two problems, each on its field: the engine's, then NovoGrad's
        _study(spec_factory, 0, "bf16", "novograd")
    assert [x.field for x in e.value.errors] == ["scale.precision", "optimizers[0].name"]
    assert e.value.errors[1].message == optim.combination_error("novograd", 0, "bf16")
    assert "real shape" in e.value.errors[1].message


def test_validate_rejects_bf16_without_zero_for_every_optimizer(spec_factory):
    """DeepSpeed 0.19.8 cannot run bf16 at ZeRO-0 with the engine's fp32 gradient accumulation
    (measured: "unsupported mix of model_dtype=torch.bfloat16 and grad_accum_dtype=torch.float32"),
    so no entry declares it, and the message says to raise the stage or change the precision. The
    error names the scale (what conflicts), once, not each element-wise optimizer."""
    assert all((0, "bf16") not in e.combos for e in optim.OPTIMIZERS.values())
    with pytest.raises(ConfigError) as e:
        _study(spec_factory, 0, "bf16", "adam", "sgd")
    assert e.value.field == "scale.precision" and not hasattr(e.value, "errors")  # one error, not one per optimizer
    assert "no bf16 mode without ZeRO" in e.value.message
    assert "set scale.zero_stage to 1 or 2 or 3 to keep bf16, or scale.precision to fp32 or fp16" in e.value.message
    assert _study(spec_factory, 1, "bf16", "adam").scale.zero_stage == 1  # ZeRO-1 bf16: fine


# ---------------------------------------------------------------------------- the interface
def test_check_model_shapes_guards_shape_rules_only():
    model = make_workload("quadratic", QuadraticConfig(), 0).build_model()
    optim.check_model_shapes(optim.build_optimizer("novograd", model.parameters(), {}), model)
    flat = torch.nn.Parameter(model.X.detach().reshape(-1).clone())  # what ZeRO would hand it
    with pytest.raises(RuntimeError, match="not a model parameter.*zero_stage 0 with precision fp32"):
        optim.check_model_shapes(optim.build_optimizer("novograd", [flat], {}), model)
    optim.check_model_shapes(optim.build_optimizer("adam", [flat], {}), model)  # element-wise: fine
    with pytest.raises(RuntimeError, match="schedulefree_sgd: .*not a model parameter"):
        optim.check_model_shapes(optim.build_optimizer("schedulefree_sgd", [flat], {}), model)
    hint = r"muon: .*not a model parameter.*build_optimizer\(\.\.\., zero_stage, precision\)"
    with pytest.raises(RuntimeError, match=hint):
        optim.check_model_shapes(optim.build_optimizer("muon", [flat], {}), model)  # built for ZeRO-0
    model.X.ds_shape = torch.Size([8, 8])  # ZeRO-3 keeps the Parameter, empties it, records ds_shape
    with pytest.raises(RuntimeError, match=r"real shape \(8, 8\)"):
        optim.check_model_shapes(optim.build_optimizer("muon", model.parameters(), {}), model)
    with pytest.raises(TypeError, match="build_optimizer"):
        optim.check_model_shapes(torch.optim.SGD(model.parameters(), lr=0.1), model)


def test_lookahead_sync_steps_are_flagged():
    w = make_workload("quadratic", QuadraticConfig(), 0)
    model = w.build_model()
    opt = optim.build_optimizer("lookahead_momentum", model.parameters(), {"k": 3})
    synced = []
    for step in range(9):
        opt.zero_grad()
        w.loss(model, w.train_batch(step, 0, MBS)).backward()
        opt.step()
        # right after a sync the fast weights ARE the slow weights
        synced.append(torch.equal(model.X, opt.state[model.X]["slow_params"]))
        assert synced[-1] == optim.is_sync_step(opt, step), step
    assert synced == [False, False, True] * 3
    assert not any(optim.is_sync_step(optim.build_optimizer("adam", [model.X], {}), s) for s in range(9))


def test_schedulefree_switches_between_y_and_x():
    w, model, opt = train_quadratic("schedulefree_adamw", 20)  # ends in eval mode: x
    x = model.X.detach().clone()
    optim.train_mode(opt)
    y, z = model.X.detach().clone(), opt.state[model.X]["z"]
    beta1 = opt.param_groups[0]["betas"][0]
    # Defazio et al. 2024 (https://arxiv.org/abs/2405.15682): y = (1 − β1) z + β1 x
    torch.testing.assert_close(y, (1 - beta1) * z + beta1 * x, rtol=1e-5, atol=1e-6)
    assert (y - x).abs().max() > 1e-3  # the two iterates really differ
    optim.train_mode(opt)  # idempotent
    torch.testing.assert_close(model.X.detach(), y, rtol=0, atol=0)
    optim.eval_mode(opt)
    torch.testing.assert_close(model.X.detach(), x, rtol=1e-5, atol=1e-6)
    _, model_b, adam = train_quadratic("adam", 3)  # no-op elsewhere
    before = model_b.X.detach().clone()
    optim.eval_mode(adam), optim.train_mode(adam)
    assert torch.equal(model_b.X, before)


def test_sophia_takes_the_side_hessian():
    w = make_workload("quadratic", QuadraticConfig(), 0)
    model = w.build_model()
    opt = optim.build_optimizer("sophia", model.parameters(), {"update_period": 4})
    batch = w.train_batch(0, 0, MBS)
    w.loss(model, batch).backward()
    assert optim.needs_hessian(opt)
    with pytest.raises(RuntimeError, match="estimate_hessian"):
        opt.step()
    optim.estimate_hessian(opt, lambda: w.loss(model, batch), seed=7)
    assert not optim.needs_hessian(opt)  # given, not yet consumed
    # The quadratic's Hessian acts on X as Z -> A Z, so Hutchinson's z ⊙ (H z) is Z ⊙ (A Z).
    z = torch.randn(model.X.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(opt._side_hessian[0], z * (w.A32 @ z), rtol=1e-5, atol=1e-5)
    assert model.X.grad is not None and p_grad_unchanged(model, w, batch)
    due = []
    for step in range(9):
        due.append(optim.needs_hessian(opt))
        if due[-1]:
            optim.estimate_hessian(opt, lambda: w.loss(model, batch), seed=step)
        opt.step()
    assert due == [False, False, False, False, True, False, False, False, True]


def p_grad_unchanged(model, w, batch) -> bool:
    """estimate_hessian is a side computation: p.grad is still the plain gradient."""
    ref = make_workload("quadratic", QuadraticConfig(), 0).build_model()
    w.loss(ref, batch).backward()
    return torch.equal(model.X.grad, ref.X.grad)


def test_lr_factor_scales_every_group_from_its_own_base():
    params = [torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(3))]
    opt = optim.build_optimizer("muon", params, {"lr": 0.02, "adamw_lr": 3e-4})
    optim.apply_lr_factor(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 1.5e-4]
    optim.apply_lr_factor(opt, 1.0)  # from the initial lr, not compounding
    assert [g["lr"] for g in opt.param_groups] == [0.02, 3e-4]
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]


def _kron_replica(rank_seed: int, cls=None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """10 Kron steps on `quadratic` after seeding the global generators as a rank would; returns
    the weights and the global generators' next draws."""
    torch.manual_seed(rank_seed)
    np.random.seed(rank_seed)
    w = make_workload("quadratic", QuadraticConfig(), 0)
    model = w.build_model()
    opt = optim.build_optimizer("psgd_kron", model.parameters(), {})
    if cls is not None:  # the library's class with the same hyperparameters
        opt = cls(model.parameters(), **optim.resolve_hparams("psgd_kron", {}))
    for step in range(10):
        opt.zero_grad()
        w.loss(model, w.train_batch(step, 0, MBS)).backward()
        opt.step()
    return model.X.detach().clone(), torch.rand(3), float(np.random.rand())


def test_psgd_kron_draws_the_same_on_every_rank():
    """The loop seeds torch's generator per rank and nobody seeds numpy's; at ZeRO-0 every rank
    steps its own copy. Same gradients, different global generators: the same weights (the
    library's Kron alone drifts), and the global generators move on as if Kron drew nothing."""
    x1, t1, n1 = _kron_replica(1)
    x2, _, _ = _kron_replica(2)
    assert torch.equal(x1, x2)
    torch.manual_seed(1)
    np.random.seed(1)
    assert torch.equal(t1, torch.rand(3)) and n1 == float(np.random.rand())
    y1, _, _ = _kron_replica(1, po.Kron)
    y2, _, _ = _kron_replica(2, po.Kron)
    assert (y1 - y2).abs().max() > 1e-6  # why the glue exists


def test_cautious_adamw_masks_disagreeing_coordinates():
    """Liang et al. 2024 (https://arxiv.org/abs/2411.16085): on the first step Adam's update
    is -lr * sign(g) (bias-corrected m / sqrt(v) = g / |g|), which always agrees with the
    gradient, so C-AdamW's first step is AdamW's. After a gradient flip, coordinates whose
    momentum still points the old way do not move."""
    p = torch.nn.Parameter(torch.zeros(4))
    opt = optim.build_optimizer("cautious_adamw", [p], {"weight_decay": 0.0, "lr": 0.1})
    p.grad = torch.tensor([1.0, -1.0, 1.0, -1.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.1, 0.1, -0.1, 0.1]))
    before = p.detach().clone()
    p.grad = torch.tensor([-1e-3, 1e-3, 1.0, -1.0])  # coordinates 0, 1 flip weakly: momentum disagrees
    opt.step()
    moved = (p.detach() - before).abs() > 0
    assert moved.tolist() == [False, False, True, True]
