"""The subspace merges' math for one 2-D weight: its experts' task vectors in, Δ out.

Every function takes the τ_t (already times their weights) in float64 and returns Δ in
float64; the SVDs are full and thin (``torch.linalg.svd(full_matrices=False)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (or rows): U·Vᵀ of its SVD."""
    import torch

    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def numerical_rank(s: torch.Tensor, shape) -> int:
    """How many singular values are above float32's rounding of the data (the input
    weights are float32 or narrower): σ > σ_max · max(shape) · ε₃₂, matrix_rank's rule."""
    if s.numel() == 0:
        return 0
    return int((s > s[0] * max(shape) * 1.1920929e-07).sum())


def tsv_merge(taus: list[torch.Tensor]) -> torch.Tensor:
    """TSV-M: each τ_t's top ⌊r/T⌋ triplets; the stacked bases replaced by their polar
    factors; Δ = U⊥ · diag(the kept σ's) · V⊥ᵀ. A τ of lower rank than ⌊r/T⌋ (a LoRA's,
    a core's) gives only its nonzero triplets: the singular vectors of a zero σ are
    arbitrary and would still move every other column through the polar factor."""
    import torch

    keep = max(1, min(taus[0].shape) // len(taus))
    us, ss, vhs = [], [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        k = min(keep, numerical_rank(s, tau.shape))
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    if not sum(s.numel() for s in ss):
        return torch.zeros_like(taus[0])
    return polar(torch.cat(us, dim=1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(vhs, dim=0))


def iso_merge(taus: list[torch.Tensor]) -> torch.Tensor:
    """Iso-C: the sum Στ_t with every singular value set to their mean."""
    import torch

    u, s, vh = torch.linalg.svd(torch.stack(taus).sum(dim=0), full_matrices=False)
    return s.mean() * (u @ vh)


def common_size(rank: int, experts: int, fraction: float) -> tuple[int, int]:
    """Iso-CTS's split of ``rank`` directions: (common, per task). The common subspace
    takes ``fraction`` of them, moved so that the rest splits evenly over the experts
    (the authors' rounding)."""
    common = int(rank * fraction)
    task_total = round((rank - common) / experts) * experts
    common = rank - task_total
    return common, task_total // experts


def iso_cts_merge(taus: list[torch.Tensor], fraction: float = 0.8) -> torch.Tensor:
    """Iso-CTS: the sum's top directions (the common subspace) and each τ_t's own top
    directions outside it, the two bases made orthogonal by their polar factors, with
    a flat spectrum: every kept σ replaced by their mean."""
    import torch

    total = torch.stack(taus).sum(dim=0)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    common, per_task = common_size(min(total.shape), len(taus), fraction)
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    if per_task:
        shared = u[:, :common]
        for tau in taus:
            own = tau - shared @ (shared.T @ tau)
            ut, st, vht = torch.linalg.svd(own, full_matrices=False)
            us.append(ut[:, :per_task])
            ss.append(st[:per_task])
            vhs.append(vht[:per_task])
    flat = torch.cat(ss).mean()
    return flat * (polar(torch.cat(us, dim=1)) @ polar(torch.cat(vhs, dim=0)))
