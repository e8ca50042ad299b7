"""The math of the merge methods: pure functions over float32 tensors of one weight.

Each follows mergekit 0.1.5's definition (the reference its docstring names); the
plugins in ``compressor.plugins`` resolve options per tensor and stream the
weights through :class:`compressor.merge.loop.TensorMerge`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from compressor.errors import OptionError
from compressor.merge.loop import keep_top_k_, row_spans, spans

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
    (https://en.wikipedia.org/wiki/Slerp). The cosine is summed chunk by chunk; the result
    is the one tensor-sized temporary."""
    import torch

    eps = 1e-8
    a, b = v0.reshape(-1), v1.reshape(-1)
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    dot = sum(float((a[s:e] / na).mul_(b[s:e] / nb).sum()) for s, e in spans(a.numel()))
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > threshold:
        c0, c1 = 1 - t, t
    else:
        theta = math.acos(dot)
        c0, c1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return torch.mul(v0, c0).add_(v1, alpha=c1)


def nuslerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    row_wise: bool,
    flatten: bool,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """mergekit's NuSLERP: slerp of the whole flattened tensors, or of each row (``row_wise``)
    or each column (neither), linear where the pair is colinear; of the task vectors
    v − base when a base is given, the result base + slerp.

    The tensors are read as a matrix whose rows or columns are the vectors slerped; dot
    products and norms are summed by blocks of rows and the result written block by block,
    so no task vector or product is stored whole."""
    import torch

    shape = v0.shape
    if flatten or v0.dim() < 2:  # one vector (a 1-d tensor is one vector either way)
        rows, width, per = 1, v0.numel(), "all"
    elif row_wise:  # mergekit transposes dims 0 and -1: vectors along dim 0
        rows, width, per = shape[0], v0.numel() // shape[0], "column"
    else:  # vectors along the last dim
        rows, width, per = v0.numel() // shape[-1], shape[-1], "row"
    m0, m1 = v0.reshape(rows, width), v1.reshape(rows, width)
    mb = None if base is None else base.reshape(rows, width)
    if per == "all":  # one row: block its columns
        blocks = [(slice(None), slice(s, e)) for s, e in spans(width)]
    else:
        blocks = [(slice(s, e), slice(None)) for s, e in row_spans(rows, width)]

    def offsets(block):
        a, b = m0[block], m1[block]
        return (a, b) if mb is None else (a - mb[block], b - mb[block])

    def coefficients(dot, sq0, sq1):  # per vector: c0, c1 of c0·v0 + c1·v1
        cos = (dot / (sq0.sqrt().clamp(min=1e-7) * sq1.sqrt().clamp(min=1e-7))).clamp(-1, 1)
        colinear = (1 - cos.square()) <= 1e-16
        theta = torch.acos(torch.where(colinear, 0, cos))
        sin = torch.where(colinear, 1, torch.sin(theta))
        c0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin)
        c1 = torch.where(colinear, t, torch.sin(t * theta) / sin)
        return c0, c1

    out = torch.empty_like(m0)

    def write(block, a, b, c0, c1):
        mixed = a * c0 + b * c1
        out[block] = mixed if mb is None else mixed.add_(mb[block])

    if per == "row":  # each block holds whole vectors: one pass
        for block in blocks:
            a, b = offsets(block)
            c0, c1 = coefficients(
                (a * b).sum(-1, keepdim=True),
                a.square().sum(-1, keepdim=True),
                b.square().sum(-1, keepdim=True),
            )
            write(block, a, b, c0, c1)
        return out.reshape(shape)
    n, dims = (1, (0, 1)) if per == "all" else (width, (0,))
    dot, sq0, sq1 = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    for block in blocks:  # sum the statistics over the blocks, then write
        a, b = offsets(block)
        dot += (a * b).sum(dims)
        sq0 += a.square().sum(dims)
        sq1 += b.square().sum(dims)
    c0, c1 = coefficients(dot, sq0, sq1)
    for block in blocks:
        write(block, *offsets(block), c0, c1)
    return out.reshape(shape)


def multislerp(tensors: list[torch.Tensor], weights: list[float], normalize: bool):
    """Barycentric interpolation on the hypersphere: project to the tangent space at the
    weighted mean direction, average, map back, scale to the weighted mean norm
    (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea). All-zero inputs give
    zero (with a base: a tensor every expert left as it was stays the base's; mergekit
    fails there).

    mergekit's arithmetic, with the unit vectors u_i = θ_i/(‖θ_i‖ + ε) never stored: each
    sum takes θ_i scaled, and the tangent is rebuilt chunk by chunk where it is used, so
    the temporaries beyond the result are a chunk's."""
    import torch

    if len(tensors) == 1:
        return tensors[0]
    eps = 1e-8
    w = torch.tensor(weights)
    if normalize:
        w = w / w.sum()
    w = w.tolist()
    flat = [t.reshape(-1) for t in tensors]
    norms = [float(torch.norm(f)) for f in flat]
    if max(norms) == 0:  # every input zero (a tensor no expert changed, as τ): no direction
        return torch.zeros_like(tensors[0])
    scale = [1.0 / (n + eps) for n in norms]  # u_i = θ_i · scale_i
    mean = torch.zeros_like(flat[0])
    for f, s, wi in zip(flat, scale, w, strict=True):
        mean.add_(f, alpha=s * wi)
    mean_norm = float(torch.norm(mean))
    if mean_norm < eps:
        if len(tensors) == 2:
            return tensors[0] * w[0] + tensors[1] * w[1]
        raise OptionError(
            "multislerp: the weighted mean direction of the experts is zero (antipodal "
            "experts with balancing weights); give other weights"
        )
    mean.div_(mean_norm)
    dots = [float(torch.dot(f, mean)) * s for f, s in zip(flat, scale, strict=True)]  # u_i·m

    def tangent(start: int, stop: int) -> torch.Tensor:  # Σ w_i (u_i − (u_i·m) m), a chunk
        m = mean[start:stop]
        part = torch.zeros_like(m)
        for f, s, d, wi in zip(flat, scale, dots, w, strict=True):
            part.add_(f[start:stop], alpha=s * wi).add_(m, alpha=-d * wi)
        return part

    ranges = spans(mean.numel())
    tn = math.sqrt(sum(float(tangent(a, b).square().sum()) for a, b in ranges)) + eps
    cos, sin_over = math.cos(tn), math.sin(tn) / tn
    for a, b in ranges:  # the result, written over the mean direction it starts from
        mean[a:b] = mean[a:b] * cos + tangent(a, b) * sin_over
    return mean.mul_(sum(n * wi for n, wi in zip(norms, w, strict=True))).reshape(tensors[0].shape)


def karcher(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """The Karcher (Riemannian) mean of the directions, scaled to the mean norm
    (mergekit's ``karcher``), equal weights.

    mergekit's iteration, with the unit vectors u_i = θ_i/‖θ_i‖ never stored (dots and the
    tangent take θ_i scaled): two tensors of temporaries, the mean and the tangent."""
    import torch

    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    flat = [t.reshape(-1) for t in tensors]
    norms = [float(torch.linalg.vector_norm(f)) for f in flat]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    a_sum = sum(alphas[i] for i in valid)
    weights = [alphas[i] / a_sum for i in valid]
    units = [(flat[i], 1.0 / norms[i]) for i in valid]  # u = θ · scale
    mean = torch.zeros_like(flat[0])
    for a, (f, s) in zip(weights, units, strict=True):
        mean.add_(f, alpha=a * s)
    mn = float(torch.linalg.vector_norm(mean))
    if mn < tol:
        mean.copy_(units[0][0]).mul_(units[0][1])
    else:
        mean.div_(mn)
    tangent = torch.empty_like(mean)
    for _ in range(max_iter):
        tangent.zero_()
        for a, (f, s) in zip(weights, units, strict=True):
            dot = min(1.0, max(-1.0, float(torch.dot(mean, f)) * s))
            theta = math.acos(dot)
            if theta < tol:
                continue
            c = a * theta / math.sin(theta)  # a·θ/sin θ · (u − dot·m)
            tangent.add_(f, alpha=c * s).add_(mean, alpha=-c * dot)
        tn = float(torch.linalg.vector_norm(tangent))
        if tn < tol:
            break
        mean.mul_(math.cos(tn)).add_(tangent, alpha=math.sin(tn) / tn)
        un = float(torch.linalg.vector_norm(mean))
        if un > tol:
            mean.div_(un)
    return mean.mul_(sum(a * n for a, n in zip(alphas, norms, strict=True))).reshape(
        tensors[0].shape
    )


def model_stock(base: torch.Tensor, tensors: list[torch.Tensor], filter_wise: bool):
    """Model Stock: move from the base toward the experts' average by t = N cos θ /
    (1 + (N − 1) cos θ), θ the mean angle between their task vectors, per tensor or per
    row (``filter_wise``) (https://arxiv.org/abs/2403.19522).

    The dot products and norms of the task vectors are summed chunk by chunk (of rows, when
    ``filter_wise``), so no task vector is stored whole."""
    import torch

    shape, n = base.shape, len(tensors)
    if filter_wise:
        w0 = base.reshape(-1, base.shape[-1] if base.dim() else 1)  # rows: the last dim
        ws = [w.reshape(w0.shape) for w in tensors]
        blocks = row_spans(*w0.shape)
    else:
        w0, ws = base.reshape(1, -1), [w.reshape(1, -1) for w in tensors]
        blocks = [(0, 1)]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    out = torch.empty_like(w0)
    for a, b in blocks:
        rows, cols = slice(a, b), [slice(None)]
        if not filter_wise:  # one row: chunk its columns, sum the statistics
            cols = [slice(s, e) for s, e in spans(w0.shape[1])]
        squares = torch.zeros(n, b - a)
        dots = torch.zeros(len(pairs), b - a)
        for c in cols:
            offsets = [w[rows, c] - w0[rows, c] for w in ws]
            for i, o in enumerate(offsets):
                squares[i] += o.square().sum(dim=-1)
            for p, (i, j) in enumerate(pairs):
                dots[p] += (offsets[i] * offsets[j]).sum(dim=-1)
            del offsets
        norms = squares.sqrt_()
        cosines = [
            (dots[p] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
            for p, (i, j) in enumerate(pairs)
        ]
        cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
        denominator = 1 + (n - 1) * cos
        singular = denominator.abs() < 1e-6
        t = torch.where(singular, 0, n * cos / torch.where(singular, 1, denominator))
        for c in cols:
            average = sum(w[rows, c] for w in ws) / n
            out[rows, c] = t * average + (1 - t) * w0[rows, c]
    return out.reshape(shape)


def nearswap(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """NearSwap: take the other model's value where it is within ~t of the base's, blend
    by t/|Δ| elsewhere (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001)."""
    weight = (t / (base - other).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def arcee_fusion(base: torch.Tensor, other: torch.Tensor, generator: torch.Generator):
    """Arcee Fusion: keep the other model's changes where |Δ| · KL(softmax rows) is above
    median + 1.5·IQR of that importance (https://arcee.ai).

    The softmaxes are per row, so they run a chunk of rows at a time: the importance and
    the result are the only tensor-sized temporaries."""
    import torch
    import torch.nn.functional as F

    shape = base.shape
    rows = max(1, base.numel() // base.shape[-1]) if base.dim() else 1
    b, o = base.reshape(rows, -1), other.reshape(rows, -1)
    blocks = row_spans(*b.shape)
    importance = torch.empty_like(b)
    for a, e in blocks:
        p = F.softmax(o[a:e], dim=-1) + 1e-8
        q = F.softmax(b[a:e], dim=-1) + 1e-8
        kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
        del p, q
        importance[a:e] = (o[a:e] - b[a:e]).abs() * kl
    flat = importance.reshape(-1)
    if flat.numel() > 1_000_000:  # mergekit's sampled quantiles, with a seeded sample
        flat = flat[torch.randint(flat.numel(), (1_000_000,), generator=generator)]
    ordered = torch.sort(flat).values
    q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()]
    del flat, ordered
    cut = median + 1.5 * (q3 - q1)
    for a, e in blocks:  # the result, written over the importance
        mask = (importance[a:e] >= cut).float()
        importance[a:e] = b[a:e] + (o[a:e] - b[a:e]) * mask
    return importance.reshape(shape)
