"""Merges that interpolate weights: linear, slerp, nuslerp, multislerp, karcher, nearswap.

Semantics follow mergekit 0.1.5's methods of the same names (the math is in
the rules at the end of this module). ``linear`` and ``karcher`` average every input,
the base included when ``--base`` is given (as mergekit adds ``base_model``);
``nuslerp`` and ``multislerp`` interpolate task vectors when there is a base and
the weights themselves when there is none.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from compressor.errors import OptionError
from compressor.hookspecs import hookimpl
from compressor.merging.loop import WEIGHTS_OPTION, TensorMerge, expert_weights, row_spans, spans
from compressor.method import Option, positive

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch


def _t(help: str) -> Option:
    return Option("t", "float", 0.5, help)


def _numbers(value) -> list[float]:
    """Every number an option's value holds: a scalar, a gradient, or -o/config rules."""
    if isinstance(value, dict):
        return _numbers(value.get("value"))
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _numbers(v)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


class Linear(TensorMerge):
    """A weighted average of the models (a model soup)."""

    name = "linear"
    summary = "Weighted average of the models: Σ w_i θ_i / Σ w_i (a model soup)"
    reference = "https://arxiv.org/abs/2203.05482"
    needs_base = False
    min_inputs = 1
    space = "weights"
    elementwise = True
    base_is_input = True
    options = (
        WEIGHTS_OPTION,
        Option("normalize", "bool", True, "divide by the sum of the weights"),
    )

    def merge(self, call):
        weights = expert_weights(call.per["weights"])
        return linear(call.tensors, weights, call.shared["normalize"])


class Slerp(TensorMerge):
    """Spherical interpolation from the base (t = 0) to the one expert (t = 1)."""

    name = "slerp"
    summary = "Spherical interpolation between the base (t=0) and one expert (t=1), per tensor"
    reference = "https://en.wikipedia.org/wiki/Slerp"
    max_inputs = 1
    space = "weights"
    per_expert = frozenset()
    options = (_t("interpolation factor: 0 is the base, 1 the expert; a gradient per layer"),)

    def prepare(self, job, views):
        outside = sorted({v for v in _numbers(job.options["t"]) if not 0 <= v <= 1})
        if outside:
            job.warn(
                f"slerp t {outside[0]:g} is outside [0, 1]: the merge extrapolates beyond "
                f"{'the base' if outside[0] < 0 else 'the expert'} (mergekit does the same)"
            )
        return None

    def merge(self, call):
        return slerp(call.shared["t"], call.base, call.tensors[0])


class Nuslerp(TensorMerge):
    """Slerp of two experts (of their task vectors when there is a base), t from weights."""

    name = "nuslerp"
    summary = "Slerp of two experts with t = w2/(w1+w2); of their task vectors given a base"
    reference = "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp"
    needs_base = False
    min_inputs = 2
    max_inputs = 2
    space = "weights"
    options = (
        WEIGHTS_OPTION,
        Option("row_wise", "bool", False, "slerp each row instead of each column"),
        Option("flatten", "bool", True, "slerp the whole flattened tensor"),
    )

    def merge(self, call):
        w = expert_weights(call.per["weights"])
        total = sum(w)
        t = 0.5 if abs(total) < 1e-6 else w[1] / total
        a, b = call.tensors
        opts = call.shared
        return nuslerp(t, a, b, opts["row_wise"], opts["flatten"], call.base)


class Multislerp(TensorMerge):
    """Barycentric spherical interpolation of any number of experts."""

    name = "multislerp"
    summary = "Spherical barycentric interpolation of several experts (task vectors given a base)"
    reference = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    needs_base = False
    space = "weights"
    options = (
        WEIGHTS_OPTION,
        Option("normalize_weights", "bool", True, "make the weights sum to 1"),
    )

    def merge(self, call):
        w = expert_weights(call.per["weights"])
        tensors = call.tensors
        if call.base is not None:
            tensors = [t - call.base for t in tensors]
        out = multislerp(tensors, w, call.shared["normalize_weights"])
        return out if call.base is None else out + call.base


class Karcher(TensorMerge):
    """The Karcher mean of the models' directions on the sphere, at their mean norm."""

    name = "karcher"
    summary = "Karcher (Riemannian) mean of the models on the hypersphere, at the mean norm"
    reference = "https://arxiv.org/abs/2603.04972"
    needs_base = False
    space = "weights"
    base_is_input = True
    per_expert = frozenset()
    options = (
        Option("max_iter", "int", 10, "iterations of the mean's fixed point", check=positive),
        Option("tol", "float", 1e-5, "stop when the tangent step is this small", check=positive),
    )

    def merge(self, call):
        return karcher(call.tensors, call.shared["max_iter"], call.shared["tol"])


class Nearswap(TensorMerge):
    """Take the expert's values where they are near the base's; blend by t/|Δ| elsewhere."""

    name = "nearswap"
    summary = "NearSwap: the expert's value where within ~t of the base, blended by t/|Δ| beyond"
    reference = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
    max_inputs = 1
    exact_by_cast = True  # its steps are mergekit's: in mergekit's dtype they round alike
    space = "weights"
    elementwise = True
    per_expert = frozenset()
    options = (Option("t", "float", 0.001, "similarity threshold (absolute difference)"),)

    def merge(self, call):
        return nearswap(call.shared["t"], call.base, call.tensors[0])


# -- the rules: what each method computes for one tensor --------------------


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
    dot, sq0, sq1 = (torch.zeros(n, device=out.device) for _ in range(3))
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


def nearswap(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """NearSwap: take the other model's value where it is within ~t of the base's, blend
    by t/|Δ| elsewhere (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001)."""
    weight = (t / (base - other).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


@hookimpl
def register_methods(register):
    for method in (Linear, Slerp, Nuslerp, Multislerp, Karcher, Nearswap):
        register(method())
