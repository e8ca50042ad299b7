"""Merges in the task vectors' singular subspaces, data-free: TSV-M and Iso-C.

For every 2-D weight the experts' task vectors τ_t (each times its weight) are merged
through their singular value decompositions, in float64; θ = θ0 + scale · Δ.

- ``tsv-m`` (Task Singular Vectors, Gargiulo et al., CVPR 2025, arXiv 2412.00081):
  each τ_t keeps its top ⌊r/T⌋ singular triplets (r the smaller side, T the experts);
  the stacked left and right singular vectors are replaced by their nearest orthogonal
  matrices (polar factors), which removes the interference between the tasks'
  subspaces: Δ = U⊥ · diag(the kept σ's) · V⊥ᵀ.
- ``iso-c`` (Iso-C, Marczak et al., ICML 2025, arXiv 2502.04959): the task-arithmetic
  sum Στ_t with a flat spectrum, Δ = mean(σ(Στ_t)) · polar(Στ_t).

Every other tensor (norms, biases) and the token-indexed ones (embeddings, the LM head:
their SVD costs the most and the authors' LLM code leaves them out) take the mean of the
τ. Each weight is merged whole: memory holds one tensor of every expert plus its
factors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from compressor.hookspecs import hookimpl
from compressor.merge.loop import SCALE_OPTION, WEIGHTS_OPTION, TensorMerge, expert_weights
from compressor.merge.params import is_pre_layers

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch


def _in_subspace(name: str, shape) -> bool:
    """Whether a tensor is merged through its SVD: 2-D and not indexed by token."""
    return len(shape) == 2 and not is_pre_layers(name) and not name.endswith("lm_head.weight")


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (or rows): U·Vᵀ of its SVD."""
    import torch

    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def tsv_merge(taus: list[torch.Tensor]) -> torch.Tensor:
    """TSV-M of one weight's task vectors (float64 in, float64 out)."""
    import torch

    keep = max(1, min(taus[0].shape) // len(taus))
    us, ss, vhs = [], [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        us.append(u[:, :keep])
        ss.append(s[:keep])
        vhs.append(vh[:keep])
    return polar(torch.cat(us, dim=1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(vhs, dim=0))


def iso_merge(taus: list[torch.Tensor]) -> torch.Tensor:
    """Iso-C of one weight's task vectors: their sum with every singular value the mean."""
    import torch

    u, s, vh = torch.linalg.svd(torch.stack(taus).sum(dim=0), full_matrices=False)
    return s.mean() * (u @ vh)


class _SubspaceMerge(TensorMerge):
    """The per-tensor loop both share; ``rule`` merges one 2-D weight's task vectors."""

    version = "1"
    needs_base = True
    min_inputs = 2
    max_inputs = None
    per_expert = frozenset({"weights"})
    options = (WEIGHTS_OPTION, SCALE_OPTION)

    def merge(self, call):
        import torch

        weights = expert_weights(call.per["weights"])
        taus = [
            torch.zeros(call.base.shape, dtype=torch.float64)
            if d is None
            else d.reshape(call.base.shape).double() * w
            for d, w in zip(call.tensors, weights, strict=True)
        ]
        if _in_subspace(call.name, call.base.shape):
            delta = self.rule(taus)
        else:
            delta = torch.stack(taus).mean(dim=0)
        return call.base.add_(delta.float(), alpha=call.shared["scale"])

    @staticmethod
    def rule(taus):
        raise NotImplementedError


class TsvMerge(_SubspaceMerge):
    """TSV-M: each task's top singular vectors, decorrelated by orthogonalisation."""

    name = "tsv-m"
    summary = "TSV-M: each τ's top r/T singular triplets, their bases made orthogonal"
    reference = "https://arxiv.org/abs/2412.00081"

    @staticmethod
    def rule(taus):
        return tsv_merge(taus)


class IsoMerge(_SubspaceMerge):
    """Iso-C: the task-arithmetic sum with an isotropic (flat) spectrum."""

    name = "iso-c"
    summary = "Iso-C: the task-arithmetic sum with every singular value set to their mean"
    reference = "https://arxiv.org/abs/2502.04959"

    @staticmethod
    def rule(taus):
        return iso_merge(taus)


@hookimpl
def register_methods(register):
    register(TsvMerge())
    register(IsoMerge())
