"""model-stock: the base moved toward the experts' average by their angle (Jang et al. 2024)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from compressor.hookspecs import hookimpl
from compressor.merging import exact as mergekit_exact
from compressor.merging.loop import TensorMerge, row_spans, spans
from compressor.method import Option

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch


class ModelStock(TensorMerge):
    """θ = t·mean(θ_i) + (1 − t)·θ0, t = N cos θ / (1 + (N − 1) cos θ) from the experts'
    mean pairwise angle, per tensor or per row (mergekit's ``model_stock``)."""

    name = "model-stock"
    summary = "Model Stock: interpolate base → experts' average by their task vectors' angle"
    reference = "https://arxiv.org/abs/2403.19522"
    min_inputs = 2
    space = "weights"
    per_expert = frozenset()
    options = (
        Option("filter_wise", "bool", False, "one angle per row (filter) instead of per tensor"),
    )

    def merge(self, call):
        return model_stock(call.base, call.tensors, call.shared["filter_wise"])

    def merge_exact(self, call):
        """mergekit's steps in its compute dtype, the whole tensor at once (as mergekit)."""
        return mergekit_exact.model_stock(
            call.base, call.tensors, call.exact, call.shared["filter_wise"]
        )


# -- the rules: what each method computes for one tensor --------------------


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
        squares = torch.zeros(n, b - a, device=w0.device)
        dots = torch.zeros(len(pairs), b - a, device=w0.device)
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


@hookimpl
def register_methods(register):
    register(ModelStock())
