"""WUDI's per-weight optimisation (Cheng et al., ICML 2025, arXiv 2503.08099).

Δ minimises Σ_t ‖(Δ − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F: the merged update should act on each
task's input directions (the rows of τ_t) as τ_t does. The authors start from the
task-arithmetic sum Στ_t and take 300 Adam steps at lr 1e-5 in float32; so do we.

The loss is quadratic in Δ, so its gradient 2·Σ_t (Δ − τ_t)·τ_tᵀτ_t / ‖τ_t‖² is
2·(Δ·H − B) with H = Σ_t τ_tᵀτ_t/‖τ_t‖² (in × in) and B = Σ_t τ_t·τ_tᵀτ_t/‖τ_t‖², both
computed once: one (out × in)·(in × in) product per step instead of 2T products of
(out × in)·(in × out). Where ``in`` is more than 2T·out the per-task products are
cheaper and are used instead. Memory: the τ_t, H and B, Adam's two moments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

STEPS = 300
LR = 1e-5


def wudi_merge(taus: list[torch.Tensor], steps: int = STEPS, lr: float = LR) -> torch.Tensor:
    """WUDI's Δ for one weight from its τ_t (float32 in, float32 out)."""
    import torch

    out_dim, in_dim = taus[0].shape
    norms = [float(t.square().sum()) for t in taus]
    kept = [(t, n) for t, n in zip(taus, norms, strict=True) if n > 0]
    delta = torch.stack(taus).sum(dim=0)
    if not kept:
        return delta
    if in_dim <= 2 * len(kept) * out_dim:
        hessian = torch.zeros(in_dim, in_dim, device=delta.device)
        target = torch.zeros(out_dim, in_dim, device=delta.device)
        for tau, norm in kept:
            gram = tau.T @ tau / norm
            hessian += gram
            target += tau @ gram

        def gradient(d):
            return 2 * (d @ hessian - target)
    else:

        def gradient(d):
            return 2 * sum(((d - tau) @ tau.T) @ tau / norm for tau, norm in kept)

    delta = torch.nn.Parameter(delta)
    adam = torch.optim.Adam([delta], lr=lr)
    for _ in range(steps):
        delta.grad = gradient(delta.detach())
        adam.step()
    return delta.detach()
