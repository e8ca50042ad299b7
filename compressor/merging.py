"""Pieces the merge methods share: expert weights, magnitude trimming, TIES' sign consensus.

Trimming keeps exactly k entries like mergekit's and PEFT's sort-based code
(entries tied at the threshold are taken in flat order, so the result does not
depend on a sort's tie order), found with the histogram threshold of
:mod:`compressor.selection` instead of a sort.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import OptionError
from .method import Option
from .selection import magnitude_bits, topk_threshold_bits

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch

WEIGHTS_OPTION = Option(
    "weights",
    "floats",
    None,
    "per-expert weights w_t, comma-separated, in the order the experts are given (default: 1 each)",
)
SCALE_OPTION = Option("scale", "float", 1.0, "λ, the factor on the merged task vector")


def expert_weights(job) -> list[float]:
    """The ``weights`` option, one per expert (default 1 each)."""
    weights = job.options["weights"] or [1.0] * len(job.inputs)
    if len(weights) != len(job.inputs):
        experts = len(job.inputs)
        raise OptionError(
            f"option 'weights' has {len(weights)} values for {experts} "
            f"expert{'s' if experts != 1 else ''}"
        )
    return weights


def keep_mask(tau: torch.Tensor, threshold: int, ties: int) -> tuple[torch.Tensor, int]:
    """Entries with |τ| above the threshold (int32 bits), plus the first ``ties`` equal to it.

    Returns the flat mask and how many tied entries it took.
    """
    bits = magnitude_bits(tau).reshape(-1)
    mask = bits > threshold
    if ties > 0:
        tied = (bits == threshold).nonzero().squeeze(1)[:ties]
        mask[tied] = True
        return mask, tied.numel()
    return mask, 0


def top_k_mask(tau: torch.Tensor, k: int) -> torch.Tensor:
    """The flat mask of the k entries of largest |τ| (ties in flat order)."""
    threshold = topk_threshold_bits([tau], k)
    above = int((magnitude_bits(tau) > threshold).sum())
    return keep_mask(tau, threshold, k - above)[0]


def trim_count(density: float, numel: int) -> int:
    """mergekit's and PEFT's k: ``int(density * n)``, at least one entry."""
    return max(1, int(density * numel))


def sign_consensus(
    deltas: list[torch.Tensor | None],
    weights: list[float],
    election: str = "weighted",
    normalize: str = "weights",
) -> torch.Tensor | None:
    """TIES' elect-and-disjoint-mean over (trimmed) task vectors of one tensor.

    The elected sign per entry is that of Σ w_t·τ_t (``election weighted``,
    mergekit) or Σ τ_t (``unweighted``, PEFT's "total"); expert t agrees where
    its (weighted) τ has that sign, zeros never do. The result is Σ w_t·τ_t over
    the agreeing experts, divided by their summed weights (``normalize weights``,
    mergekit), by their number (``count``, PEFT), or not at all (``none``);
    where no expert agrees the divisor is 1. ``None`` deltas are zero.
    """
    import torch

    present = [(d, w) for d, w in zip(deltas, weights, strict=True) if d is not None]
    if not present:
        return None
    vote = torch.zeros_like(present[0][0])
    for d, w in present:
        vote.add_(d, alpha=w if election == "weighted" else 1.0)
    majority = torch.where(vote >= 0, 1.0, -1.0)
    del vote
    mixed = torch.zeros_like(majority)
    divisor = torch.zeros_like(majority) if normalize != "none" else None
    for d, w in present:
        sign = torch.sign(d)
        if election == "weighted":
            sign.mul_(1.0 if w > 0 else -1.0 if w < 0 else 0.0)
        agree = sign.eq_(majority)  # 1.0 where the expert agrees
        mixed.addcmul_(d, agree, value=w)
        if divisor is not None:
            divisor.add_(agree, alpha=w if normalize == "weights" else 1.0)
    if divisor is not None:
        divisor[divisor == 0] = 1
        mixed.div_(divisor)
    return mixed
