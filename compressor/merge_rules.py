"""The math of the merge methods: pure functions over float32 tensors of one weight.

Each follows mergekit 0.1.5's definition (the reference its docstring names); the
plugins in ``compressor.plugins`` resolve options per tensor and stream the
weights through :class:`compressor.merging.TensorMerge`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .errors import OptionError
from .merging import keep_top_k_

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch


# --- sparsification of one task vector ------------------------------------------------


def rescale_kept_(kept: torch.Tensor, how: str, density: float, before: float) -> torch.Tensor:
    """Kept entries of τ (masked in place) rescaled in place: to τ's L1 norm ``before`` the
    drop (``l1``, mergekit), by 1/density (``density``, the DARE paper, PEFT) or not."""
    if how == "l1":
        after = float(kept.abs().sum())
        return kept if before < 1e-7 or after < 1e-7 else kept.mul_(before / after)
    return kept.div_(density) if how == "density" else kept


def breadcrumbs(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` fraction of largest |τ| (outliers) and the
    smallest, keeping int(density·n) entries (https://arxiv.org/abs/2312.06795).

    mergekit sorts |τ|; the same ranks are found here by threshold, in place and chunk by
    chunk (entries tied at a cut are taken in flat order, where a sort's order is its own).
    """
    if density >= 1:
        return tau
    n = tau.numel()
    keep = int(density * n)
    outliers = min(int(gamma * n), n - keep)  # fewer dropped when density asks for more
    return keep_top_k_(tau, outliers + keep, drop=outliers)


def della_(
    tau: torch.Tensor, density: float, epsilon: float, generator: torch.Generator
) -> torch.Tensor:
    """DELLA's MagPrune, in place: keep each entry with a probability rising with its
    magnitude's rank in its row, from density − ε to density + ε
    (https://arxiv.org/abs/2406.11617). Rows are independent, so a caller may pass τ's rows
    in chunks; the draws then come in the same order as for the whole tensor."""
    import torch

    if density >= 1:
        return tau
    if not (0 < density - epsilon and density + epsilon < 1):
        raise OptionError(
            f"della needs density ± epsilon inside (0, 1); got density {density:g}, "
            f"epsilon {epsilon:g}"
        )
    rows = tau.unsqueeze(0) if tau.dim() < 2 else tau.view(tau.shape[0], -1)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).float().add_(1)
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    spread = ranks.sub_(low).div_(high - low)  # in place: ranks are not needed again
    probs = spread.clamp_(0, 1).mul_(2 * epsilon).add_(density - epsilon)
    rows.mul_(torch.rand(probs.shape, generator=generator) < probs)
    return tau


# --- combining task vectors --------------------------------------------------------------


def sce_select(taus: list[torch.Tensor], fraction: float) -> torch.Tensor | None:
    """SCE's select step: the mask of the ``fraction`` of entries (of those that vary at
    all) whose task vectors vary most across experts; None keeps everything.

    The variance is accumulated expert by expert (no stack of all τ) and the top entries
    found by threshold (ties in flat order, where mergekit's topk has its own)."""
    import torch

    if fraction >= 1:
        return None
    mean = torch.zeros_like(taus[0])
    for tau in taus:
        mean.add_(tau)
    mean.div_(len(taus))
    var = torch.zeros_like(mean)
    for tau in taus:
        gap = tau - mean
        var.addcmul_(gap, gap)
        del gap
    del mean
    var.div_(len(taus))
    k = int(int(torch.count_nonzero(var)) * fraction)
    return keep_top_k_(var, k).ne_(0)  # 1.0 where kept, in var's dtype


def sce_weights(taus: list[torch.Tensor]) -> list[float]:
    """SCE's calculate step: each expert's weight ∝ the mean square of its task vector."""
    energy = [float(t.square().mean()) for t in taus]
    total = sum(energy)
    if abs(total) < 1e-6:
        return [1.0 / len(taus)] * len(taus)
    return [e / total for e in energy]


# --- interpolation -----------------------------------------------------------------------


def linear(tensors: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """Σ w_i θ_i, divided by Σ w_i with ``normalize`` (model soups,
    https://arxiv.org/abs/2203.05482)."""
    import torch

    total = sum(weights)
    if normalize and total == 0:
        raise OptionError("linear: the weights sum to 0; give other weights or normalize false")
    out = torch.zeros_like(tensors[0])
    for tensor, w in zip(tensors, weights, strict=True):
        out.add_(tensor, alpha=w)
    return out.div_(total) if normalize else out


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, threshold: float = 0.9995):
    """Spherical interpolation of two whole tensors, linear when they are (anti)parallel
    (https://en.wikipedia.org/wiki/Slerp)."""
    import torch

    eps = 1e-8
    a, b = v0.reshape(-1), v1.reshape(-1)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = float(((a / na) * (b / nb)).sum().clamp(-1, 1))
    if abs(dot) > threshold:
        return v0 * (1 - t) + v1 * t
    theta = math.acos(dot)
    s = math.sin(theta)
    return v0 * (math.sin((1 - t) * theta) / s) + v1 * (math.sin(t * theta) / s)


def nuslerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool
) -> torch.Tensor:
    """mergekit's NuSLERP: slerp of the whole flattened tensors, or of each row (``row_wise``)
    or each column (neither), linear where the pair is colinear."""
    import torch

    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)

    def unit(x):
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def multislerp(tensors: list[torch.Tensor], weights: list[float], normalize: bool):
    """Barycentric interpolation on the hypersphere: project to the tangent space at the
    weighted mean direction, average, map back, scale to the weighted mean norm
    (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea)."""
    import torch

    if len(tensors) == 1:
        return tensors[0]
    eps = 1e-8
    w = torch.tensor(weights)
    if normalize:
        w = w / w.sum()
    flat = [t.reshape(-1) for t in tensors]
    norms = torch.stack([torch.norm(f) for f in flat])
    units = [f / (n + eps) for f, n in zip(flat, norms, strict=True)]
    mean = sum(u * wi for u, wi in zip(units, w, strict=True))
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(tensors) == 2:
            return tensors[0] * w[0] + tensors[1] * w[1]
        raise OptionError(
            "multislerp: the weighted mean direction of the experts is zero (antipodal "
            "experts with balancing weights); give other weights"
        )
    mean = mean / mean_norm
    tangent = sum((u - (u * mean).sum() * mean) * wi for u, wi in zip(units, w, strict=True))
    tn = torch.norm(tangent) + eps
    out = mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)
    return (out * (norms * w).sum()).reshape(tensors[0].shape)


def karcher(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """The Karcher (Riemannian) mean of the directions, scaled to the mean norm
    (mergekit's ``karcher``), equal weights."""
    import torch

    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    units = [
        torch.zeros_like(t) if float(n) == 0 else t / n for t, n in zip(tensors, norms, strict=True)
    ]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    a_sum = sum(alphas[i] for i in valid)
    weights = [alphas[i] / a_sum for i in valid]
    valid_units = [units[i] for i in valid]
    mean = torch.zeros_like(valid_units[0])
    for a, u in zip(weights, valid_units, strict=True):
        mean += a * u
    mn = torch.linalg.vector_norm(mean)
    mean = valid_units[0].clone() if float(mn) < tol else mean / mn
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, valid_units, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tn = torch.linalg.vector_norm(tangent)
        if float(tn) < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        un = torch.linalg.vector_norm(mean)
        if float(un) > tol:
            mean = mean / un
    return sum(a * n for a, n in zip(alphas, norms, strict=True)) * mean


def model_stock(base: torch.Tensor, tensors: list[torch.Tensor], filter_wise: bool):
    """Model Stock: move from the base toward the experts' average by t = N cos θ /
    (1 + (N − 1) cos θ), θ the mean angle between their task vectors, per tensor or per
    row (``filter_wise``) (https://arxiv.org/abs/2403.19522)."""
    import torch

    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [w.unsqueeze(0) if w.dim() == 1 else w for w in tensors]
    else:
        w0, ws = base.reshape(-1), [w.reshape(-1) for w in tensors]
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
    t = torch.where(singular, 0, n * cos / torch.where(singular, 1, denominator))
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)


def nearswap(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """NearSwap: take the other model's value where it is within ~t of the base's, blend
    by t/|Δ| elsewhere (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001)."""
    weight = (t / (base - other).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def arcee_fusion(base: torch.Tensor, other: torch.Tensor, generator: torch.Generator):
    """Arcee Fusion: keep the other model's changes where |Δ| · KL(softmax rows) is above
    median + 1.5·IQR of that importance (https://arcee.ai)."""
    import torch
    import torch.nn.functional as F

    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    del p, q
    importance = (other - base).abs() * kl
    flat = importance.reshape(-1)
    if flat.numel() > 1_000_000:  # mergekit's sampled quantiles, with a seeded sample
        flat = flat[torch.randint(flat.numel(), (1_000_000,), generator=generator)]
    ordered = torch.sort(flat).values
    q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()]
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return base + (other - base) * mask
