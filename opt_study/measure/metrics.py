"""Derived metrics of docs/METRICS.md: pure functions of the global raw sums (online, analysis).

Definitions follow docs/METRICS.md §Derived metrics and §Noise floor; the tests check them
against the float64 single-process oracle in ``reference.py`` and against closed forms on a
quadratic.

The probe segment. The probe runs at p = x_t + sΔ_t, so every metric about the segment uses sΔ in
place of Δ: ⟨g, sΔ⟩ = s·ip_grad_update, ⟨g⁺, sΔ⟩ = s·ip_probe_update, ‖sΔ‖² = s²·sq_update
(the raw sums stay in terms of Δ). Norms and cosines describe the real update Δ and do not
depend on s.

The noise floor (``noise_floor``) bounds the rounding error of the quantities an inequality
compares, each term the first-order rounding of one computed input (Higham, §2.2 and §3.1;
the derivation: docs/METRICS.md §Noise floor):

    floor = c·( u_L·(M + M⁺)                              the two computed losses
              + u_G·(‖g‖ + ‖g⁺‖)·‖sΔ‖                     the inner products ⟨g,sΔ⟩, ⟨g⁺,sΔ⟩
              + r_L·u_L·(‖g‖ + ‖g⁺‖)·(2‖x‖ + ‖sΔ‖)       the losses' rounded evaluation points
              + r_G·u_G·‖g⁺ − g‖·(2‖x‖ + ‖sΔ‖) )          the gradients' rounded evaluation points

M, M⁺ (``loss_scale``, ``loss_probe_scale``) are the losses' rounding magnitudes read from the
logits in the same forwards (measure/lossscale.py): a cross-entropy's rounding scales with the
logits, not with |ℓ|. Where they are missing (a loss that is not a covered cross-entropy) the
floor uses |ℓ| and |ℓ⁺| instead: the floor of the first version, kept as the fallback and for
comparisons (``noise_floor`` without scales). u_G is the unit roundoff of ``precision`` (the
backward that produced g, g⁺: the row's ``grad_precision``, fp32 with measure.fp32_grads), u_L
that of ``loss_precision`` (default ``precision``). r_L = 0
when both points are exact master values read exactly by the loss's forward (fp32/fp64 losses
and s = 1), otherwise 1; r_G likewise for the gradients' forward and backward (fp32/fp64
``precision`` and s = 1). A gradient taken at a rounded point x̃ (|x̃ − x| ≤ u|x| elementwise) is
off by H(x̃ − x), and ⟨H(x̃ − x), sΔ⟩ ≤ u‖x‖‖H sΔ‖ with H sΔ ≈ g⁺ − g along the segment.
c = FLOOR_C = 4 covers the roundings the first-order count leaves out (the
subtraction ℓ⁺ − ℓ and the final roundings of each loss and dot; the chunked-dot error of
sums.py). An inequality "gap ≤ 0" is ``holds`` if gap < −floor, ``violated`` if gap > floor,
``indeterminate`` otherwise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

# The names of every column below (a new metric: its name there, its formula here).
from opt_study.measure import authors
from opt_study.measure.names import CLASSES as CLASSES
from opt_study.measure.names import DERIVED_NAMES as DERIVED_NAMES
from opt_study.measure.names import OUTPUT_NAMES as OUTPUT_NAMES

UNIT_ROUNDOFF: dict[str, float] = {"fp64": 2.0**-53, "fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11}
FLOOR_C = 4.0


def _f(v) -> float:
    """A float, NaN for None."""
    return math.nan if v is None else float(v)


def _root(v: float) -> float:
    return math.sqrt(v) if v >= 0 else math.nan  # NaN stays NaN (NaN >= 0 is False)


def _div(a: float, b: float) -> float:
    """a / b, NaN when b is 0 or either is NaN (never raises, never ±inf)."""
    return a / b if (b != 0 and math.isfinite(a) and math.isfinite(b)) else math.nan


def _cos(ip: float, norms: float) -> float:
    """A cosine clamped to [−1, 1]: the rounded sums can put |⟨a,b⟩| a few ulps above ‖a‖‖b‖."""
    return min(1.0, max(-1.0, _div(ip, norms))) if math.isfinite(_div(ip, norms)) else math.nan


def _out(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def classify(gap: float | None, floor: float | None) -> str | None:
    """'holds' / 'violated' / 'indeterminate' for the inequality gap ≤ 0; None if undefined."""
    if gap is None or floor is None or not (math.isfinite(gap) and math.isfinite(floor)):
        return None
    if gap < -floor:
        return "holds"
    if gap > floor:
        return "violated"
    return "indeterminate"


def group_metrics(sums: Mapping[str, float]) -> dict[str, float | None]:
    """The loss-free metrics (norms, ‖Δ‖/‖x‖, cosines): valid for one group's sums or totals."""
    s = {k: _f(v) for k, v in sums.items()}
    gn, un, pn = (
        _root(s.get("sq_grad", math.nan)),
        _root(s.get("sq_update", math.nan)),
        _root(s.get("sq_param", math.nan)),
    )
    un_prev = _root(s.get("sq_update_prev", math.nan))
    gn_prev = _root(s.get("sq_grad_prev", math.nan))
    vals = {
        "cos_grad_update": _cos(s.get("ip_grad_update", math.nan), gn * un),
        "cos_update_prev": _cos(s.get("ip_update_prev", math.nan), un * un_prev),
        "cos_grad_prev": _cos(s.get("ip_grad_prev", math.nan), gn * gn_prev),
        "grad_norm": gn,
        "update_norm": un,
        "param_norm": pn,
        "update_to_param": _div(un, pn),
    }
    return {k: _out(v) for k, v in vals.items()}


def noise_floor(
    sums: Mapping[str, float],
    loss: float,
    loss_probe: float,
    probe_s: float,
    precision: str = "fp32",
    floor_c: float = FLOOR_C,
    loss_precision: str | None = None,
    loss_scales: tuple[float | None, float | None] | None = None,
) -> float:
    """The floor of the module docstring; NaN where an input is missing.

    ``precision``: the gradients' arithmetic (u_G); ``loss_precision``: the losses' (u_L),
    default ``precision``. ``loss_scales``: (M, M⁺); when either is missing, (|ℓ|, |ℓ⁺|).
    """
    loss_precision, u_g, u_l = _unit_roundoffs(precision, loss_precision)
    s = _f(probe_s)
    gsum = _root(_f(sums.get("sq_grad"))) + _root(_f(sums.get("sq_grad_probe")))
    seg = abs(s) * _root(_f(sums.get("sq_update")))
    m, m_p = _loss_magnitudes(loss_scales, loss, loss_probe)
    scale = u_l * (m + m_p) + u_g * gsum * seg
    reach = 2.0 * _root(_f(sums.get("sq_param"))) + seg  # ‖x‖ + ‖p‖ ≤ 2‖x‖ + ‖sΔ‖
    if loss_precision in ("bf16", "fp16") or s != 1.0:  # the losses' evaluation points are rounded
        scale += u_l * gsum * reach
    if precision in ("bf16", "fp16") or s != 1.0:  # the gradients' points are rounded: H·(x̃ − x)
        scale += u_g * reach * _root(_f(sums.get("sq_grad_diff")))  # ‖H sΔ‖ ≈ ‖g⁺ − g‖
        scale += u_g * weight_rounding(sums, s)  # a convex f's gap at rounded points
    return floor_c * scale


def weight_rounding(sums: Mapping[str, float], probe_s: float) -> float:
    """W = Σ|g_i||x_i| + Σ|g⁺_i||p_i|, the weight-rounding term of the floor (times u_G), with
    Σ|g⁺_i||p_i| ≤ Σ|g⁺_i||x_i| + |s|·Σ|g⁺_i||Δ_i| (p = x + sΔ). If f is convex, a gradient g̃
    read at x̃ (|x̃_i − x_i| ≤ u|x_i|) moves the computed gap at x above the true one by at most
    ⟨∇f(x) − g̃, x − x̃⟩ ≤ u·Σ(|∇f(x)_i| + |g̃_i|)|x_i| ≈ 2u·Σ|g̃_i||x_i|, and likewise at p
    (docs/METRICS.md §Noise floor; Higham 2002, §2.2 for |x̃ − x| ≤ u|x|). NaN when missing."""
    a = _f(sums.get("abs_grad_param"))
    a_p = _f(sums.get("abs_probe_param")) + abs(_f(probe_s)) * _f(sums.get("abs_probe_update"))
    return a + a_p


def next_batch_floor(
    sums: Mapping[str, float],
    loss: float,
    loss_prev: float,
    precision: str = "fp32",
    floor_c: float = FLOOR_C,
    loss_precision: str | None = None,
    loss_scales: tuple[float | None, float | None] | None = None,
) -> float:
    """The noise floor of nb_convexity_gap = ℓ_t − f(x_{t−1}; B_t) − ⟨g_t, Δ_{t−1}⟩, the terms
    of ``noise_floor`` for its inputs (docs/METRICS.md §Next-batch gap; Higham 2002, §2.2, §3.1):

        c·( u_L·(M + M_prev) + u_G·‖g‖·‖Δ_{t−1}‖
          + r_L·u_L·‖g‖·(2‖x‖ + ‖Δ_{t−1}‖) + r_G·2u_G·Σ|g_i||x_i| )

    r_L = 1 for bf16/fp16 losses (both points read rounded), r_G = 1 for bf16/fp16 gradients
    (g read at rounded x_t: a convex f's gap then rises by at most ≈ 2u·Σ|g_i||x_i|,
    ``weight_rounding``). ``loss_scales``: (M of ℓ_t, M of f(x_{t−1}; B_t)); missing: |ℓ|."""
    loss_precision, u_g, u_l = _unit_roundoffs(precision, loss_precision)
    g, dp = _root(_f(sums.get("sq_grad"))), _root(_f(sums.get("sq_update_prev")))
    m, m_prev = _loss_magnitudes(loss_scales, loss, loss_prev)
    scale = u_l * (m + m_prev) + u_g * g * dp
    if loss_precision in ("bf16", "fp16"):
        scale += u_l * g * (2.0 * _root(_f(sums.get("sq_param"))) + dp)
    if precision in ("bf16", "fp16"):
        scale += 2.0 * u_g * _f(sums.get("abs_grad_param"))
    return floor_c * scale


def _unit_roundoffs(precision: str, loss_precision: str | None) -> tuple[str, float, float]:
    """(loss precision, u_G, u_L) of the floors: the losses' precision defaults to the gradients'."""
    loss_precision = precision if loss_precision is None else loss_precision
    for p in (precision, loss_precision):
        if p not in UNIT_ROUNDOFF:
            raise ValueError(f"precision must be one of {sorted(UNIT_ROUNDOFF)}, got {p!r}")
    return loss_precision, UNIT_ROUNDOFF[precision], UNIT_ROUNDOFF[loss_precision]


def _loss_magnitudes(loss_scales, loss: float, other: float) -> tuple[float, float]:
    """The two losses' rounding magnitudes (M, M'): the captured ones, else (|ℓ|, |ℓ'|)."""
    m, m_other = (_f(v) for v in (loss_scales or (None, None)))
    if math.isfinite(m) and math.isfinite(m_other):
        return m, m_other
    return abs(_f(loss)), abs(_f(other))


def _flag(sq_update: float, loss_probe: float, probe_s: float) -> str | None:
    reasons = []
    if sq_update == 0:
        reasons.append("zero_update")
    elif probe_s == 0:
        reasons.append("zero_probe_s")
    if not (math.isfinite(loss_probe) and math.isfinite(probe_s)):
        reasons.append("no_probe")
    return ",".join(reasons) or None


def derive(
    sums: Mapping[str, float],
    loss: float,
    loss_probe: float,
    probe_s: float,
    precision: str = "fp32",
    *,
    floor_c: float = FLOOR_C,
    loss_precision: str | None = None,
    loss_scales: tuple[float | None, float | None] | None = None,
) -> dict[str, float | str | None]:
    """Every derived column of docs/METRICS.md (OUTPUT_NAMES) from the global sums of one step.

    ``precision`` is the arithmetic of the gradients, ``loss_precision`` that of ℓ and ℓ⁺
    (default ``precision``; "fp32" when the losses were re-evaluated in fp32): both only set
    the noise floor, as do ``loss_scales`` (M, M⁺: ``noise_floor``).

    ``sums`` maps SUM_NAMES to totals (NaN/None for missing ones). Undefined values are None:
    a missing input, a zero segment ("zero_update" / "zero_probe_s" in ``flag``: every metric
    dividing by ‖Δ‖ is None; the gaps stay, they then measure the loss's reproducibility), no
    probe ("no_probe": every probe metric is None).
    """
    S = {k: _f(v) for k, v in sums.items()}
    get = lambda k: S.get(k, math.nan)  # noqa: E731
    ell, ell_p, s = _f(loss), _f(loss_probe), _f(probe_s)
    delta = ell_p - ell  # δ_t
    ip_g = s * get("ip_grad_update")  # ⟨g, sΔ⟩
    ip_gp = s * get("ip_probe_update")  # ⟨g⁺, sΔ⟩
    sq_seg = s * s * get("sq_update")  # ‖sΔ‖²
    gap_fwd = ip_g - delta
    gap_bwd = delta - ip_gp
    floor = noise_floor(S, ell, ell_p, s, precision, floor_c, loss_precision, loss_scales)
    vals = {
        "loss_change": delta,
        "convexity_gap_fwd": gap_fwd,
        "convexity_gap_bwd": gap_bwd,
        "trapezoid_residual": delta - 0.5 * (ip_g + ip_gp),
        "smoothness_local": _div(_root(get("sq_grad_diff")), _root(sq_seg)),
        # Σ_i ‖g⁺_i − g_i‖ / Σ_i ‖sΔ_i‖ over tensors (tranhp98/some_projects, compute_smoothness in
        # test_properties/transformers/run_clm.py lines 340-346; docs/METRICS.md §Derived metrics)
        "smoothness_authors": _div(get("tensor_norm_grad_diff"), abs(s) * get("tensor_norm_update")),
        "smoothness_descent": _div(2.0 * (delta - ip_g), sq_seg),
        "smoothness_descent_band": _div(2.0 * floor, sq_seg),  # its numerator is uncertain by ±floor
        "curvature_secant": _div(ip_gp - ip_g, sq_seg),
        "step_alpha": _div(-get("ip_probe_update"), get("ip_grad_update")),  # s cancels
        "noise_floor": floor,
    }
    out: dict[str, float | str | None] = {k: _out(v) for k, v in vals.items()}
    out.update(group_metrics(S))
    out["cls_convexity_fwd"] = classify(out["convexity_gap_fwd"], out["noise_floor"])
    out["cls_convexity_bwd"] = classify(out["convexity_gap_bwd"], out["noise_floor"])
    out["flag"] = _flag(get("sq_update"), ell_p, s)
    return {k: out[k] for k in OUTPUT_NAMES}


def summarize(rows: Sequence[Mapping]) -> dict[str, float]:
    """Per-trial summary over the measured rows of one trial (one row per measured step, holding
    the total sums, ``loss``, ``loss_probe``, ``probe_s``, the ``derive`` columns and ``flag``).

    Rows with a flag (zero update, no probe, ...) count in ``n_measured`` and ``n_flagged`` and
    are excluded from every other statistic. Fractions are over the unflagged rows with a class;
    the effective smoothness ratio Σ(δ_t − ⟨g_t, s_tΔ_t⟩) / (½ Σ‖s_tΔ_t‖²) sums before dividing
    (docs/METRICS.md §Aggregates). An undefined statistic is NaN.
    """
    ok = [r for r in rows if not r.get("flag")]
    out: dict[str, float] = {"n_measured": float(len(rows)), "n_flagged": float(len(rows) - len(ok))}
    for side in ("fwd", "bwd"):
        cls = [r.get(f"cls_convexity_{side}") for r in ok]
        cls = [c for c in cls if c is not None]
        for c in CLASSES:
            out[f"frac_convexity_{side}_{c}"] = _div(float(cls.count(c)), float(len(cls)))
    L = [x for x in (_f(r.get("smoothness_local")) for r in ok) if math.isfinite(x)]
    out["smoothness_local_median"] = statistics.median(L) if L else math.nan
    out["smoothness_local_max"] = max(L) if L else math.nan
    num = den = 0.0
    for r in ok:
        s = _f(r.get("probe_s"))
        d = _f(r.get("loss_probe")) - _f(r.get("loss"))
        n_i, d_i = d - s * _f(r.get("ip_grad_update")), 0.5 * s * s * _f(r.get("sq_update"))
        if math.isfinite(n_i) and math.isfinite(d_i):
            num, den = num + n_i, den + d_i
    out["smoothness_ratio"] = _div(num, den)
    out.update(authors.summary(rows))  # the authors' own aggregates (measure/authors.py)
    out.update(curvature_summary(rows))
    return out


def curvature_summary(rows: Sequence[Mapping]) -> dict[str, float]:
    """The online curvature's per-trial statistics over the rows with a finite value, in step
    order, flagged rows included (a zero update still has a Hessian): the median over the last
    quarter of them (the late phase, where Cohen et al. 2021, https://arxiv.org/abs/2103.00065,
    find λ_max hovering at 2/η) and the max. NaN without values."""
    ordered = sorted(rows, key=lambda r: r.get("step", 0))
    out = {}
    for col in ("sharpness", "sharpness_precond", "critical_sharpness"):
        vals = [x for x in (_f(r.get(col)) for r in ordered) if math.isfinite(x)]
        out[f"{col}_late_median"] = late_median(vals)
        if col == "sharpness":
            out["sharpness_max"] = max(vals) if vals else math.nan
    return out


def late_median(values: Sequence[float]) -> float:
    """The median of the last quarter (at least one) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    return statistics.median(values[len(values) - max(1, len(values) // 4) :])
