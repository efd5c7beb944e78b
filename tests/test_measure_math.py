"""The metric math of opt_study.measure against the float64 oracle and METRICS.md's closed forms.

Sharding is simulated: each parameter's flat vector is cut into contiguous pieces, one per
"rank"; each rank packs its local sums and the packed vectors are added, exactly what
all_reduce(SUM) does. Tolerances are METRICS.md's scale-aware ones.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opt_study.measure import metrics
from opt_study.measure.reference import reference_metrics, reference_sums
from opt_study.measure.sums import (CHUNK, LOSS_NAMES, SUM_NAMES, Fragment, local_sums, pack,
                                    totals, unpack)

FIELDS = ("x", "g", "delta", "g_plus", "x0", "delta_prev", "g_prev")
# The sums of squares whose roots scale each sum's error (METRICS.md: 1e-6·‖a‖‖b‖).
SCALE = {"ip_grad_update": ("sq_grad", "sq_update"), "ip_probe_update": ("sq_grad_probe", "sq_update"),
         "ip_param_update": ("sq_param", "sq_update"), "ip_param_grad": ("sq_param", "sq_grad"),
         "ip_update_prev": ("sq_update", "sq_update_prev"), "ip_grad_prev": ("sq_grad", "sq_grad_prev")}


def _random_params(gen: torch.Generator, sizes, dtype=torch.float32) -> list[dict]:
    params = []
    for n in sizes:
        r = lambda scale=1.0: scale * torch.randn(n, generator=gen, dtype=torch.float64)  # noqa: E731
        x0 = r()
        x = x0 + r(0.1)
        g = r(0.01) + 0.003
        gp = g + r(1e-4)      # g⁺ ≈ g: the case where ‖g⁺‖² − 2⟨g⁺,g⟩ + ‖g‖² would cancel
        d = -0.01 * g + r(1e-4)
        g_prev = g + r(0.01)
        d_prev = d + r(1e-4)
        params.append({k: v.to(dtype) for k, v in zip(FIELDS, (x, g, d, gp, x0, d_prev, g_prev))})
    return params


def _cuts(gen: torch.Generator, n: int, ranks: int) -> list[int]:
    """Contiguous split points [0, ..., n] for `ranks` pieces, empty pieces allowed."""
    inner = sorted(torch.randint(0, n + 1, (ranks - 1,), generator=gen).tolist())
    return [0, *inner, n]


def _sharded_packed(params, groups, n_groups, ranks, gen, losses, chunk=CHUNK, drop=()):
    total = None
    cuts = [_cuts(gen, p["x"].numel(), ranks) for p in params]
    for r in range(ranks):
        frags = [Fragment(group=grp, **{k: (None if k in drop else v[c[r]:c[r + 1]])
                                        for k, v in p.items()})
                 for p, grp, c in zip(params, groups, cuts)]
        packed = pack(local_sums(frags, n_groups, chunk=chunk), torch.tensor(losses[r], dtype=torch.float64) / ranks)
        total = packed if total is None else total + packed  # what all_reduce(SUM) computes
    return unpack(total, n_groups)


def _assert_sums_close(got: dict, ref: dict, rel=1e-6):
    for name in SUM_NAMES:
        if math.isnan(ref[name]):
            assert math.isnan(got[name]), name
            continue
        a, b = SCALE.get(name, (name, name))
        scale = math.sqrt(ref[a] * ref[b])
        assert abs(got[name] - ref[name]) <= rel * scale, (name, got[name], ref[name], scale)


@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.parametrize("chunk", [CHUNK, 97])
def test_sharded_sums_equal_reference(ranks, chunk):
    gen = torch.Generator().manual_seed(10 * ranks + (chunk == CHUNK))
    sizes, groups = [1, 7, 300, 5000, 70_000, 40, 2_000], [0, 0, 1, 1, 2, 2, 2]
    params = _random_params(gen, sizes)
    losses = [[2.0 + r, 1.9 + r, float(r == 0), 0.5 * r] for r in range(ranks)]
    per_group, scalars = _sharded_packed(params, groups, 3, ranks, gen, losses, chunk=chunk)
    assert set(per_group) == set(SUM_NAMES) and set(scalars) == set(LOSS_NAMES)
    for j in range(3):
        full = {k: torch.cat([p[k] for p, grp in zip(params, groups) if grp == j]) for k in FIELDS}
        ref = reference_sums(**full)
        _assert_sums_close({k: float(v[j]) for k, v in per_group.items()}, ref)
    assert scalars["loss"] == pytest.approx(np.mean([l[0] for l in losses]), rel=1e-12)
    assert scalars["loss_probe"] == pytest.approx(np.mean([l[1] for l in losses]), rel=1e-12)
    assert scalars["stop_votes"] == 1.0 / ranks  # each rank's share, like the losses
    assert scalars["sq_grad_small"] == pytest.approx(np.mean([0.5 * r for r in range(ranks)]), rel=1e-12)


def test_missing_inputs_are_nan_after_reduction():
    gen = torch.Generator().manual_seed(3)
    params = _random_params(gen, [50, 130])
    per_group, scalars = _sharded_packed(params, [0, 1], 2, 2, gen, [[1.0, math.nan, 0.0, math.nan]] * 2,
                                         drop=("g_plus", "x0"))
    full = {k: (None if k in ("g_plus", "x0") else torch.cat([p[k] for p in params])) for k in FIELDS}
    ref = reference_sums(**full)
    got = totals(per_group)
    assert {k for k, v in got.items() if math.isnan(v)} == {k for k, v in ref.items() if math.isnan(v)} \
        == {"sq_grad_probe", "ip_probe_update", "sq_grad_diff", "sq_dist_init"}
    _assert_sums_close(got, ref)
    assert math.isnan(scalars["loss_probe"]) and scalars["loss"] == 1.0


def test_only_computes_the_named_sums_and_empty_groups_are_zero():
    p = _random_params(torch.Generator().manual_seed(4), [1000])[0]
    out = local_sums([Fragment(group=1, **p)], 3, only=("sq_grad", "sq_update"))
    assert out.shape == (len(SUM_NAMES), 3) and out.dtype == torch.float64
    rows = {n: out[i] for i, n in enumerate(SUM_NAMES)}
    assert rows["sq_grad"][1].item() == pytest.approx(float(p["g"].double() @ p["g"].double()), rel=1e-6)
    assert rows["sq_grad"][0].item() == 0.0 and rows["sq_grad"][2].item() == 0.0
    assert all(torch.isnan(rows[n]).all() for n in SUM_NAMES if n not in ("sq_grad", "sq_update"))


def test_chunked_fp32_accuracy_at_scale():
    """300k elements (several chunks), positive values (rounding errors do not cancel) and
    g⁺ = g + 1e-5 noise on |g| ~ 1: the cancelling expansion of ‖g⁺ − g‖² would be off by ~1e4."""
    gen = torch.Generator().manual_seed(5)
    n = 300_000
    x = (1.0 + torch.rand(n, generator=gen, dtype=torch.float64)).float()
    g = (1.0 + torch.rand(n, generator=gen, dtype=torch.float64)).float()
    gp = (g.double() + 1e-5 * torch.randn(n, generator=gen, dtype=torch.float64)).float()
    out = local_sums([Fragment(group=0, x=x, g=g, delta=x, g_plus=gp)], 1)[:, 0]
    ref = reference_sums(x, g, x, gp, None, None, None)
    for name in ("sq_param", "sq_grad", "ip_param_grad", "sq_grad_diff"):
        got = out[SUM_NAMES.index(name)].item()
        assert abs(got - ref[name]) <= 1e-6 * ref[name], name


def _quadratic(dtype, s: float, seed: int = 0):
    """f(x; B) = ½(x − c_B)ᵀA(x − c_B) with A SPD; the parameter is a 12x20 matrix, flattened."""
    gen = torch.Generator().manual_seed(seed)
    n = 240
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    lam = torch.linspace(0.5, 4.0, n, dtype=torch.float64)
    A = q @ torch.diag(lam) @ q.T
    c = torch.randn(n, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(n, generator=gen,
                                                                                dtype=torch.float64)
    x = torch.randn(12, 20, generator=gen, dtype=torch.float64).reshape(-1).to(dtype).double()
    d = (-0.1 * A @ (x - c) + 0.05 * torch.randn(n, generator=gen, dtype=torch.float64))
    d = d.to(dtype).double()                    # Δ arbitrary; x and Δ exact in `dtype`
    f = lambda y: float(0.5 * (y - c) @ A @ (y - c))  # noqa: E731
    p = x + s * d
    return dict(A=A, lam=lam, x=x, d=d, g=A @ (x - c), gp=A @ (p - c), loss=f(x), loss_probe=f(p))


@pytest.mark.parametrize("s", [1.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_quadratic_closed_forms(dtype, s):
    q = _quadratic(dtype, s)
    A, x, d, g, gp = q["A"], q["x"], q["d"], q["g"], q["gp"]
    half = x.numel() // 2                       # two "ranks", two groups
    frags = [Fragment(group=j, x=x[sl].to(dtype), g=g[sl].to(dtype), delta=d[sl].to(dtype),
                      g_plus=gp[sl].to(dtype)) for j, sl in enumerate((slice(0, half), slice(half, None)))]
    sums = totals(unpack(pack(local_sums(frags, 2), torch.zeros(4)), 2)[0])
    prec = "fp64" if dtype == torch.float64 else "fp32"
    via_sums = metrics.derive(sums, q["loss"], q["loss_probe"], s, prec)
    via_ref = reference_metrics(x.to(dtype), g.to(dtype), d.to(dtype), gp.to(dtype), q["loss"],
                                q["loss_probe"], s, precision=prec)
    seg = s * d
    quad = float(seg @ A @ seg)                 # (sΔ)ᵀA(sΔ)
    curv = quad / float(seg @ seg)
    u = 1e-12 if dtype == torch.float64 else 1e-6
    tol = u * (abs(q["loss"]) + float((g.norm() + gp.norm()) * seg.norm()))  # from δ and ⟨·, sΔ⟩
    for m in (via_sums, via_ref):
        assert m["flag"] is None
        assert m["convexity_gap_fwd"] == pytest.approx(-0.5 * quad, abs=tol)
        assert m["convexity_gap_bwd"] == pytest.approx(-0.5 * quad, abs=tol)
        assert m["trapezoid_residual"] == pytest.approx(0.0, abs=tol)
        L = m["smoothness_local"]
        assert L == pytest.approx(float((A @ d).norm() / d.norm()), rel=100 * u)
        assert q["lam"].min() <= L <= q["lam"].max()
        assert m["smoothness_descent"] == pytest.approx(curv, rel=100 * u)
        assert m["curvature_secant"] == pytest.approx(curv, rel=100 * u)
        assert m["cls_convexity_fwd"] == m["cls_convexity_bwd"] == "holds"
        assert 0 < m["noise_floor"] < 1e-3 * 0.5 * quad


def _random_case(seed=7, n=500):
    gen = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(n, generator=gen, dtype=torch.float64)  # noqa: E731
    return dict(x=r(), g=r(), delta=0.1 * r(), g_plus=r(), x0=r(), delta_prev=r(), g_prev=r())


@pytest.mark.parametrize("s,precision", [(1.0, "fp32"), (0.5, "fp32"), (1.0, "bf16"), (2.3, "fp16")])
def test_derive_matches_reference_metrics(s, precision):
    t = _random_case()
    sums = totals(unpack(pack(local_sums([Fragment(group=0, **t)], 1), torch.zeros(4)), 1)[0])
    got = metrics.derive(sums, 3.0, 2.5, s, precision)
    ref = reference_metrics(t["x"], t["g"], t["delta"], t["g_plus"], 3.0, 2.5, s,
                            delta_prev=t["delta_prev"], g_prev=t["g_prev"], precision=precision)
    assert set(got) == set(ref) == set(metrics.OUTPUT_NAMES)
    for k, v in ref.items():
        if isinstance(v, float):
            assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
        else:
            assert got[k] == v, k
    assert got["flag"] is None and got["cls_convexity_fwd"] is not None


def test_noise_floor_formula_and_classification():
    sums = {"sq_grad": 4.0, "sq_grad_probe": 9.0, "sq_update": 0.25, "sq_param": 100.0}
    u32 = 2.0**-24
    # s = 1, fp32: the losses and the inner products only: 4u(|ℓ| + |ℓ⁺| + (2 + 3)·0.5)
    assert metrics.noise_floor(sums, 1.0, -2.0, 1.0, "fp32") == 4 * u32 * (3.0 + 2.5)
    # s = 0.5: plus the rounded probe point, (2 + 3)·(2·10 + 0.25)
    assert metrics.noise_floor(sums, 1.0, -2.0, 0.5, "fp32") == 4 * u32 * (3.0 + 1.25 + 101.25)
    assert metrics.noise_floor(sums, 1.0, -2.0, 1.0, "bf16") == 4 * 2.0**-8 * (3.0 + 2.5 + 102.5)
    with pytest.raises(ValueError):
        metrics.noise_floor(sums, 1.0, 1.0, 1.0, "int8")
    assert metrics.classify(-1.0, 0.5) == "holds"
    assert metrics.classify(1.0, 0.5) == "violated"
    assert metrics.classify(0.5, 0.5) == metrics.classify(-0.5, 0.5) == "indeterminate"
    assert metrics.classify(None, 0.5) is None


def test_zero_update_flags_and_nulls():
    t = _random_case()
    t["delta"] = torch.zeros_like(t["delta"])
    sums = totals(unpack(pack(local_sums([Fragment(group=0, **t)], 1), torch.zeros(4)), 1)[0])
    for m in (metrics.derive(sums, 3.0, 3.0 + 1e-9, 1.0),
              reference_metrics(t["x"], t["g"], t["delta"], t["g_plus"], 3.0, 3.0 + 1e-9, 1.0,
                                delta_prev=t["delta_prev"], g_prev=t["g_prev"])):
        assert m["flag"] == "zero_update"
        for k in ("smoothness_local", "smoothness_descent", "curvature_secant", "step_alpha",
                  "cos_grad_update", "cos_update_prev"):
            assert m[k] is None, k
        assert m["update_norm"] == 0.0 and m["update_to_param"] == 0.0
        assert m["convexity_gap_fwd"] == pytest.approx(-1e-9, rel=1e-6)  # −δ: a reproducibility check
        assert m["cos_grad_prev"] is not None and m["grad_norm"] > 0


def test_no_probe_flags_and_nulls():
    t = _random_case()
    t["g_plus"] = None
    sums = totals(unpack(pack(local_sums([Fragment(group=0, **t)], 1),
                              torch.tensor([3.0, math.nan, 0.0, math.nan])), 1)[0])
    m = metrics.derive(sums, 3.0, math.nan, math.nan)
    assert m["flag"] == "no_probe"
    for k in ("loss_change", "convexity_gap_fwd", "convexity_gap_bwd", "trapezoid_residual",
              "smoothness_local", "curvature_secant", "step_alpha", "noise_floor",
              "cls_convexity_fwd", "cls_convexity_bwd"):
        assert m[k] is None, k
    assert m["cos_grad_update"] == pytest.approx(
        float(t["g"] @ t["delta"] / (t["g"].norm() * t["delta"].norm())), rel=1e-12)


def test_summarize_fractions_and_ratio():
    def row(fwd, bwd, L, loss, lp, ip, sq, s, flag=None):
        return dict(cls_convexity_fwd=fwd, cls_convexity_bwd=bwd, smoothness_local=L, loss=loss,
                    loss_probe=lp, ip_grad_update=ip, sq_update=sq, probe_s=s, flag=flag)
    rows = [row("holds", "holds", 1.0, 2.0, 1.5, -1.0, 0.5, 1.0),
            row("holds", "violated", 3.0, 1.0, 0.9, -0.4, 0.2, 0.5),
            row("violated", "violated", 2.0, 1.0, 1.0, -0.1, 0.1, 1.0),
            row("indeterminate", None, None, 1.0, math.nan, -0.1, 0.1, 1.0),
            row("holds", "holds", 99.0, 5.0, 0.0, 0.0, 0.0, 1.0, flag="zero_update"),
            row(None, None, None, 5.0, math.nan, 1.0, 1.0, math.nan, flag="no_probe")]
    out = metrics.summarize(rows)
    assert out["n_measured"] == 6 and out["n_flagged"] == 2
    assert out["frac_convexity_fwd_holds"] == 2 / 4
    assert out["frac_convexity_fwd_violated"] == 1 / 4
    assert out["frac_convexity_fwd_indeterminate"] == 1 / 4
    assert out["frac_convexity_bwd_holds"] == 1 / 3 and out["frac_convexity_bwd_violated"] == 2 / 3
    assert out["frac_convexity_bwd_indeterminate"] == 0.0
    assert out["smoothness_local_median"] == 2.0 and out["smoothness_local_max"] == 3.0
    # Σ(δ − s⟨g,Δ⟩) / (½Σ s²‖Δ‖²) over the finite unflagged rows (the 4th has no ℓ⁺)
    num = (-0.5 + 1.0) + (-0.1 + 0.5 * 0.4) + (0.0 + 0.1)
    den = 0.5 * (0.5 + 0.25 * 0.2 + 0.1)
    assert out["smoothness_ratio"] == pytest.approx(num / den, rel=1e-12)
    assert math.isnan(metrics.summarize([])["smoothness_ratio"])


def test_validation_errors():
    x = torch.zeros(4)
    with pytest.raises(ValueError):
        Fragment(group=0, x=x, g=torch.zeros(5))
    with pytest.raises(ValueError):
        Fragment(group=-1, x=x)
    with pytest.raises(ValueError):
        local_sums([Fragment(group=2, x=x)], 2)
    with pytest.raises(ValueError):
        pack(torch.zeros(len(SUM_NAMES), 2, dtype=torch.float64), torch.zeros(2))
    with pytest.raises(ValueError):
        unpack(torch.zeros(5, dtype=torch.float64), 2)
