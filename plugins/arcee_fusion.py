"""arcee-fusion: keep only the expert's most important changes (mergekit's ``arcee_fusion``)."""

from __future__ import annotations

import hashlib

from compressor.hookspecs import hookimpl
from compressor.merge import rules as merge_rules
from compressor.merge.loop import TensorMerge
from compressor.method import Option


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
        return merge_rules.arcee_fusion(call.base, call.tensors[0], gen)


@hookimpl
def register_methods(register):
    register(ArceeFusion())
