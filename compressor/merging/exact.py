"""mergekit's arithmetic step for step, for ``merge --config`` in mergekit-exact mode.

mergekit computes a merge in the config's ``dtype`` (bfloat16 in most public configs),
rounding after every step, and picks the entries a trim keeps with ``argsort`` over
the magnitudes (its tie order). Our merges compute in float32 and break ties in flat
order, which differs from mergekit's output on a share of entries at half precision.
This module is the other way: the generalized task arithmetic family (task
arithmetic, TIES, breadcrumbs and their sparsifiers) written as mergekit's
``merge_group`` runs it, in the given dtype. It holds a tensor's experts stacked, as
mergekit does (experts + 2 tensors of the compute dtype). The methods' randomised
sparsifiers (DARE, DELLA) keep our seeded draws: mergekit's come from torch's global
generator and cannot be reproduced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch


def magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """The top ``int(density·n)`` entries (at least one) by |δ|, chosen by a descending
    argsort of the float32 magnitudes (mergekit's ``sparsify.magnitude``)."""
    import torch

    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k]] = 1
    return _rescaled(delta, mask.reshape_as(delta), rescale)


def magnitude_outliers(
    delta: torch.Tensor, density: float, gamma: float, rescale: bool = False
) -> torch.Tensor:
    """Drop the ``gamma`` largest entries and then the smallest, keeping ``int(density·n)``
    (mergekit's ``sparsify.magnitude_outliers``, its ascending sort)."""
    import torch

    if density >= 1:
        return delta
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    order = torch.sort(delta.abs().reshape(-1).float(), descending=False).indices
    mask = torch.zeros(n, dtype=delta.dtype)
    mask[order[bottom : bottom + keep]] = 1
    return _rescaled(delta, mask.reshape_as(delta), rescale)


def _rescaled(delta, mask, rescale: bool, eps: float = 1e-7):
    masked = delta * mask
    if not rescale:
        return masked
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def task_arithmetic(
    base32: torch.Tensor,
    taus32: list,
    dtype,
    weights: list[float],
    sparsify: Callable[[int, torch.Tensor], torch.Tensor],
    consensus: bool,
    normalize: bool,
    scale: float,
) -> tuple[torch.Tensor, int]:
    """mergekit's generalized task arithmetic of one tensor in ``dtype``: each expert's
    δ = θ_t − θ0 (both rounded to dtype), sparsified, weighted; summed, or summed over
    the experts agreeing with the sign of Σ w·δ; divided by the summed weights when
    ``normalize``; times ``scale``; added to θ0. Returns the tensor and the count of
    entries the sparsifiers kept. ``taus32`` are float32 τ (None: zero)."""
    import torch

    base = base32.to(dtype)
    deltas = base.new_empty((len(taus32), *base.shape))
    for t, tau in enumerate(taus32):
        if tau is None:
            deltas[t] = 0
            continue
        theta = (base32 + tau.reshape(base32.shape)).to(dtype)
        deltas[t] = sparsify(t, theta - base)
    kept = int(torch.count_nonzero(deltas))
    w = torch.tensor(weights, dtype=dtype)
    while deltas.dim() > w.dim():
        w = w.unsqueeze(-1)
    deltas.mul_(w)
    if consensus:
        sign = deltas.sign().to(dtype)
        majority = (deltas.sum(dim=0) >= 0).to(dtype) * 2 - 1
        mask = sign == majority
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if scale != 1:
        mixed *= scale
    return (base + mixed).to(dtype), kept


def _deltas(base32, taus32, dtype):
    """θ0 in dtype and each expert's δ = θ_t − θ0 in dtype, stacked (None τ: zero)."""
    import torch

    base = base32.to(dtype)
    rows = [
        torch.zeros_like(base) if t is None else (base32 + t.reshape(base32.shape)).to(dtype) - base
        for t in taus32
    ]
    return base, torch.stack(rows)


def sce(base32, taus32, dtype, select_topk: float, scale: float = 1.0):
    """mergekit's ``sce_merge`` in dtype: keep the top ``select_topk`` entries by the
    variance of δ across experts, erase minority signs, weight experts by mean δ²."""
    import torch

    base, tv = _deltas(base32, taus32, dtype)
    if select_topk < 1:
        var = torch.var(tv, dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * select_topk)
        mask = torch.zeros_like(var)
        if k:
            mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
        tv = tv * mask.unsqueeze(0)
    erase = tv.sign().to(dtype) == (tv.sum(dim=0) >= 0).to(dtype) * 2 - 1
    weights = tv.square().reshape(tv.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    weights = torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total
    while weights.dim() < tv.dim():
        weights = weights.unsqueeze(-1)
    erased = weights * erase
    final = (tv * erased).sum(dim=0) / torch.sum(erased, dim=0).clamp(min=1e-6)
    return base + (final if scale == 1 else final * scale)


def model_stock(base32, thetas32: list, dtype, filter_wise: bool):
    """mergekit's ``model_stock`` in dtype (one angle per tensor, or per row)."""
    import torch

    w0, ws = base32.to(dtype), [t.to(dtype) for t in thetas32]
    shape = w0.shape
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), (n * cos) / safe)
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)
