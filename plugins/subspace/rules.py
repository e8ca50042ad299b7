"""The subspace merges' math for one 2-D weight: its experts' task vectors in, Δ out.

Every function takes the τ_t (already times their weights) in float64 and returns Δ in
float64; the SVDs are full and thin (``torch.linalg.svd(full_matrices=False)``).

Singular directions of a zero σ are arbitrary (any basis of the null space will do), so
every rule keeps only the directions above float32's rounding (:func:`numerical_rank`):
for the full-rank task vectors of full fine-tunes this is the papers' rule; for low-rank
ones (LoRA experts, core-space cores) it is what makes the result well defined.
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


def numerical_rank(s: torch.Tensor, shape, top: float | None = None) -> int:
    """How many singular values are above float32's rounding of the data (the input
    weights are float32 or narrower): σ > σ_max · max(shape) · ε₃₂, matrix_rank's rule;
    ``top`` replaces σ_max where s belongs to a remainder of a larger matrix."""
    if s.numel() == 0:
        return 0
    return int((s > (float(s[0]) if top is None else top) * max(shape) * 1.1920929e-07).sum())


def compose(factors) -> torch.Tensor:
    """U·diag(s)·Vᵀ from (U, s, Vᵀ)."""
    u, s, vh = factors
    return (u * s) @ vh


def tsv_merge(taus: list[torch.Tensor]) -> torch.Tensor:
    """TSV-M's Δ (see :func:`tsv_factors`)."""
    import torch

    factors = tsv_factors(taus)
    return torch.zeros_like(taus[0]) if factors is None else compose(factors)


def tsv_factors(taus: list[torch.Tensor]):
    """TSV-M: each τ_t's top ⌊r/T⌋ triplets; the stacked bases replaced by their polar
    factors; Δ = U⊥ · diag(the kept σ's) · V⊥ᵀ, returned as (U⊥, σ's, V⊥ᵀ) (None where
    every τ is zero). A τ of lower rank than ⌊r/T⌋ (a LoRA's, a core's) gives only its
    nonzero triplets: the singular vectors of a zero σ are arbitrary and would still
    move every other column through the polar factor."""
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
        return None
    return polar(torch.cat(us, dim=1)), torch.cat(ss), polar(torch.cat(vhs, dim=0))


def newton_schulz_polar(matrix: torch.Tensor, steps: int = 30, tol: float = 1e-6):
    """The polar factor by the cubic Newton–Schulz iteration X ← 1.5·X − 0.5·X·Xᵀ·X in
    float32 (matrix products only: the route for accelerators), from X₀ = M/‖M‖_F; None
    where it has not settled (‖X − X·Xᵀ·X‖ ≤ 2·tol·‖X‖) within ``steps``.

    The cap matters: a direction of σ ≥ 1.5⁻²⁵·‖M‖_F reaches 1 within 30 steps, while
    float32's rounding noise (~1e-7) in a rank-deficient M's null space grows by 1.5 a
    step and is still far from 0 or 1 at step 30, so such an M does not settle and the
    caller takes the SVD, which drops those directions."""

    x = (matrix / matrix.norm()).float()
    wide = x.shape[0] <= x.shape[1]
    for _ in range(steps):
        gram = x @ x.T if wide else x.T @ x
        step = gram @ x if wide else x @ gram
        nxt = 1.5 * x - 0.5 * step
        if float((nxt - x).norm()) <= tol * float(nxt.norm()):
            return nxt.double()
        x = nxt
    return None


def iso_merge(taus: list[torch.Tensor], polar_by: str = "svd") -> torch.Tensor:
    """Iso-C: the sum Στ_t with every (nonzero) singular value set to their mean.

    ``polar_by`` ``newton-schulz``: U·Vᵀ by :func:`newton_schulz_polar` and Σσ as
    trace((U·Vᵀ)ᵀ·M), the rank as ‖U·Vᵀ‖²_F; the SVD where the iteration does not settle."""
    import torch

    total = torch.stack(taus).sum(dim=0)
    if polar_by == "newton-schulz" and float(total.norm()) > 0:
        factor = newton_schulz_polar(total)
        if factor is not None:
            rank = max(1, round(float(factor.square().sum())))
            return float((factor * total).sum()) / rank * factor
    factors = iso_factors(total)
    return torch.zeros_like(total) if factors is None else compose(factors)


def iso_factors(total: torch.Tensor):
    """Iso-C's Δ as (U, flat σ's, Vᵀ): the sum's own singular vectors of nonzero σ, each
    with their mean (None where the sum is zero)."""
    import torch

    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    k = numerical_rank(s, total.shape)
    if k == 0:
        return None
    return u[:, :k], s[:k].mean().expand(k), vh[:k]


def common_size(rank: int, experts: int, fraction: float) -> tuple[int, int]:
    """Iso-CTS's split of ``rank`` directions: (common, per task). The common subspace
    takes ``fraction`` of them, moved so that the rest splits evenly over the experts
    (the authors' rounding)."""
    common = int(rank * fraction)
    task_total = round((rank - common) / experts) * experts
    common = rank - task_total
    return common, task_total // experts


def iso_cts_merge(taus: list[torch.Tensor], fraction: float = 0.8) -> torch.Tensor:
    """Iso-CTS's Δ (see :func:`iso_cts_factors`)."""
    import torch

    factors = iso_cts_factors(taus, fraction)
    return torch.zeros_like(taus[0]) if factors is None else compose(factors)


def iso_cts_factors(taus: list[torch.Tensor], fraction: float = 0.8):
    """Iso-CTS: the sum's top directions (the common subspace) and each τ_t's own top
    directions outside it, the two bases made orthogonal by their polar factors, with
    a flat spectrum: every kept σ replaced by their mean. (U⊥, σ's, V⊥ᵀ), or None."""
    import torch

    total = torch.stack(taus).sum(dim=0)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    common, per_task = common_size(min(total.shape), len(taus), fraction)
    kept = min(common, numerical_rank(s, total.shape))
    us, ss, vhs = [u[:, :kept]], [s[:kept]], [vh[:kept]]
    if per_task:
        shared = u[:, :kept]
        for tau in taus:
            own = tau - shared @ (shared.T @ tau)
            ut, st, vht = torch.linalg.svd(own, full_matrices=False)
            k = min(per_task, numerical_rank(st, own.shape, top=float(s[0])))
            us.append(ut[:, :k])
            ss.append(st[:k])
            vhs.append(vht[:k])
    if not sum(x.numel() for x in ss):
        return None
    flat = torch.cat(ss).mean()
    u_all, vh_all = polar(torch.cat(us, dim=1)), polar(torch.cat(vhs, dim=0))
    return u_all, flat.expand(u_all.shape[1]), vh_all


def svc_calibrate(taus: list[torch.Tensor], alpha: float, delta=None, factors=None):
    """Singular Value Calibration (Li et al., ICML 2026, arXiv 2602.05536): Δ = U·Σ·Vᵀ;
    along each left singular vector u_r, task t's response is a = u_rᵀτ_t and the merge's
    m = u_rᵀΔ; s_rt = ⟨m, a⟩/‖a‖² says how many times over the merge carries task t's
    response there; σ_r is divided by mean_t max(s_rt, α). Directions several tasks
    share (inflated by the sum) shrink; the rest keep their σ where α ≤ 1.

    ``factors``: the merge's own (U, σ's, Vᵀ) of Δ, used as its SVD. Iso-C's and
    Iso-CTS's Δ have one repeated σ, so an SVD of Δ may return any basis of it and the
    calibration would depend on the library's choice; their construction's is exact."""
    import torch

    if factors is None:
        factors = torch.linalg.svd(delta, full_matrices=False)
    u, s, vh = factors
    merged = s[:, None] * vh  # [r, n]: each row u_rᵀΔ
    ratios = []
    for tau in taus:
        a = u.T @ tau  # [r, n]
        ratios.append((merged * a).sum(dim=1) / a.square().sum(dim=1).clamp_min(1e-30))
    eta = torch.stack(ratios, dim=1).clamp_min(alpha).mean(dim=1)
    return (u * (s / eta)) @ vh
