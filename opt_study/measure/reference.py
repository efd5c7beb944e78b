"""The tests' oracle: every raw sum and derived metric of docs/METRICS.md from FULL tensors in float64.

Single process, plain PyTorch, written to follow docs/METRICS.md line by line and deliberately
independent of ``sums.py`` and ``metrics.py`` (no imports from them, no shared helpers): derived
metrics come from the tensors themselves (e.g. smoothness_local = ‖g⁺ − g‖ / ‖sΔ‖ from the
vectors, not from sq_grad_diff). Any tensor argument may be None; what needs it is then NaN
(sums) or None (metrics). The noise-floor formula is restated from metrics.py's docstring on
purpose, so that a change to one without the other fails the tests.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_U = {"fp64": 2.0**-53, "fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11}


def _v(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to("cpu", torch.float64).reshape(-1)


def _dot(a: Tensor | None, b: Tensor | None) -> float:
    return math.nan if a is None or b is None else float(torch.dot(a, b))


def _norm(a: Tensor | None) -> float:
    return math.nan if a is None else float(torch.linalg.vector_norm(a))


def _sub(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return None if a is None or b is None else a - b


def _abs(a: Tensor | None) -> Tensor | None:
    return None if a is None else a.abs()


def reference_sums(x, g, delta, g_plus, x0, delta_prev, g_prev) -> dict[str, float]:
    """The raw sums of docs/METRICS.md §Raw sums over full 1-D tensors, in float64."""
    x, g, d, gp, x0, dp, gq = (_v(t) for t in (x, g, delta, g_plus, x0, delta_prev, g_prev))
    return {
        "sq_grad": _dot(g, g),  # ‖g_t‖²
        "sq_grad_probe": _dot(gp, gp),  # ‖g⁺_t‖²
        "sq_update": _dot(d, d),  # ‖Δ_t‖²
        "sq_param": _dot(x, x),  # ‖x_t‖²
        "sq_dist_init": _dot(_sub(x, x0), _sub(x, x0)),  # ‖x_t − x_0‖²
        "ip_grad_update": _dot(g, d),  # ⟨g_t, Δ_t⟩
        "ip_probe_update": _dot(gp, d),  # ⟨g⁺_t, Δ_t⟩
        "sq_grad_diff": _dot(_sub(gp, g), _sub(gp, g)),  # ‖g⁺_t − g_t‖²
        "ip_param_update": _dot(x, d),  # ⟨x_t, Δ_t⟩
        "ip_param_grad": _dot(x, g),  # ⟨x_t, g_t⟩
        "ip_update_prev": _dot(d, dp),  # ⟨Δ_t, Δ_{t−1}⟩
        "ip_grad_prev": _dot(g, gq),  # ⟨g_t, g_{t−1}⟩
        "sq_update_prev": _dot(dp, dp),  # ‖Δ_{t−1}‖²
        "sq_grad_prev": _dot(gq, gq),  # ‖g_{t−1}‖²
        "abs_grad_param": _dot(_abs(g), _abs(x)),  # Σ|g_i||x_i|
        "abs_probe_param": _dot(_abs(gp), _abs(x)),  # Σ|g⁺_i||x_i|
        "abs_probe_update": _dot(_abs(gp), _abs(d)),  # Σ|g⁺_i||Δ_i|
    }


def reference_tensor_norms(g, g_plus, delta, sizes=None) -> dict[str, float]:
    """Σ_i ‖g⁺_i − g_i‖ and Σ_i ‖Δ_i‖ over the parameter tensors i: the full 1-D vectors cut
    into consecutive tensors of ``sizes`` elements (None: one tensor). A direct transcription of
    the authors' ``compute_smoothness`` (tranhp98/some_projects,
    test_properties/transformers/run_clm.py lines 340-346): a sum of per-tensor torch.norm."""
    g, gp, d = (_v(t) for t in (g, g_plus, delta))
    sizes = [d.numel()] if sizes is None and d is not None else sizes
    if g is None or gp is None or d is None:
        return {"tensor_norm_grad_diff": math.nan, "tensor_norm_update": math.nan}
    num = sum(float(torch.linalg.vector_norm(a - b)) for a, b in zip(gp.split(sizes), g.split(sizes)))
    den = sum(float(torch.linalg.vector_norm(a)) for a in d.split(sizes))
    return {"tensor_norm_grad_diff": num, "tensor_norm_update": den}


def _none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _ratio(a: float, b: float) -> float | None:
    return a / b if (b != 0 and math.isfinite(a) and math.isfinite(b)) else None


def _clamp(c: float | None) -> float | None:
    """A cosine in [−1, 1] (rounded sums can leave it a few ulps outside)."""
    return None if c is None else min(1.0, max(-1.0, c))


def _cls(gap: float, floor: float) -> str | None:
    if not (math.isfinite(gap) and math.isfinite(floor)):
        return None
    return "holds" if gap < -floor else "violated" if gap > floor else "indeterminate"


def reference_metrics(
    x,
    g,
    delta,
    g_plus,
    loss: float,
    loss_probe: float,
    probe_s: float = 1.0,
    *,
    delta_prev=None,
    g_prev=None,
    precision: str = "fp32",
    floor_c: float = 4.0,
    loss_precision: str | None = None,
    loss_scale: float | None = None,
    loss_probe_scale: float | None = None,
    sizes=None,
) -> dict:
    """The derived metrics of docs/METRICS.md §Derived metrics from the definitions, segment sΔ.

    ``precision``: the gradients' arithmetic; ``loss_precision``: the losses' (default the same).
    ``loss_scale``, ``loss_probe_scale``: the rounding magnitudes M, M⁺ of ℓ and ℓ⁺ (docs/METRICS.md
    §Noise floor); when either is missing, |ℓ| and |ℓ⁺| take their place. ``sizes``: the
    numel of each parameter tensor, in the vectors' order, for smoothness_authors
    (None: unknown tensors, so smoothness_authors is None, as metrics.derive without the
    tensor_norm_* values).
    """
    x, g, d, gp, dp, gq = (_v(t) for t in (x, g, delta, g_plus, delta_prev, g_prev))
    ell = math.nan if loss is None else float(loss)
    ell_p = math.nan if loss_probe is None else float(loss_probe)
    s = math.nan if probe_s is None else float(probe_s)
    seg = None if d is None else s * d  # the probe segment p − x_t = sΔ_t
    dl = ell_p - ell  # δ_t = ℓ⁺_t − ℓ_t
    sq_seg = _dot(seg, seg)
    gap_fwd = _dot(g, seg) - dl  # ⟨g_t, sΔ_t⟩ − δ_t
    gap_bwd = dl - _dot(gp, seg)  # δ_t − ⟨g⁺_t, sΔ_t⟩
    g_sum = None if g is None or gp is None else g + gp
    gsum = _norm(g) + _norm(gp)
    u_l = _U[precision if loss_precision is None else loss_precision]  # ℓ, ℓ⁺ and the points
    u_g = _U[precision]  # g, g⁺
    m = math.nan if loss_scale is None else float(loss_scale)
    m_p = math.nan if loss_probe_scale is None else float(loss_probe_scale)
    if not (math.isfinite(m) and math.isfinite(m_p)):  # not a covered cross-entropy: |ℓ|, |ℓ⁺|
        m, m_p = abs(ell), abs(ell_p)
    scale = u_l * (m + m_p) + u_g * gsum * _norm(seg)
    if u_l > _U["fp32"] or s != 1.0:  # bf16/fp16 losses, or a rounded p
        scale += u_l * gsum * (2.0 * _norm(x) + _norm(seg))
    if u_g > _U["fp32"] or s != 1.0:  # bf16/fp16 gradients, or a rounded p: ‖H sΔ‖ ≈ ‖g⁺ − g‖
        scale += u_g * _norm(_sub(gp, g)) * (2.0 * _norm(x) + _norm(seg))
        # a convex f's computed gaps at rounded points: Σ|g_i||x_i| + Σ|g⁺_i|(|x_i| + |s||Δ_i|)
        scale += u_g * (_dot(_abs(g), _abs(x)) + _dot(_abs(gp), _abs(x)) + abs(s) * _dot(_abs(gp), _abs(d)))
    floor = floor_c * scale
    nan2 = {"tensor_norm_grad_diff": math.nan, "tensor_norm_update": math.nan}
    tn = reference_tensor_norms(g, gp, d, sizes) if sizes is not None else nan2
    out = {
        "loss_change": _none(dl),
        "convexity_gap_fwd": _none(gap_fwd),
        "convexity_gap_bwd": _none(gap_bwd),
        "trapezoid_residual": _none(dl - 0.5 * _dot(g_sum, seg)),  # δ − ½⟨g + g⁺, sΔ⟩
        "smoothness_local": _ratio(_norm(_sub(gp, g)), _norm(seg)),
        # Σ_i ‖g⁺_i − g_i‖ / Σ_i ‖sΔ_i‖ (‖sΔ_i‖ = |s|·‖Δ_i‖)
        "smoothness_authors": _ratio(tn["tensor_norm_grad_diff"], abs(s) * tn["tensor_norm_update"]),
        "smoothness_descent": _ratio(2.0 * (dl - _dot(g, seg)), sq_seg),
        "smoothness_descent_band": _ratio(2.0 * floor, sq_seg),  # ± floor on δ − ⟨g, sΔ⟩
        "curvature_secant": _ratio(_dot(_sub(gp, g), seg), sq_seg),
        "step_alpha": _ratio(-_dot(gp, seg), _dot(g, seg)),
        "cos_grad_update": _clamp(_ratio(_dot(g, d), _norm(g) * _norm(d))),
        "cos_update_prev": _clamp(_ratio(_dot(d, dp), _norm(d) * _norm(dp))),
        "cos_grad_prev": _clamp(_ratio(_dot(g, gq), _norm(g) * _norm(gq))),
        "grad_norm": _none(_norm(g)),
        "update_norm": _none(_norm(d)),
        "param_norm": _none(_norm(x)),
        "update_to_param": _ratio(_norm(d), _norm(x)),
        "noise_floor": _none(floor),
        "cls_convexity_fwd": _cls(gap_fwd, floor),
        "cls_convexity_bwd": _cls(gap_bwd, floor),
    }
    reasons = []
    if d is not None and not bool(d.any()):
        reasons.append("zero_update")
    elif s == 0:
        reasons.append("zero_probe_s")
    if not (math.isfinite(ell_p) and math.isfinite(s)):
        reasons.append("no_probe")
    out["flag"] = ",".join(reasons) or None
    return out


def reference_next_batch(
    loss: float,
    loss_prev: float,
    g,
    delta_prev,
    *,
    x=None,
    loss_scale: float | None = None,
    loss_prev_scale: float | None = None,
    precision: str = "fp32",
    loss_precision: str | None = None,
    floor_c: float = 4.0,
) -> dict[str, float | str | None]:
    """The next-batch columns of docs/METRICS.md §Next-batch gap from full tensors in float64:
    ``loss`` = f(x_t; B_t), ``loss_prev`` = f(x_{t−1}; B_t), ``g`` = ∇f(x_t; B_t) and
    ``delta_prev`` = x_t − x_{t−1} (ZQZCalin/trainit, loggers/demo.py lines 236 and 249:
    `update/<gn, xn-x(n-1)>`, `loss/fn-f(n-1)`), and the gap's noise floor and class, restated
    from metrics.next_batch_floor (``x`` = x_t; M of ℓ_t and of f(x_{t−1}; B_t), |ℓ| without)."""
    ell = math.nan if loss is None else float(loss)
    ell_prev = math.nan if loss_prev is None else float(loss_prev)
    g, dp, x = _v(g), _v(delta_prev), _v(x)
    ip = _dot(g, dp)  # ⟨g_t, Δ_{t−1}⟩
    gap = ell - ell_prev  # f(x_t; B_t) − f(x_{t−1}; B_t)
    u_g, u_l = _U[precision], _U[precision if loss_precision is None else loss_precision]
    m = math.nan if loss_scale is None else float(loss_scale)
    m_prev = math.nan if loss_prev_scale is None else float(loss_prev_scale)
    if not (math.isfinite(m) and math.isfinite(m_prev)):
        m, m_prev = abs(ell), abs(ell_prev)
    scale = u_l * (m + m_prev) + u_g * _norm(g) * _norm(dp)
    if u_l > _U["fp32"]:  # bf16/fp16 losses: both points read rounded
        scale += u_l * _norm(g) * (2.0 * _norm(x) + _norm(dp))
    if u_g > _U["fp32"]:  # g read at rounded x_t: a convex f's gap rises by ≤ ≈ 2u·Σ|g_i||x_i|
        scale += 2.0 * u_g * _dot(_abs(g), _abs(x))
    floor = floor_c * scale if math.isfinite(ell_prev) else math.nan
    return {
        "nb_loss_prev": _none(ell_prev),
        "nb_ip_grad_update": _none(ip),
        "nb_loss_gap": _none(gap),
        "nb_convexity_gap": _none(gap - ip),  # ≤ 0 if f(·; B_t) is convex on the segment
        "nb_loss_prev_scale": _none(m_prev) if loss_prev_scale is not None else None,
        "nb_noise_floor": _none(floor),
        "cls_nb_convexity": _cls(gap - ip, floor),
    }


def reference_grad_history(g, past: list) -> dict[str, float | None]:
    """trainit's gradient-history columns from full tensors in float64 (ZQZCalin/trainit,
    loggers/demo.py lines 227-228 and 264): S_t = Σ_{s<t} g_s over ``past`` (every earlier
    step's full gradient), ⟨g_t, S_t⟩, ‖S_t‖², cos(g_t, S_t) clamped (None when S_t = 0)."""
    g = _v(g)
    hist = torch.zeros_like(g)
    for p in past:
        hist += _v(p)
    ip, sq = _dot(g, hist), _dot(hist, hist)
    return {
        "grad_history_ip": _none(ip),
        "grad_history_sq": _none(sq),
        "cos_grad_history": _clamp(_ratio(ip, _norm(g) * _norm(hist))),
    }
