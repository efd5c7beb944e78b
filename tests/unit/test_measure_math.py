"""The metric math of opt_study.measure against the float64 oracle and docs/METRICS.md's closed forms.

Sharding is simulated: each parameter's flat vector is cut into contiguous pieces, one per
"rank"; each rank packs its local sums and the packed vectors are added, exactly what
all_reduce(SUM) does. Tolerances are docs/METRICS.md's scale-aware ones (§Correctness contract).
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest
import torch

from opt_study.measure import fused_sums, metrics
from opt_study.measure.reference import reference_metrics, reference_sums
from opt_study.measure.shards import FlatShard, flatten
from opt_study.measure.sums import (
    CHUNK,
    LOSS_NAMES,
    SUM_NAMES,
    Fragment,
    flat_sums,
    flat_sums_torch,
    group_runs,
    local_sums,
    pack,
    totals,
    unpack,
)

FIELDS = ("x", "g", "delta", "g_plus", "x0", "delta_prev", "g_prev")
# The sums of squares whose roots scale each sum's error (docs/METRICS.md §Correctness contract:
# 1e-6·‖a‖‖b‖).
SCALE = {
    "ip_grad_update": ("sq_grad", "sq_update"),
    "ip_probe_update": ("sq_grad_probe", "sq_update"),
    "ip_param_update": ("sq_param", "sq_update"),
    "ip_param_grad": ("sq_param", "sq_grad"),
    "ip_update_prev": ("sq_update", "sq_update_prev"),
    "ip_grad_prev": ("sq_grad", "sq_grad_prev"),
}


def _random_params(gen: torch.Generator, sizes, dtype=torch.float32) -> list[dict]:
    params = []
    for n in sizes:
        r = lambda scale=1.0, n=n: scale * torch.randn(n, generator=gen, dtype=torch.float64)  # noqa: E731
        x0 = r()
        x = x0 + r(0.1)
        g = r(0.01) + 0.003
        gp = g + r(1e-4)  # g⁺ ≈ g: the case where ‖g⁺‖² − 2⟨g⁺,g⟩ + ‖g‖² would cancel
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
        frags = [
            Fragment(group=grp, **{k: (None if k in drop else v[c[r] : c[r + 1]]) for k, v in p.items()})
            for p, grp, c in zip(params, groups, cuts)
        ]
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
    losses = [
        [2.0 + r, 1.9 + r, float(r == 0), 0.5 * r, 7.0 + r, 8.0 + r, 2.1 + r, 0.3 * r, 9.0 + r, 0.2 * r, 4.0 + r]
        for r in range(ranks)
    ]
    per_group, scalars = _sharded_packed(params, groups, 3, ranks, gen, losses, chunk=chunk)
    assert set(per_group) == set(SUM_NAMES) and set(scalars) == set(LOSS_NAMES)
    for j in range(3):
        full = {k: torch.cat([p[k] for p, grp in zip(params, groups) if grp == j]) for k in FIELDS}
        ref = reference_sums(**full)
        _assert_sums_close({k: float(v[j]) for k, v in per_group.items()}, ref)
    assert scalars["loss"] == pytest.approx(np.mean([ls[0] for ls in losses]), rel=1e-12)
    assert scalars["loss_probe"] == pytest.approx(np.mean([ls[1] for ls in losses]), rel=1e-12)
    assert scalars["stop_votes"] == 1.0 / ranks  # each rank's share, like the losses
    assert scalars["sq_grad_small"] == pytest.approx(np.mean([0.5 * r for r in range(ranks)]), rel=1e-12)
    assert scalars["loss_scale"] == pytest.approx(np.mean([ls[4] for ls in losses]), rel=1e-12)
    assert scalars["loss_probe_scale"] == pytest.approx(np.mean([ls[5] for ls in losses]), rel=1e-12)
    assert scalars["nb_loss_prev"] == pytest.approx(np.mean([ls[6] for ls in losses]), rel=1e-12)
    assert scalars["nb_ip_grad_update"] == pytest.approx(np.mean([ls[7] for ls in losses]), rel=1e-12)
    for i, k in enumerate(("nb_loss_prev_scale", "grad_history_ip", "grad_history_sq"), start=8):
        assert scalars[k] == pytest.approx(np.mean([ls[i] for ls in losses]), rel=1e-12), k


def test_missing_inputs_are_nan_after_reduction():
    gen = torch.Generator().manual_seed(3)
    params = _random_params(gen, [50, 130])
    per_group, scalars = _sharded_packed(
        params, [0, 1], 2, 2, gen, [[1.0, math.nan, 0.0, *[math.nan] * 8]] * 2, drop=("g_plus", "x0")
    )
    full = {k: (None if k in ("g_plus", "x0") else torch.cat([p[k] for p in params])) for k in FIELDS}
    ref = reference_sums(**full)
    got = totals(per_group)
    assert (
        {k for k, v in got.items() if math.isnan(v)}
        == {k for k, v in ref.items() if math.isnan(v)}
        == {"sq_grad_probe", "ip_probe_update", "sq_grad_diff", "sq_dist_init", "abs_probe_param", "abs_probe_update"}
    )
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
    c = torch.randn(n, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    x = torch.randn(12, 20, generator=gen, dtype=torch.float64).reshape(-1).to(dtype).double()
    d = -0.1 * A @ (x - c) + 0.05 * torch.randn(n, generator=gen, dtype=torch.float64)
    d = d.to(dtype).double()  # Δ arbitrary; x and Δ exact in `dtype`
    f = lambda y: float(0.5 * (y - c) @ A @ (y - c))  # noqa: E731
    p = x + s * d
    return dict(A=A, lam=lam, x=x, d=d, g=A @ (x - c), gp=A @ (p - c), loss=f(x), loss_probe=f(p))


@pytest.mark.parametrize("s", [1.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_quadratic_closed_forms(dtype, s):
    q = _quadratic(dtype, s)
    A, x, d, g, gp = q["A"], q["x"], q["d"], q["g"], q["gp"]
    half = x.numel() // 2  # two "ranks", two groups
    frags = [
        Fragment(group=j, x=x[sl].to(dtype), g=g[sl].to(dtype), delta=d[sl].to(dtype), g_plus=gp[sl].to(dtype))
        for j, sl in enumerate((slice(0, half), slice(half, None)))
    ]
    sums = totals(unpack(pack(local_sums(frags, 2), torch.zeros(len(LOSS_NAMES))), 2)[0])
    prec = "fp64" if dtype == torch.float64 else "fp32"
    via_sums = metrics.derive(sums, q["loss"], q["loss_probe"], s, prec)
    via_ref = reference_metrics(
        x.to(dtype), g.to(dtype), d.to(dtype), gp.to(dtype), q["loss"], q["loss_probe"], s, precision=prec
    )
    seg = s * d
    quad = float(seg @ A @ seg)  # (sΔ)ᵀA(sΔ)
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
    sums = totals(unpack(pack(local_sums([Fragment(group=0, **t)], 1), torch.zeros(len(LOSS_NAMES))), 1)[0])
    got = metrics.derive(sums, 3.0, 2.5, s, precision)
    ref = reference_metrics(
        t["x"],
        t["g"],
        t["delta"],
        t["g_plus"],
        3.0,
        2.5,
        s,
        delta_prev=t["delta_prev"],
        g_prev=t["g_prev"],
        precision=precision,
    )
    assert set(got) == set(ref) == set(metrics.OUTPUT_NAMES)
    for k, v in ref.items():
        if isinstance(v, float):
            assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
        else:
            assert got[k] == v, k
    assert got["flag"] is None and got["cls_convexity_fwd"] is not None


def test_noise_floor_formula_and_classification():
    sums = {"sq_grad": 4.0, "sq_grad_probe": 9.0, "sq_update": 0.25, "sq_param": 100.0, "sq_grad_diff": 1.0}
    sums.update({"abs_grad_param": 7.0, "abs_probe_param": 11.0, "abs_probe_update": 2.0})
    u32 = 2.0**-24
    # s = 1, fp32: the losses and the inner products only: 4u(|ℓ| + |ℓ⁺| + (2 + 3)·0.5)
    assert metrics.noise_floor(sums, 1.0, -2.0, 1.0, "fp32") == 4 * u32 * (3.0 + 2.5)
    # the losses' rounding magnitudes M, M⁺ (lossscale) take the place of |ℓ|, |ℓ⁺|
    assert metrics.noise_floor(sums, 1.0, -2.0, 1.0, "fp32", loss_scales=(7.0, 8.0)) == 4 * u32 * (15.0 + 2.5)
    # s = 0.5: plus the rounded probe point, for the losses (2 + 3)·(2·10 + 0.25) and for the
    # gradients ‖g⁺ − g‖·(2·10 + 0.25) and the weight rounding Σ|g||x| + Σ|g⁺||x| + |s|Σ|g⁺||Δ|
    assert metrics.noise_floor(sums, 1.0, -2.0, 0.5, "fp32") == 4 * u32 * (3.0 + 1.25 + 101.25 + 20.25 + 19.0)
    assert metrics.noise_floor(sums, 1.0, -2.0, 1.0, "bf16") == 4 * 2.0**-8 * (3.0 + 2.5 + 102.5 + 20.5 + 20.0)
    # without the weight-rounding sums a rounded point has no floor (never a silently smaller one)
    bare = {k: v for k, v in sums.items() if not k.startswith("abs_")}
    assert math.isnan(metrics.noise_floor(bare, 1.0, -2.0, 1.0, "bf16"))
    assert metrics.noise_floor(bare, 1.0, -2.0, 1.0, "fp32") == 4 * u32 * (3.0 + 2.5)
    with pytest.raises(ValueError):
        metrics.noise_floor(sums, 1.0, 1.0, 1.0, "int8")
    assert metrics.classify(-1.0, 0.5) == "holds"
    assert metrics.classify(1.0, 0.5) == "violated"
    assert metrics.classify(0.5, 0.5) == metrics.classify(-0.5, 0.5) == "indeterminate"
    assert metrics.classify(None, 0.5) is None


def test_zero_update_flags_and_nulls():
    t = _random_case()
    t["delta"] = torch.zeros_like(t["delta"])
    sums = totals(unpack(pack(local_sums([Fragment(group=0, **t)], 1), torch.zeros(len(LOSS_NAMES))), 1)[0])
    for m in (
        metrics.derive(sums, 3.0, 3.0 + 1e-9, 1.0),
        reference_metrics(
            t["x"],
            t["g"],
            t["delta"],
            t["g_plus"],
            3.0,
            3.0 + 1e-9,
            1.0,
            delta_prev=t["delta_prev"],
            g_prev=t["g_prev"],
        ),
    ):
        assert m["flag"] == "zero_update"
        for k in (
            "smoothness_local",
            "smoothness_descent",
            "curvature_secant",
            "step_alpha",
            "cos_grad_update",
            "cos_update_prev",
        ):
            assert m[k] is None, k
        assert m["update_norm"] == 0.0 and m["update_to_param"] == 0.0
        assert m["convexity_gap_fwd"] == pytest.approx(-1e-9, rel=1e-6)  # −δ: a reproducibility check
        assert m["cos_grad_prev"] is not None and m["grad_norm"] > 0


def test_no_probe_flags_and_nulls():
    t = _random_case()
    t["g_plus"] = None
    sums = totals(
        unpack(
            pack(
                local_sums([Fragment(group=0, **t)], 1),
                torch.tensor([3.0, math.nan, 0.0, *[math.nan] * 8]),
            ),
            1,
        )[0]
    )
    m = metrics.derive(sums, 3.0, math.nan, math.nan)
    assert m["flag"] == "no_probe"
    for k in (
        "loss_change",
        "convexity_gap_fwd",
        "convexity_gap_bwd",
        "trapezoid_residual",
        "smoothness_local",
        "curvature_secant",
        "step_alpha",
        "noise_floor",
        "cls_convexity_fwd",
        "cls_convexity_bwd",
    ):
        assert m[k] is None, k
    assert m["cos_grad_update"] == pytest.approx(
        float(t["g"] @ t["delta"] / (t["g"].norm() * t["delta"].norm())), rel=1e-12
    )


def test_summarize_fractions_and_ratio():
    def row(fwd, bwd, L, loss, lp, ip, sq, s, flag=None):
        return dict(
            cls_convexity_fwd=fwd,
            cls_convexity_bwd=bwd,
            smoothness_local=L,
            loss=loss,
            loss_probe=lp,
            ip_grad_update=ip,
            sq_update=sq,
            probe_s=s,
            flag=flag,
        )

    rows = [
        row("holds", "holds", 1.0, 2.0, 1.5, -1.0, 0.5, 1.0),
        row("holds", "violated", 3.0, 1.0, 0.9, -0.4, 0.2, 0.5),
        row("violated", "violated", 2.0, 1.0, 1.0, -0.1, 0.1, 1.0),
        row("indeterminate", None, None, 1.0, math.nan, -0.1, 0.1, 1.0),
        row("holds", "holds", 99.0, 5.0, 0.0, 0.0, 0.0, 1.0, flag="zero_update"),
        row(None, None, None, 5.0, math.nan, 1.0, 1.0, math.nan, flag="no_probe"),
    ]
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
    x = torch.zeros(len(LOSS_NAMES))
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


# ------------------------------------------------------------------ flat buffers (the hook's path)
def _flat_packed(params, groups, n_groups, ranks, gen, chunk=CHUNK, drop=()):
    """Like _sharded_packed, but each rank keeps every vector in ONE flat buffer (shards.flatten,
    fragments in parameter order) and sums it with flat_sums over group_runs."""
    total = None
    cuts = [_cuts(gen, p["x"].numel(), ranks) for p in params]
    for r in range(ranks):
        kept = {k: flatten([p[k][c[r] : c[r + 1]] for p, c in zip(params, cuts)]) for k in FIELDS}
        runs = group_runs(kept["x"].sizes, groups)
        vectors = {k: (None if k in drop else v.flat) for k, v in kept.items()}
        part = pack(flat_sums(vectors, runs, n_groups, chunk=chunk), torch.zeros(len(LOSS_NAMES)))
        total = part if total is None else total + part
    return unpack(total, n_groups)[0]


@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.parametrize("chunk", [CHUNK, 97])
def test_flat_sums_equal_reference(ranks, chunk):
    """Groups interleave (group 0 comes back after group 2), so a group has several runs; the
    fp32 flat buffers of fp32 inputs equal the inputs, so the float64 reference applies."""
    gen = torch.Generator().manual_seed(100 * ranks + chunk)
    sizes, groups = [1, 7, 300, 5000, 70_000, 40, 2_000, 130_000], [0, 0, 1, 1, 2, 2, 2, 0]
    params = _random_params(gen, sizes)
    per_group = _flat_packed(params, groups, 3, ranks, gen, chunk=chunk)
    for j in range(3):
        full = {k: torch.cat([p[k] for p, grp in zip(params, groups) if grp == j]) for k in FIELDS}
        _assert_sums_close({k: float(v[j]) for k, v in per_group.items()}, reference_sums(**full))


def test_flat_sums_missing_vectors_are_nan_and_agree_with_local_sums():
    gen = torch.Generator().manual_seed(11)
    params = _random_params(gen, [50, 130, 3000])
    drop = ("g_plus", "x0")
    flat = totals(_flat_packed(params, [0, 1, 1], 2, 2, torch.Generator().manual_seed(1), drop=drop))
    frag = totals(
        _sharded_packed(
            params, [0, 1, 1], 2, 2, torch.Generator().manual_seed(1), [[0.0] * len(LOSS_NAMES)] * 2, drop=drop
        )[0]
    )
    nan = {k for k, v in flat.items() if math.isnan(v)}
    assert (
        nan
        == {k for k, v in frag.items() if math.isnan(v)}
        == {"sq_grad_probe", "ip_probe_update", "sq_grad_diff", "sq_dist_init", "abs_probe_param", "abs_probe_update"}
    )
    ref = reference_sums(**{k: (None if k in drop else torch.cat([p[k] for p in params])) for k in FIELDS})
    _assert_sums_close(flat, ref)
    _assert_sums_close(frag, ref)


def test_flat_sums_only_and_groups_without_runs():
    x, g = torch.arange(1.0, 7.0), torch.full((6,), 2.0)
    out = flat_sums({"x": x, "g": g, "delta": None}, [(1, 0, 2), (2, 2, 6)], 4, only=("sq_param", "sq_update"))
    rows = {n: out[i] for i, n in enumerate(SUM_NAMES)}
    assert rows["sq_param"].tolist() == [0.0, 1.0 + 4.0, 9.0 + 16.0 + 25.0 + 36.0, 0.0]
    # Δ is missing: NaN in the groups this rank holds, 0 where it holds nothing
    assert rows["sq_update"][[1, 2]].isnan().all() and rows["sq_update"][[0, 3]].tolist() == [0.0, 0.0]
    assert all(rows[n].isnan().all() for n in SUM_NAMES if n not in ("sq_param", "sq_update"))
    # float64 operands are summed in float64
    x64 = torch.tensor([1.0 + 2.0**-40, 1.0], dtype=torch.float64)
    exact = flat_sums({"x": x64}, [(0, 0, 2)], 1, only=("sq_param",))[SUM_NAMES.index("sq_param"), 0]
    assert exact.item() == (1.0 + 2.0**-40) ** 2 + 1.0


def test_group_runs():
    # empty fragments (a ZeRO-1/2 rank holding none of a parameter) join the run around them
    assert group_runs([3, 0, 2, 4, 0, 1, 5], [0, 1, 0, 1, 1, 0, 0]) == [(0, 0, 5), (1, 5, 9), (0, 9, 15)]
    assert group_runs([0, 0], [0, 1]) == []
    with pytest.raises(ValueError):
        group_runs([1, 2], [0])


def test_flatten_keeps_fragments_in_one_buffer():
    frags = [
        torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        torch.empty(0),
        torch.tensor([5.0], dtype=torch.bfloat16),
        torch.tensor([6.0, 7.0], dtype=torch.float64),
    ]
    fs = flatten(frags)
    assert fs.flat.dtype == torch.float32 and fs.flat.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert fs.sizes == (4, 0, 1, 2) and len(fs) == 4 and [t.numel() for t in fs] == [4, 0, 1, 2]
    fs[3][1] = 70.0  # parts are views of the one buffer, not copies
    assert fs.flat[-1].item() == 70.0 and frags[3][1].item() == 7.0
    assert all(t.untyped_storage().data_ptr() == fs.flat.untyped_storage().data_ptr() for t in fs)
    with pytest.raises(ValueError):
        FlatShard(torch.zeros(3), [1, 1])


def test_flat_sums_validation():
    x = torch.zeros(4)
    with pytest.raises(ValueError):
        flat_sums({"x": x, "grad": x}, [], 1)  # unknown vector name
    with pytest.raises(ValueError):
        flat_sums({"g": x}, [], 1)  # x is required
    with pytest.raises(ValueError):
        flat_sums({"x": x, "g": torch.zeros(5)}, [], 1)  # lengths differ
    with pytest.raises(ValueError):
        flat_sums({"x": x}, [(0, 2, 5)], 1)  # run past the end
    with pytest.raises(ValueError):
        flat_sums({"x": x}, [(1, 0, 4)], 1)  # group out of range
    with pytest.raises(ValueError):
        flat_sums({"x": x}, [(0, 0, 4)], 1, chunk=0)


# ------------------------------------------------------------------ the fused one-pass kernel
# Built by `make install` (opt_study.prebuild); without a C++ compiler flat_sums keeps its torch
# path, and these tests say so instead of passing vacuously.
needs_fused = pytest.mark.skipif(
    not fused_sums.available(), reason=f"fused sums kernel unavailable: {fused_sums.error()}"
)
NORM_ONLY = ("sq_grad", "sq_update", "sq_param")


def _interleaved(gen, sizes, n_groups):
    """Random fp32 vectors laid out in one flat buffer per field, fragments assigned to groups
    round-robin so that every group has several runs: (vectors, runs, group of each element)."""
    params = _random_params(gen, sizes)
    groups = [i % n_groups for i in range(len(sizes))]
    vectors = {k: torch.cat([p[k] for p in params]) for k in FIELDS}
    elem_group = torch.cat([torch.full((n,), grp) for n, grp in zip(sizes, groups)])
    return vectors, group_runs(sizes, groups), elem_group


def _assert_paths_close(got, vectors, elem_group, n_groups, only):
    """got [SUM_NAMES, n_groups] against the float64 reference per group: NaN exactly where a
    vector is missing or the sum is not in ``only``, else within 1e-6 of the scale ‖a‖‖b‖; a
    group with no element is 0 in every wanted sum (this rank holds none of it)."""
    for j in range(n_groups):
        sel = elem_group == j
        if not sel.any():
            assert [math.isnan(v) for v in got[:, j].tolist()] == [
                only is not None and n not in only for n in SUM_NAMES
            ]
            assert got[:, j].nan_to_num(0.0).abs().sum().item() == 0.0
            continue
        ref = reference_sums(**{k: (None if vectors.get(k) is None else vectors[k][sel]) for k in FIELDS})
        for i, name in enumerate(SUM_NAMES):
            value = got[i, j].item()
            if math.isnan(ref[name]) or (only is not None and name not in only):
                assert math.isnan(value), (name, j, value)
                continue
            a, b = SCALE.get(name, (name, name))
            scale = math.sqrt(ref[a] * ref[b])
            assert abs(value - ref[name]) <= 1e-6 * scale, (name, j, value, ref[name], scale)


@needs_fused
@pytest.mark.parametrize("sizes", [[1, 7], [3, 250, 9, 1000, 17], [300_000, 70_001, 5, 200_003]])
@pytest.mark.parametrize(
    "drop, only",
    [
        ((), None),  # a measured step with the probe
        (("g_plus",), None),  # no probe (the benchmark's target)
        ((), NORM_ONLY),  # an unmeasured step
        (("g", "x0"), None),  # patterns outside the compiled kernels: zeros read
        (("delta_prev", "g_plus"), ("ip_grad_prev", "sq_dist_init", "sq_grad_diff", "sq_update_prev")),
        (("g", "delta", "g_plus", "x0", "delta_prev", "g_prev"), None),  # x alone
    ],
)
def test_fused_and_torch_paths_agree_with_reference(sizes, drop, only):
    gen = torch.Generator().manual_seed(len(sizes) * 31 + len(drop))
    vectors, runs, elem_group = _interleaved(gen, sizes, 3)
    vectors = {k: (None if k in drop else v) for k, v in vectors.items()}
    fused = fused_sums.fused_sums(vectors, runs, 3, only=only)
    torch_path = flat_sums_torch(vectors, runs, 3, only=only)
    assert torch.equal(fused.isnan(), torch_path.isnan())
    _assert_paths_close(fused, vectors, elem_group, 3, only)
    _assert_paths_close(torch_path, vectors, elem_group, 3, only)


@needs_fused
def test_fused_accuracy_at_scale_and_groups_without_runs():
    """2M positive elements (rounding errors do not cancel) in one group, g⁺ = g + 1e-5 noise;
    group 0 holds no run: 0, never NaN."""
    gen = torch.Generator().manual_seed(6)
    n = 2_000_000
    x = (1.0 + torch.rand(n, generator=gen, dtype=torch.float64)).float()
    g = (1.0 + torch.rand(n, generator=gen, dtype=torch.float64)).float()
    gp = (g.double() + 1e-5 * torch.randn(n, generator=gen, dtype=torch.float64)).float()
    out = fused_sums.fused_sums({"x": x, "g": g, "delta": x, "g_plus": gp}, [(1, 0, n)], 2)
    ref = reference_sums(x, g, x, gp, None, None, None)
    for name in ("sq_param", "sq_grad", "ip_param_grad", "sq_grad_diff", "ip_probe_update"):
        assert abs(out[SUM_NAMES.index(name), 1].item() - ref[name]) <= 1e-6 * ref[name], name
    computed = [SUM_NAMES.index(k) for k, v in ref.items() if not math.isnan(v)]
    assert out[computed, 0].tolist() == [0.0] * len(computed)


@needs_fused
def test_flat_sums_dispatches_to_the_fused_kernel(monkeypatch):
    """CPU fp32 contiguous vectors go to the kernel; float64, strided views and
    OPT_STUDY_FUSED_SUMS=0 take the torch path (and then equal flat_sums_torch exactly)."""
    gen = torch.Generator().manual_seed(8)
    vectors, runs, _ = _interleaved(gen, [100, 3000, 70], 2)
    before = fused_sums.calls
    fast = flat_sums(vectors, runs, 2)
    assert fused_sums.calls == before + 1
    assert torch.equal(fast, fused_sums.fused_sums(vectors, runs, 2))
    n = vectors["x"].numel()
    strided = {k: torch.stack([v, v], 1)[:, 0] for k, v in vectors.items()}  # stride 2
    for other in ({k: v.double() for k, v in vectors.items()}, strided):
        assert torch.equal(flat_sums(other, runs, 2), flat_sums_torch(other, runs, 2))
    monkeypatch.setenv(fused_sums.ENV, "0")
    assert torch.equal(flat_sums(vectors, runs, 2), flat_sums_torch(vectors, runs, 2))
    assert fused_sums.calls == before + 2  # only the direct fused_sums call above
    with pytest.raises(RuntimeError):
        fused_sums.fused_sums({"x": vectors["x"].double()}, runs, 2)
    # the C entry point refuses a run past the end on its own (code -(2 + run index))
    kernel, out = fused_sums.load(), torch.zeros(2, len(SUM_NAMES), dtype=torch.float64)
    table = torch.tensor([[0, 0, n], [1, 0, n + 1]], dtype=torch.int64)
    ptrs = (ctypes.c_void_p * 7)(vectors["x"].data_ptr())
    assert kernel(0, ptrs, n, table.data_ptr(), 2, 2, out.data_ptr()) == -3
    assert out.abs().sum().item() == 0.0


def test_fused_kernel_falls_back_without_a_compiler(tmp_path):
    """No working compiler: available() is False with one warning, flat_sums still computes."""
    import os
    import subprocess
    import sys

    code = (
        "import warnings, torch\n"
        "from opt_study.measure import fused_sums, sums\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    ok = (fused_sums.available(), fused_sums.available())\n"
        "x = torch.arange(4.0)\n"
        "out = sums.flat_sums({'x': x}, [(0, 0, 4)], 1, only=('sq_param',))\n"
        "print(ok, len(w), out[sums.SUM_NAMES.index('sq_param'), 0].item(), fused_sums.calls)\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["(False,", "False)", "1", "14.0", "0"]
