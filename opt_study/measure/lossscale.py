"""The rounding scale of a computed cross-entropy loss, read from the logits in the same forward.

docs/METRICS.md §Noise floor: the fp32 rounding of a cross-entropy loss scales with the logits
and probabilities, not with |ℓ| (near ℓ = 0, log Σ exp(z_k − m) = log(1 + ε) is computed from a
rounded 1 + ε, an absolute error of about u per sample however small ℓ is). ``Capture`` is a
``TorchFunctionMode`` active around the measured forwards (the training forwards of a measured
step, the probe's, the fp32 re-evaluations). Every ``F.cross_entropy`` call runs unchanged (same
kernels, same bits: the trajectory does not change) and, beside it, without grad, adds the
call's rounding magnitude M to a float64 device total (no host sync), so that the loss's
first-order rounding error is at most u·M:

    per sample i (m = max_k z_k, s_k = z_k − m, lse = log Σ_k exp s_k, ℓ_i = lse − s_y, p = softmax z):
    M_i = |s_y| + Σ_k p_k |s_k| + lse + ℓ_i      the roundings of s_y, of exp(s_k) (relative u|s_k|,
                                                 weighted by p_k in lse), of log and of ℓ_i
        + ⌈log2 K⌉ + 3                           the sum of K exponentials (cascade summation,
                                                 Higham 2002 §4.2), exp's and log's own rounding
        + 2(1 − p_y)·max_k |z_k|                 the logits' own rounding from the network, modelled
                                                 as ≤ u·max|z| per logit, reaching ℓ_i through
                                                 ∂ℓ_i/∂z_k = p_k − 1[k = y] (Σ_k |p_k − 1[k=y]| = 2(1 − p_y))
    M = mean_i M_i + ⌈log2 n⌉·mean_i ℓ_i         (reduction "mean" over n samples; "sum": n times that)

Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., SIAM 2002, §2.2, §3.1, §4.2
(https://doi.org/10.1137/1.9780898718027). A call the formula does not cover (probability
targets, class weights, label smoothing, reduction "none") makes the capture invalid: the floor
then falls back to |ℓ| (``metrics.noise_floor``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def ce_magnitude(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean", ignore_index: int = -100):
    """M of the module docstring for F.cross_entropy(logits, target) with class-index targets, as a
    float64 0-dim tensor on the logits' device; None where the formula does not apply."""
    if reduction not in ("mean", "sum") or target.dtype.is_floating_point or logits.dim() < 1:
        return None
    with torch.no_grad():
        z = logits.detach().float()
        if z.dim() == 1:  # one sample without a batch dimension
            z, target = z.unsqueeze(0), target.reshape(1)
        z = z.movedim(1, -1).reshape(-1, z.shape[1])  # [N, K, *] -> [N·*, K]
        y = target.reshape(-1)
        keep = (y != ignore_index).to(torch.float64)  # a mask, not an index: no host sync on a GPU
        y = torch.where(y != ignore_index, y, torch.zeros_like(y))
        n, k = z.shape
        if n == 0:
            return torch.zeros((), dtype=torch.float64, device=logits.device)
        lo, hi = torch.aminmax(z, dim=1)  # m = max z, and max|z| = max(hi, −lo): one pass
        s = z - hi[:, None]  # s ≤ 0
        e = s.exp()
        big_s = e.sum(1)
        lse = big_s.log()
        e_y = e.gather(1, y[:, None]).squeeze(1)
        s_y = s.gather(1, y[:, None]).squeeze(1)
        p_y = e_y / big_s
        ell = lse - s_y
        p_abs_s = -torch.einsum("ij,ij->i", e, s) / big_s  # Σ p_k|s_k| (s ≤ 0)
        per = -s_y + p_abs_s + lse + ell + (math.ceil(math.log2(max(k, 2))) + 3)
        per = per + 2.0 * (1.0 - p_y).clamp_min(0) * torch.maximum(hi, -lo)
        # ⌈log2 n⌉ over all n rows, ignored ones included: an upper bound of the kept count's
        total = (keep * (per.double() + math.ceil(math.log2(max(n, 2))) * ell.double())).sum()
        return total / keep.sum().clamp_min(1.0) if reduction == "mean" else total


class Capture(TorchFunctionMode):
    """Adds the M of every F.cross_entropy call in its scope to ``total`` (float64, on the
    device); ``valid`` turns False at a call the formula does not cover."""

    def __init__(self, device):
        super().__init__()
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.calls = 0
        self.valid = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)  # the loss exactly as without the capture
        if func is F.cross_entropy:
            self._add(*args, **kwargs)
        return out

    def _add(self, input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
             reduction="mean", label_smoothing=0.0):  # fmt: skip
        m = None
        if weight is None and size_average is None and reduce is None and label_smoothing == 0.0:
            m = ce_magnitude(input, target, reduction, ignore_index)
        if m is None:
            self.valid = False
        else:
            self.total += m.to(self.total.device)
            self.calls += 1

    def value(self, per: int) -> torch.Tensor:
        """The captured total divided by ``per`` (the micro-batches averaged into the loss); NaN
        when nothing valid was captured."""
        if not self.valid or self.calls == 0:
            return torch.full((), math.nan, dtype=torch.float64, device=self.total.device)
        return self.total / max(per, 1)
