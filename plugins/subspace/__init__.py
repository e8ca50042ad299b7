"""Merges in the task vectors' singular subspaces, data-free: TSV-M, Iso-C, Iso-CTS, WUDI.

For every 2-D weight the experts' task vectors τ_t (each times its weight) are merged
by a rule of :mod:`compressor.plugins.subspace.rules` (SVDs in float64) or
:mod:`compressor.plugins.subspace.wudi` (Adam in float32); θ = θ0 + scale · Δ.

- ``tsv-m`` (Task Singular Vectors, Gargiulo et al., CVPR 2025, arXiv 2412.00081):
  each τ_t's top ⌊r/T⌋ singular triplets (r the smaller side, T the experts), the
  stacked left and right singular vectors replaced by their polar factors.
- ``iso-c`` (Marczak et al., ICML 2025, arXiv 2502.04959): the task-arithmetic sum with
  a flat spectrum.
- ``iso-cts`` (same paper): Iso-C's common subspace (the sum's top 80% of directions)
  plus each task's own top directions outside it, orthogonalised, flat spectrum.
- ``wudi`` (Cheng et al., ICML 2025, arXiv 2503.08099): per weight, the Δ that acts on
  every task's input directions as its τ_t does, by 300 Adam steps from Στ_t.

Every other tensor (norms, biases) and the token-indexed ones (embeddings, the LM head:
their SVD costs the most and the authors' LLM code leaves them out) take the mean of the
τ. Each weight is merged whole: memory holds one tensor of every expert plus its
factors. The authors' recommended scales differ (Iso-C/CTS ~1.0-1.5 on ViTs, TSV-M and
WUDI 1.0); pick one on validation data (``-o scale auto``).
"""

from __future__ import annotations

from compressor.hookspecs import hookimpl
from compressor.merging.loop import SCALE_OPTION, WEIGHTS_OPTION, TensorMerge, expert_weights
from compressor.merging.params import is_pre_layers
from compressor.method import Option, positive
from compressor.plugins.subspace.rules import (
    iso_cts_factors,
    iso_cts_merge,
    iso_factors,
    iso_merge,
    svc_calibrate,
    tsv_factors,
    tsv_merge,
)
from compressor.plugins.subspace.wudi import LR, STEPS, wudi_merge


def in_subspace(name: str, shape) -> bool:
    """Whether a tensor is merged through its subspace rule: 2-D, not indexed by token."""
    return len(shape) == 2 and not is_pre_layers(name) and not name.endswith("lm_head.weight")


class _SubspaceMerge(TensorMerge):
    """The per-tensor loop all four share; ``rule`` merges one 2-D weight's τ_t."""

    version = "1"
    needs_base = True
    min_inputs = 2
    max_inputs = None
    per_expert = frozenset({"weights"})
    options = (
        WEIGHTS_OPTION,
        SCALE_OPTION,
        Option(
            "calibrate",
            "choice",
            "none",
            "svc: Singular Value Calibration of each merged weight (arXiv 2602.05536), "
            "shrinking the directions several experts share",
            choices=("none", "svc"),
        ),
        Option(
            "svc_alpha",
            "float",
            None,
            "SVC's floor α on each expert's ratio (default: the authors' 1 for tsv-m, 1/T "
            "for the others)",
            check=positive,
        ),
    )
    precision = "float64"
    needs_float64 = True
    svc_alpha: float | None = None  # None: 1/T

    def merge(self, call):
        import torch

        weights = expert_weights(call.per["weights"])
        if not in_subspace(call.name, call.base.shape):  # the mean, accumulated in float32
            for d, w in zip(call.tensors, weights, strict=True):
                if d is not None:
                    call.base.add_(
                        d.reshape(call.base.shape), alpha=w * call.shared["scale"] / len(weights)
                    )
            return call.base
        dtype = getattr(torch, self.precision)
        taus = [
            torch.zeros(call.base.shape, dtype=dtype, device=call.base.device)
            if d is None
            else d.reshape(call.base.shape).to(dtype) * w
            for d, w in zip(call.tensors, weights, strict=True)
        ]
        if call.shared["calibrate"] == "svc":
            alpha = self.svc_alpha if call.shared["svc_alpha"] is None else call.shared["svc_alpha"]
            factors = self.factors(taus, call.shared)
            taus = [t.double() for t in taus]
            if factors is None:
                delta = torch.zeros_like(taus[0])
            else:
                factors = tuple(f.double() for f in factors)
                delta = svc_calibrate(taus, alpha or 1 / len(taus), factors=factors)
        else:
            delta = self.rule(taus, call.shared)
        return call.base.add_(delta.float(), alpha=call.shared["scale"])

    def factors(self, taus, shared):
        """Δ as (U, σ's, Vᵀ) for SVC: the rule's own factors where it builds Δ from them
        (None: Δ is zero), else an SVD of Δ."""
        import torch

        return torch.linalg.svd(self.rule(taus, shared).double(), full_matrices=False)

    def rule(self, taus, shared):
        raise NotImplementedError


class TsvMerge(_SubspaceMerge):
    """TSV-M: each task's top singular vectors, decorrelated by orthogonalisation."""

    name = "tsv-m"
    summary = "TSV-M: each τ's top r/T singular triplets, their bases made orthogonal"
    reference = "https://arxiv.org/abs/2412.00081"
    svc_alpha = 1.0

    def rule(self, taus, shared):
        return tsv_merge(taus)

    def factors(self, taus, shared):
        return tsv_factors(taus)


class IsoMerge(_SubspaceMerge):
    """Iso-C: the task-arithmetic sum with an isotropic (flat) spectrum."""

    name = "iso-c"
    summary = "Iso-C: the task-arithmetic sum with every singular value set to their mean"
    reference = "https://arxiv.org/abs/2502.04959"
    options = (
        *_SubspaceMerge.options,
        Option(
            "polar",
            "choice",
            "svd",
            "how U·Vᵀ is found: svd (float64, exact) or newton-schulz (float32 matrix "
            "products, within 1e-5 of the SVD: the route for accelerators; no faster on CPUs)",
            choices=("svd", "newton-schulz"),
        ),
    )

    def rule(self, taus, shared):
        return iso_merge(taus, shared["polar"])

    def factors(self, taus, shared):
        import torch

        return iso_factors(torch.stack(taus).sum(dim=0))


def _fraction(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


class IsoCtsMerge(_SubspaceMerge):
    """Iso-CTS: Iso-C's common subspace plus each task's own directions."""

    name = "iso-cts"
    summary = "Iso-CTS: the sum's top directions plus each τ's own, with a flat spectrum"
    reference = "https://arxiv.org/abs/2502.04959"
    options = (
        *_SubspaceMerge.options,
        Option(
            "common",
            "float",
            0.8,
            "share of the directions given to the common subspace (the paper's 0.8)",
            check=_fraction,
        ),
    )

    def rule(self, taus, shared):
        return iso_cts_merge(taus, shared["common"])

    def factors(self, taus, shared):
        return iso_cts_factors(taus, shared["common"])


class WudiMerge(_SubspaceMerge):
    """WUDI: per weight, Δ fitted to every task's input directions (Adam, no data)."""

    name = "wudi"
    summary = "WUDI: per weight, the Δ closest to each τ on its own input directions"
    reference = "https://arxiv.org/abs/2503.08099"
    precision = "float32"
    options = (
        *_SubspaceMerge.options,
        Option("steps", "int", STEPS, "Adam steps per weight (the paper's 300)", check=positive),
        Option("lr", "float", LR, "Adam's learning rate (the paper's 1e-5)", check=positive),
    )

    def rule(self, taus, shared):
        return wudi_merge(taus, shared["steps"], shared["lr"])


@hookimpl
def register_methods(register):
    register(TsvMerge())
    register(IsoMerge())
    register(IsoCtsMerge())
    register(WudiMerge())
