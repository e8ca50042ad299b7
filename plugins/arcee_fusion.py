"""arcee-fusion: keep only the expert's most important changes (mergekit's ``arcee_fusion``)."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from compressor.hookspecs import hookimpl
from compressor.merging.loop import TensorMerge, row_spans
from compressor.method import Option

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch


class ArceeFusion(TensorMerge):
    """θ0 + Δ·[importance ≥ median + 1.5·IQR], importance = |Δ|·KL(softmax(θ1) ‖ softmax(θ0))
    per row. Tensors over 10⁶ entries take the quantiles from a seeded sample."""

    name = "arcee-fusion"
    summary = "Arcee Fusion: take the expert's changes only where their importance is an outlier"
    reference = "https://arcee.ai"
    max_inputs = 1
    space = "weights"
    per_expert = frozenset()
    options = (Option("seed", "int", 0, "seed of the quantile sample of large tensors"),)
    exact_by_cast = True  # its steps are mergekit's: in mergekit's dtype they round alike

    def merge(self, call):
        import torch

        digest = hashlib.blake2b(f"{call.shared['seed']}:{call.name}".encode(), digest_size=8)
        gen = torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)
        return arcee_fusion(call.base, call.tensors[0], gen)


# -- the rules: what each method computes for one tensor --------------------


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


@hookimpl
def register_methods(register):
    register(ArceeFusion())
